"""The block-model abstraction and the model registry.

A model is an ordered sequence of blocks. Split points are the block boundaries
0..L: point ``k`` is the tensor that leaves block ``k - 1`` and enters block
``k`` (point 0 is the raw input, point L the logits). Partitioning, export and
the wire protocol all work in terms of these points, so every zoo model is a
:class:`BlockModel` whose ``blocks`` list is the only thing ``forward`` runs.
"""

from __future__ import annotations

import inspect
import json
import numbers
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from testbed.errors import ModelError

__all__ = ["BasicBlock", "BlockModel", "build_model", "model_names", "register_model"]


class BlockModel(nn.Module):
    """A classifier made of an ordered sequence of blocks.

    Attributes:
        name: the registry name; ``build_model(name, **config)`` rebuilds the architecture.
        config: JSON-serialisable constructor kwargs, with every default filled in.
        blocks: the blocks, in order; ``forward`` is ``blocks[0:L]``.
        input_shape: the per-sample input shape, e.g. ``(1, 28, 28)``.
        num_classes: the width of the logits.
    """

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        blocks: list[nn.Module],
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        try:
            json.dumps(config)
        except TypeError as exc:
            raise ModelError(f"model {name!r}: config must be JSON-serialisable ({exc})") from exc
        if len(blocks) < 2:
            raise ModelError(f"model {name!r}: needs at least 2 blocks to have a split point")
        self.name = name
        self.config = dict(config)
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks (split points are 0..L)."""
        return len(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, 0, self.num_blocks)

    def run(self, x: Tensor, start: int, end: int) -> Tensor:
        """Run ``blocks[start:end]`` on ``x`` (``start == end`` returns ``x`` unchanged)."""
        num = self.num_blocks
        if not (_is_index(start) and _is_index(end) and 0 <= start <= end <= num):
            raise ModelError(
                f"model {self.name!r}: block range [{start}, {end}) is invalid; "
                f"need integers 0 <= start <= end <= {num}"
            )
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, config={self.config}, num_blocks={self.num_blocks}"


def _is_index(value: Any) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class BasicBlock(nn.Module):
    """The ResNet-18/34 basic block: two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., BlockModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., BlockModel]], Callable[..., BlockModel]]:
    """Class/function decorator: make ``build_model(name, **config)`` call the decorated factory."""

    def deco(factory: Callable[..., BlockModel]) -> Callable[..., BlockModel]:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, **config: Any) -> BlockModel:
    """Build a fresh, randomly initialised model from its registry name and config."""
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(model_names()) or "(none)"
        raise ModelError(f"unknown model {name!r}; known models: {known}")
    params = inspect.signature(factory).parameters
    unknown = sorted(set(config) - set(params))
    if unknown:
        accepted = ", ".join(params) or "(none)"
        raise ModelError(
            f"model {name!r} does not accept config key(s) {', '.join(unknown)}; accepted: {accepted}"
        )
    model = factory(**config)
    if not isinstance(model, BlockModel):  # pragma: no cover - a registry bug, not a user error
        raise ModelError(f"model {name!r}: factory returned {type(model).__name__}, not a BlockModel")
    return model


def check_positive_int(model: str, key: str, value: Any) -> int:
    """Validate one integer config entry (bools are rejected) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"model {model!r}: config {key} must be a positive integer, got {value!r}")
    return value


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit/zero BatchNorm, PyTorch-default linears."""
    for m in module.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue  # shape-only twin (see testbed.partition.activation_shapes): nothing to initialise
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
