"""``cnn``: a small 10-block CNN for 1x28x28 images (Fashion-MNIST), fast on a CPU.

Blocks (default config; activation = the tensor leaving the block, per sample)::

    0  conv3x3 1->16  + relu          16x28x28
    1  conv3x3 16->32 + relu          32x28x28
    2  maxpool 2                      32x14x14
    3  conv3x3 32->32 + relu          32x14x14
    4  conv3x3 32->64 + relu          64x14x14
    5  maxpool 2                      64x7x7
    6  conv3x3 64->64 + relu          64x7x7
    7  flatten + linear 3136->128 + relu   128
    8  linear 128->64 + relu          64
    9  linear 64->num_classes         10

About 11.4 M multiply-accumulates per sample; 9 interior split points whose
activation sizes range from 25 088 down to 64 floats.
"""

from __future__ import annotations

from torch import nn

from testbed.errors import ModelError
from testbed.models.blocks import BlockModel, check_positive_int, init_weights, register_model

__all__ = ["SmallCNN"]


def _conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    if batch_norm:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


@register_model("cnn")
class SmallCNN(BlockModel):
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        batch_norm: bool = False,
    ) -> None:
        name = "cnn"
        in_channels = check_positive_int(name, "in_channels", in_channels)
        image_size = check_positive_int(name, "image_size", image_size)
        num_classes = check_positive_int(name, "num_classes", num_classes)
        if not isinstance(batch_norm, bool):
            raise ModelError(f"model {name!r}: config batch_norm must be true or false, got {batch_norm!r}")
        if image_size < 4:
            raise ModelError(f"model {name!r}: config image_size must be at least 4, got {image_size}")
        spatial = image_size // 2 // 2
        blocks: list[nn.Module] = [
            _conv(in_channels, 16, batch_norm),
            _conv(16, 32, batch_norm),
            nn.MaxPool2d(2),
            _conv(32, 32, batch_norm),
            _conv(32, 64, batch_norm),
            nn.MaxPool2d(2),
            _conv(64, 64, batch_norm),
            nn.Sequential(nn.Flatten(1), nn.Linear(64 * spatial * spatial, 128), nn.ReLU()),
            nn.Sequential(nn.Linear(128, 64), nn.ReLU()),
            nn.Linear(64, num_classes),
        ]
        super().__init__(
            name=name,
            config={
                "in_channels": in_channels,
                "image_size": image_size,
                "num_classes": num_classes,
                "batch_norm": batch_norm,
            },
            blocks=blocks,
            input_shape=(in_channels, image_size, image_size),
            num_classes=num_classes,
        )
        init_weights(self)
