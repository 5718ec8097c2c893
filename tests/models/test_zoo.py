"""The model zoo: every registered model builds, runs block by block, and rebuilds from its config."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from testbed.errors import ModelError, TestbedError
from testbed.models import BasicBlock, BlockModel, build_model, model_names

ZOO = model_names()


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    # Multi-threaded kernels are erratic on a small shared machine; one thread is fast and steady.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, BlockModel]:
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in ZOO}


def test_registry_lists_the_zoo():
    assert {"cnn", "resnet18"} <= set(ZOO)
    assert sorted(ZOO) == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_model_contract(models: dict[str, BlockModel], name: str):
    model = models[name]
    assert isinstance(model, BlockModel)
    assert model.name == name
    assert isinstance(model.blocks, nn.ModuleList)
    assert model.num_blocks == len(model.blocks)
    assert model.num_blocks - 1 >= 8, "at least 8 interior split points"
    assert json.loads(json.dumps(model.config)) == model.config
    assert all(isinstance(d, int) and d > 0 for d in model.input_shape)
    assert model.num_classes == 10


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_and_run_agree(models: dict[str, BlockModel], name: str, batch: int):
    model = models[name]
    x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(batch))
    L = model.num_blocks
    with torch.inference_mode():
        y = model(x)
        assert y.shape == (batch, model.num_classes)
        assert torch.isfinite(y).all()
        assert torch.equal(model.run(x, 0, L), y)
        assert torch.equal(model.run(x, 0, 0), x)
        # Any chain of block ranges composes to the full model.
        mid = L // 2
        h = model.run(x, 0, 3)
        h = model.run(h, 3, mid)
        assert torch.equal(model.run(h, mid, L), y)


@pytest.mark.parametrize("name", ZOO)
def test_rebuild_from_config_gives_the_same_architecture(models: dict[str, BlockModel], name: str):
    model = models[name]
    twin = build_model(model.name, **model.config)
    assert type(twin) is type(model)
    assert twin.config == model.config
    assert twin.input_shape == model.input_shape
    assert twin.num_classes == model.num_classes
    assert repr(twin) == repr(model)
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in twin.state_dict().items()} == shapes
    # Loading the weights into the rebuilt model reproduces the outputs exactly.
    twin.load_state_dict(model.state_dict())
    twin.eval()
    x = torch.randn(2, *model.input_shape)
    with torch.inference_mode():
        assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("bad", [(-1, 3), (0, 99), (5, 4), (1.0, 2), (True, 2)])
def test_run_rejects_bad_ranges(models: dict[str, BlockModel], bad: tuple[object, object]):
    model = models["cnn"]
    with pytest.raises(ModelError, match=rf"0 <= start <= end <= {model.num_blocks}"):
        model.run(torch.zeros(1, *model.input_shape), *bad)  # type: ignore[arg-type]


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ModelError) as info:
        build_model("vgg99")
    message = str(info.value)
    assert "vgg99" in message
    for name in ZOO:
        assert name in message
    assert isinstance(info.value, TestbedError)


def test_unknown_config_key_is_named():
    with pytest.raises(ModelError, match=r"colour.*accepted: in_channels"):
        build_model("cnn", colour="red")


@pytest.mark.parametrize(
    ("name", "config"),
    [("cnn", {"num_classes": 0}), ("cnn", {"image_size": "28"}), ("cnn", {"batch_norm": 1}),
     ("resnet18", {"width": -4}), ("resnet18", {"in_channels": True})],
)
def test_bad_config_values_are_rejected(name: str, config: dict[str, object]):
    with pytest.raises(ModelError, match=f"model '{name}'"):
        build_model(name, **config)


def test_cnn_layout_and_cost(models: dict[str, BlockModel]):
    model = models["cnn"]
    assert model.input_shape == (1, 28, 28)
    assert model.num_blocks == 10
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *model.input_shape))
    finally:
        for h in hooks:
            h.remove()
    assert 5e6 < macs < 12e6, f"{macs / 1e6:.1f} M MACs per sample"


def test_cnn_variants():
    torch.manual_seed(1)
    model = build_model("cnn", in_channels=3, image_size=32, num_classes=5, batch_norm=True)
    assert model.config == {"in_channels": 3, "image_size": 32, "num_classes": 5, "batch_norm": True}
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        assert model.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_resnet18_layout(models: dict[str, BlockModel]):
    model = models["resnet18"]
    assert model.input_shape == (3, 32, 32)
    assert model.num_blocks == 11
    assert model.config == {"in_channels": 3, "image_size": 32, "num_classes": 10, "width": 64}
    basic = [i for i, blk in enumerate(model.blocks) if isinstance(blk, BasicBlock)]
    assert basic == list(range(1, 9))
    # A strided block projects its shortcut; the others pass it through.
    assert [not isinstance(model.blocks[i].downsample, nn.Identity) for i in basic] == [
        False, False, True, False, True, False, True, False,
    ]
    assert isinstance(model.blocks[-1], nn.Linear) and model.blocks[-1].in_features == 512
    n_params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n_params < 11.3e6  # ResNet-18 (CIFAR stem) has ~11.17 M parameters


def test_resnet18_imagenet_stem_for_large_images():
    model = build_model("resnet18", in_channels=1, image_size=96, num_classes=7, width=8).eval()
    assert any(isinstance(m, nn.MaxPool2d) for m in model.blocks[0].modules())
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 96, 96)).shape == (2, 7)
