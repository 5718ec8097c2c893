"""Weights files: safetensors with the model's name, config and state hash as metadata.

The state hash identifies a set of weights everywhere in the testbed (partition
ids, the artifact cache, the agents' handshakes). It is computed from the
tensors alone, over a canonical encoding (sorted names, dtype, shape, raw
bytes), so it does not depend on the file format, the metadata or the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from testbed.errors import ModelError, WeightsError
from testbed.models.blocks import BlockModel, build_model

__all__ = ["load_weights", "read_weights_info", "save_weights", "state_hash"]

FORMAT_VERSION = "1"
_KEY_FORMAT = "testbed.format"
_KEY_MODEL = "testbed.model"
_KEY_CONFIG = "testbed.config"
_KEY_HASH = "testbed.state_hash"
_HASH_DOMAIN = b"testbed.state_hash.v1\n"


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def state_hash(model: nn.Module | Mapping[str, Tensor]) -> str:
    """SHA-256 hex digest of a model's state dict (or of a name -> tensor mapping).

    Each entry contributes its name, dtype, shape and raw bytes, in sorted-name
    order, every field length-prefixed so no two different states encode alike.
    Parameters and buffers (BatchNorm running stats included) are covered.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256(_HASH_DOMAIN)
    h.update(_u64(len(state)))
    for name in sorted(state):
        t = state[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        for field in (name.encode(), str(t.dtype).removeprefix("torch.").encode()):
            h.update(_u64(len(field)))
            h.update(field)
        h.update(_u64(t.dim()))
        for d in t.shape:
            h.update(_u64(int(d)))
        raw = t.reshape(-1).view(torch.uint8).numpy()
        h.update(_u64(raw.nbytes))
        h.update(raw.data)
    return h.hexdigest()


def save_weights(model: BlockModel, path: Path) -> str:
    """Write ``model``'s weights to a safetensors file atomically; return the state hash.

    The metadata records the model name, its config (JSON) and the state hash, so
    :func:`load_weights` can rebuild and verify the model from the file alone.
    The parent directory is created if needed.
    """
    if not isinstance(model, BlockModel):
        raise WeightsError(
            f"save_weights needs a BlockModel (from build_model), got {type(model).__name__}"
        )
    path = Path(path)
    state = model.state_dict()
    digest = state_hash(state)
    # Clone: safetensors refuses tensors that share storage, and CUDA tensors must come to the CPU.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    metadata = {
        _KEY_FORMAT: FORMAT_VERSION,
        _KEY_MODEL: model.name,
        _KEY_CONFIG: json.dumps(model.config, sort_keys=True),
        _KEY_HASH: digest,
    }
    data = safetensors_save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    return digest


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_metadata(path: Path) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weights path is not a file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as exc:  # safetensors raises its own error type, or OSError
        raise WeightsError(
            f"{path} is not a readable safetensors weights file ({exc}); "
            "expected a file written by save_weights / `testbed train`"
        ) from exc
    missing = [k for k in (_KEY_MODEL, _KEY_CONFIG, _KEY_HASH) if not meta or k not in meta]
    if missing:
        raise WeightsError(
            f"{path} is a safetensors file but lacks the testbed metadata ({', '.join(missing)}); "
            "it was not written by save_weights"
        )
    return dict(meta)


def read_weights_info(path: Path) -> dict[str, Any]:
    """``{"name", "config", "hash"}`` of a weights file, read from its header without loading tensors."""
    meta = _read_metadata(path)
    try:
        config = json.loads(meta[_KEY_CONFIG])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: the recorded model config is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: the recorded model config is not a JSON object")
    return {"name": meta[_KEY_MODEL], "config": config, "hash": meta[_KEY_HASH]}


def load_weights(path: Path) -> tuple[BlockModel, str]:
    """Rebuild the model recorded in a weights file, load it, verify its hash; return ``(model, hash)``.

    The model is returned on the CPU in ``eval()`` mode. Raises :class:`WeightsError`
    if the file is missing, is not a testbed safetensors file, does not fit the
    recorded architecture, or its tensors do not hash to the recorded value
    (corrupt or tampered).
    """
    path = Path(path)
    info = read_weights_info(path)
    try:
        model = build_model(info["name"], **info["config"])
    except ModelError as exc:
        raise WeightsError(f"{path}: cannot rebuild the recorded model: {exc}") from exc
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read the tensors ({exc}); the file is corrupt") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path}: the tensors do not fit model {info['name']!r} with config {info['config']}: {exc}"
        ) from exc
    digest = state_hash(model)
    if digest != info["hash"]:
        raise WeightsError(
            f"{path}: the weights hash to {digest[:16]}… but the file records {info['hash'][:16]}…; "
            "the file is corrupt or was modified after it was saved"
        )
    model.eval()
    return model, digest
