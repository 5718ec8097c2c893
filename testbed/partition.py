"""U-shaped partitions of a block model, and their ONNX head/tail artifacts.

A model has L blocks and split points 0..L. A partition ``(a, b)`` with
``1 <= a <= b <= L - 1`` cuts it into

* head = ``blocks[0:a]``, run on the device (ONNX): raw input in, activation ``a1`` out;
* body = ``blocks[a:b]``, run on the edge server (PyTorch);
* tail = ``blocks[b:L]``, run on the device (ONNX): activation ``a2`` in, logits out,

so raw inputs and labels never leave the device. ``a == b`` (empty body) is the
device-only baseline.

This module imports torch but not onnx: the edge server can use :func:`split`
without the controller's export dependencies, which are imported on first export.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import numbers
import os
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from testbed.errors import PartitionError, WeightsError
from testbed.models.blocks import BlockModel, build_model
from testbed.models.weights import atomic_write_bytes, state_hash

__all__ = [
    "EXPORTERS",
    "ONNX_OPSET",
    "ArtifactCache",
    "Partition",
    "PartitionId",
    "activation_shape",
    "activation_shapes",
    "check_split",
    "export_head",
    "export_tail",
    "split",
    "valid_splits",
]

#: ONNX opset of the exported heads and tails (onnxruntime >= 1.13 runs it).
ONNX_OPSET = 17
#: ``torchscript`` (the default: fast, IR version 8) or ``dynamo`` (``torch.export``-based).
EXPORTERS = ("torchscript", "dynamo")
#: Environment variable that overrides the default exporter.
EXPORTER_ENV = "TESTBED_ONNX_EXPORTER"

_log = logging.getLogger(__name__)
_HASH_RE = re.compile(r"[0-9a-fA-F]{16}(?:[0-9a-fA-F]{48})?")
_ID_EXAMPLE = "0123456789abcdef:3:7"


# ---------------------------------------------------------------------------------------------
# Partition ids


def _is_int(v: Any) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_hash(weights_hash: Any, what: str) -> str:
    if not isinstance(weights_hash, str) or not _HASH_RE.fullmatch(weights_hash):
        raise PartitionError(
            f"{what}: weights hash {weights_hash!r} must be 16 or 64 hex digits "
            "(the state hash from save_weights, or its first 16 digits)"
        )
    return weights_hash.lower()


@dataclass(frozen=True)
class PartitionId:
    """Names one partition of one set of weights: ``"<hash[:16]>:<a>:<b>"``.

    ``weights_hash`` may be the full state hash or its 16-digit prefix; the string
    form always uses the prefix, so compare ids by ``str`` when one side may hold
    the full hash.
    """

    weights_hash: str
    a: int
    b: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_hash", _check_hash(self.weights_hash, "partition id"))
        a, b = self.a, self.b
        if not (_is_int(a) and _is_int(b) and 1 <= a <= b):
            raise PartitionError(f"partition id: need integers 1 <= a <= b, got a={a!r}, b={b!r}")
        object.__setattr__(self, "a", int(a))
        object.__setattr__(self, "b", int(b))

    def __str__(self) -> str:
        return f"{self.weights_hash[:16]}:{self.a}:{self.b}"

    @property
    def short_hash(self) -> str:
        """The 16-digit hash prefix used in the string form and the artifact cache."""
        return self.weights_hash[:16]

    @classmethod
    def parse(cls, text: str) -> PartitionId:
        """Parse ``"<hash>:<a>:<b>"`` (hash: 16 or 64 hex digits); raise PartitionError if malformed."""
        if not isinstance(text, str):
            raise PartitionError(f"partition id must be a string, got {type(text).__name__}")
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise PartitionError(
                f"invalid partition id {text!r}: expected HASH:A:B, e.g. {_ID_EXAMPLE}"
            )
        digest, a_text, b_text = parts
        if not _HASH_RE.fullmatch(digest):
            raise PartitionError(
                f"invalid partition id {text!r}: HASH must be 16 or 64 hex digits, e.g. {_ID_EXAMPLE}"
            )
        if not (a_text.isascii() and a_text.isdigit() and b_text.isascii() and b_text.isdigit()):
            raise PartitionError(
                f"invalid partition id {text!r}: A and B must be non-negative integers, e.g. {_ID_EXAMPLE}"
            )
        a, b = int(a_text), int(b_text)
        if not 1 <= a <= b:
            raise PartitionError(f"invalid partition id {text!r}: need 1 <= A <= B, got A={a}, B={b}")
        return cls(digest, a, b)


# ---------------------------------------------------------------------------------------------
# Split validation and splitting


def valid_splits(num_blocks: int) -> list[tuple[int, int]]:
    """Every valid ``(a, b)`` for a model of ``num_blocks`` blocks: ``1 <= a <= b <= L - 1``."""
    if not _is_int(num_blocks):
        raise PartitionError(f"num_blocks must be an integer, got {num_blocks!r}")
    num = int(num_blocks)
    return [(a, b) for a in range(1, num) for b in range(a, num)]


def _num_blocks(model_or_num_blocks: BlockModel | int) -> tuple[int, str]:
    if isinstance(model_or_num_blocks, BlockModel):
        return model_or_num_blocks.num_blocks, f"model {model_or_num_blocks.name!r}"
    if not _is_int(model_or_num_blocks):
        raise PartitionError(f"expected a BlockModel or a block count, got {model_or_num_blocks!r}")
    return int(model_or_num_blocks), "a model"


def check_split(model_or_num_blocks: BlockModel | int, a: int, b: int) -> None:
    """Raise PartitionError unless ``1 <= a <= b <= L - 1``; the message names the valid range."""
    num, what = _num_blocks(model_or_num_blocks)
    if num < 2:
        raise PartitionError(f"{what} with {num} block(s) has no split points; it needs at least 2 blocks")
    if not (_is_int(a) and _is_int(b) and 1 <= a <= b <= num - 1):
        raise PartitionError(
            f"invalid split (a={a!r}, b={b!r}) for {what} with L={num} blocks: "
            f"need integers 1 <= a <= b <= {num - 1} "
            "(a: head/body boundary, b: body/tail boundary; a == b means an empty body)"
        )


def _check_point(model: BlockModel, point: int, low: int, high: int, what: str) -> None:
    if not (_is_int(point) and low <= point <= high):
        raise PartitionError(
            f"invalid {what} {point!r} for model {model.name!r} with L={model.num_blocks} blocks: "
            f"need an integer {low} <= {what} <= {high}"
        )


@dataclass(frozen=True)
class Partition:
    """head = ``blocks[0:a]``, body = ``blocks[a:b]``, tail = ``blocks[b:L]``.

    The parts hold the model's own modules (shared parameters, no copies).
    """

    head: nn.Sequential
    body: nn.Sequential
    tail: nn.Sequential
    a: int
    b: int


def split(model: BlockModel, a: int, b: int) -> Partition:
    """Cut ``model`` at ``(a, b)``. The parts hold the model's own block modules (no copies),
    so training the body on the edge trains the model's parameters."""
    check_split(model, a, b)
    a, b = int(a), int(b)
    blocks = list(model.blocks)
    return Partition(
        head=nn.Sequential(*blocks[:a]),
        body=nn.Sequential(*blocks[a:b]),
        tail=nn.Sequential(*blocks[b:]),
        a=a,
        b=b,
    )


# ---------------------------------------------------------------------------------------------
# Activation shapes

_shapes_by_arch: dict[tuple[str, str, str], tuple[tuple[int, ...], ...]] = {}
_shapes_by_model: weakref.WeakKeyDictionary[BlockModel, tuple[tuple[int, ...], ...]] = (
    weakref.WeakKeyDictionary()
)


def _trace_shapes(blocks: nn.ModuleList, x: Tensor) -> tuple[tuple[int, ...], ...]:
    shapes = [tuple(x.shape[1:])]
    with torch.no_grad():
        for block in blocks:
            x = block(x)
            shapes.append(tuple(int(d) for d in x.shape[1:]))
    return tuple(shapes)


def activation_shapes(model: BlockModel) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes at every split point 0..L (point 0 is the input, point L the logits).

    Computed once per architecture by a dummy forward on the ``meta`` device (no
    compute, and no side effects on the model, e.g. BatchNorm running stats).
    """
    cached = _shapes_by_model.get(model)
    if cached is not None:
        return cached
    cls = type(model)
    key = (f"{cls.__module__}.{cls.__qualname__}", model.name, json.dumps(model.config, sort_keys=True))
    shapes = _shapes_by_arch.get(key)
    if shapes is None:
        try:
            with torch.device("meta"):
                twin = build_model(model.name, **model.config)
            if type(twin) is not cls or twin.num_blocks != model.num_blocks:
                raise TypeError("not a registry model")
            twin.eval()
            shapes = _trace_shapes(twin.blocks, torch.zeros(1, *model.input_shape, device="meta"))
            _shapes_by_arch[key] = shapes
        except Exception:
            # A model built outside the registry: a real forward on a copy, in eval mode.
            twin_blocks = copy.deepcopy(model.blocks).cpu().eval()
            shapes = _trace_shapes(twin_blocks, torch.zeros(1, *model.input_shape))
    _shapes_by_model[model] = shapes
    return shapes


def activation_shape(model: BlockModel, point: int) -> tuple[int, ...]:
    """Per-sample shape of the tensor crossing split point ``point`` (0..L)."""
    _check_point(model, point, 0, model.num_blocks, "split point")
    return activation_shapes(model)[point]


# ---------------------------------------------------------------------------------------------
# ONNX export


def _default_exporter() -> str:
    return os.environ.get(EXPORTER_ENV, "").strip().lower() or "torchscript"


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' warnings and log chatter (deprecations, tracer notes, progress)."""
    names = ["torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _export_torchscript(module: nn.Module, example: Tensor, in_name: str, out_name: str) -> bytes:
    import io

    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buf,
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        opset_version=ONNX_OPSET,
        do_constant_folding=True,
        dynamo=False,
        verbose=False,
    )
    return buf.getvalue()


def _export_dynamo(module: nn.Module, example: Tensor, in_name: str, out_name: str) -> bytes:
    program = torch.onnx.export(
        module,
        (example,),
        None,
        input_names=[in_name],
        output_names=[out_name],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=max(ONNX_OPSET, 18),  # the dynamo exporter's native minimum
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:  # pragma: no cover - torch returns a program when f is None
        raise RuntimeError("the dynamo exporter returned no program")
    return program.model_proto.SerializeToString()


def _opset(proto: Any) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _export(
    module: nn.Module,
    example: Tensor,
    in_name: str,
    out_name: str,
    path: Path,
    metadata: dict[str, str],
    exporter: str | None,
) -> Path:
    import onnx

    explicit = bool(exporter) or bool(os.environ.get(EXPORTER_ENV, "").strip())
    exporter = exporter or _default_exporter()
    if exporter not in EXPORTERS:
        raise PartitionError(
            f"unknown ONNX exporter {exporter!r} (argument or ${EXPORTER_ENV}); "
            f"choose one of {', '.join(EXPORTERS)}"
        )
    # Export a CPU copy in eval mode: BatchNorm uses its running stats, Dropout is off, and the
    # caller's (possibly shared, possibly training) model is left untouched.
    module = copy.deepcopy(module).cpu().eval().requires_grad_(False)
    example = example.detach().cpu()
    # The default (torchscript) falls back to dynamo, e.g. on a torch without the legacy exporter.
    order = [exporter] if explicit else [exporter] + [e for e in EXPORTERS if e != exporter]
    errors: list[str] = []
    data, used = None, exporter
    for used in order:
        try:
            with _quiet_export(), torch.no_grad():
                if used == "torchscript":
                    data = _export_torchscript(module, example, in_name, out_name)
                else:
                    data = _export_dynamo(module, example, in_name, out_name)
            break
        except Exception as exc:  # try the next exporter, then report every failure
            errors.append(f"{used}: {type(exc).__name__}: {exc}")
    if data is None:
        raise PartitionError(f"ONNX export to {path} failed: " + " | ".join(errors))
    if errors:
        _log.warning("ONNX export fell back to the %s exporter after: %s", used, " | ".join(errors))
    proto = onnx.load_from_string(data)
    for key, value in {**metadata, "testbed.exporter": used, "testbed.opset": str(_opset(proto))}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise PartitionError(f"exported ONNX graph for {path} fails onnx.checker: {exc}") from exc
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def _example(shape: tuple[int, ...]) -> Tensor:
    """A tracing input of batch 2 (not 1, which an exporter may specialise on); a private
    generator keeps the caller's global RNG stream untouched."""
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def _base_metadata(model: BlockModel, part: str, point: int) -> dict[str, str]:
    return {
        "testbed.model": model.name,
        "testbed.config": json.dumps(model.config, sort_keys=True),
        "testbed.part": part,
        "testbed.split": str(point),
        "testbed.num_blocks": str(model.num_blocks),
    }


def export_head(
    model: BlockModel,
    a: int,
    path: Path,
    *,
    metadata: dict[str, str] | None = None,
    exporter: str | None = None,
) -> Path:
    """Export the head ``blocks[0:a]`` as a single-file ONNX graph: input ``x`` (N, *input_shape),
    output ``a1`` (N, *activation_shape(a)), dynamic batch axis N. Written atomically; returns ``path``."""
    _check_point(model, a, 1, model.num_blocks - 1, "head split point a")
    example = _example(model.input_shape)
    meta = {**_base_metadata(model, "head", a), **(metadata or {})}
    return _export(nn.Sequential(*list(model.blocks)[:a]), example, "x", "a1", path, meta, exporter)


def export_tail(
    model: BlockModel,
    b: int,
    path: Path,
    *,
    metadata: dict[str, str] | None = None,
    exporter: str | None = None,
) -> Path:
    """Export the tail ``blocks[b:L]`` as a single-file ONNX graph: input ``a2`` (N, *activation_shape(b)),
    output ``logits`` (N, num_classes), dynamic batch axis N. Written atomically; returns ``path``."""
    _check_point(model, b, 1, model.num_blocks - 1, "tail split point b")
    example = _example(activation_shape(model, b))
    meta = {**_base_metadata(model, "tail", b), **(metadata or {})}
    return _export(nn.Sequential(*list(model.blocks)[b:]), example, "a2", "logits", path, meta, exporter)


# ---------------------------------------------------------------------------------------------
# Artifact cache


class ArtifactCache:
    """Exported heads and tails on disk, keyed by weights hash and split point.

    Layout: ``root/<hash[:16]>/head_a<a>.onnx`` and ``root/<hash[:16]>/tail_b<b>.onnx``.
    A head depends only on ``a`` and a tail only on ``b``, so the partitions of one
    model share them. Files are written atomically (temporary file + rename), so two
    processes racing on the same artifact both end with a complete file. On a miss
    the model is checked against ``weights_hash`` before exporting, so an artifact is
    never filed under the wrong hash.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        #: Number of graphs this instance has exported (cache misses).
        self.exports = 0

    def head_path(self, weights_hash: str, a: int) -> Path:
        """Where the head for ``(weights_hash, a)`` lives (whether or not it exists yet)."""
        digest = _check_hash(weights_hash, "artifact cache")
        return self.root / digest[:16] / f"head_a{int(a):02d}.onnx"

    def tail_path(self, weights_hash: str, b: int) -> Path:
        """Where the tail for ``(weights_hash, b)`` lives (whether or not it exists yet)."""
        digest = _check_hash(weights_hash, "artifact cache")
        return self.root / digest[:16] / f"tail_b{int(b):02d}.onnx"

    @staticmethod
    def _verify(model: BlockModel, weights_hash: str) -> str:
        """The model's full state hash, after checking that it is ``weights_hash`` (or extends it)."""
        actual = state_hash(model)
        if not actual.startswith(weights_hash.lower()):
            raise WeightsError(
                f"the model's weights hash to {actual[:16]}…, not {weights_hash[:16]}…; "
                "pass the hash returned by save_weights/load_weights for these weights"
            )
        return actual

    @staticmethod
    def _present(path: Path) -> bool:
        try:
            return path.is_file() and path.stat().st_size > 0
        except OSError:
            return False

    def _ensure(
        self, kind: str, model: BlockModel, weights_hash: str, point: int, full_hash: str | None
    ) -> Path:
        if kind == "head":
            _check_point(model, point, 1, model.num_blocks - 1, "head split point a")
            path = self.head_path(weights_hash, point)
        else:
            _check_point(model, point, 1, model.num_blocks - 1, "tail split point b")
            path = self.tail_path(weights_hash, point)
        if self._present(path):
            return path
        if full_hash is None:
            full_hash = self._verify(model, weights_hash)
        meta = {"testbed.weights_hash": full_hash}
        export = export_head if kind == "head" else export_tail
        export(model, point, path, metadata=meta)
        self.exports += 1
        return path

    def head(self, model: BlockModel, weights_hash: str, a: int) -> Path:
        """The head ONNX for ``blocks[0:a]`` of these weights, exporting it if missing."""
        return self._ensure("head", model, weights_hash, a, full_hash=None)

    def tail(self, model: BlockModel, weights_hash: str, b: int) -> Path:
        """The tail ONNX for ``blocks[b:L]`` of these weights, exporting it if missing."""
        return self._ensure("tail", model, weights_hash, b, full_hash=None)

    def partition(self, model: BlockModel, weights_hash: str, a: int, b: int) -> tuple[Path, Path]:
        """``(head, tail)`` ONNX paths for ``PartitionId(weights_hash, a, b)``."""
        check_split(model, a, b)
        pid = PartitionId(weights_hash, a, b)  # validates the hash
        head_path, tail_path = self.head_path(pid.weights_hash, a), self.tail_path(pid.weights_hash, b)
        full_hash = None
        if not (self._present(head_path) and self._present(tail_path)):
            full_hash = self._verify(model, pid.weights_hash)  # hash once for both exports
        return (
            self._ensure("head", model, pid.weights_hash, a, full_hash),
            self._ensure("tail", model, pid.weights_hash, b, full_hash),
        )
