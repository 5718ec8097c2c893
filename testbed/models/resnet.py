"""``resnet18``: ResNet-18 as 11 blocks (stem, 8 basic blocks, pool+flatten, fc).

For small images (``image_size <= 64``, e.g. CIFAR's 32x32) the stem is the usual
CIFAR variant, conv3x3/stride 1 + BN + ReLU with no max-pool; for larger images it
is the ImageNet stem, conv7x7/stride 2 + BN + ReLU + maxpool 3x3/stride 2.

Blocks (default config: 3x32x32, width 64; activation per sample)::

    0   stem                      64x32x32
    1,2 layer1: 2 x BasicBlock    64x32x32
    3,4 layer2: 2 x BasicBlock    128x16x16 (first one strided)
    5,6 layer3: 2 x BasicBlock    256x8x8
    7,8 layer4: 2 x BasicBlock    512x4x4
    9   adaptive avg-pool + flatten   512
    10  linear 512->num_classes   10
"""

from __future__ import annotations

from torch import nn

from testbed.models.blocks import BasicBlock, BlockModel, check_positive_int, init_weights, register_model

__all__ = ["ResNet18"]

SMALL_IMAGE_MAX = 64


@register_model("resnet18")
class ResNet18(BlockModel):
    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 64,
    ) -> None:
        name = "resnet18"
        in_channels = check_positive_int(name, "in_channels", in_channels)
        image_size = check_positive_int(name, "image_size", image_size)
        num_classes = check_positive_int(name, "num_classes", num_classes)
        width = check_positive_int(name, "width", width)
        stem: nn.Module
        if image_size <= SMALL_IMAGE_MAX:
            stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
        else:
            stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        blocks: list[nn.Module] = [stem]
        channels = width
        for stage in range(4):
            out = width * 2**stage
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out, stride))
                channels = out
        blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
        blocks.append(nn.Linear(channels, num_classes))
        super().__init__(
            name=name,
            config={
                "in_channels": in_channels,
                "image_size": image_size,
                "num_classes": num_classes,
                "width": width,
            },
            blocks=blocks,
            input_shape=(in_channels, image_size, image_size),
            num_classes=num_classes,
        )
        init_weights(self)
