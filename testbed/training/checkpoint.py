"""The run's checkpoint: every party's weights and optimizer state, the sl holder and the per-round records.

One safetensors file, written atomically (temporary file, fsync, rename) after every round; its metadata
carries the experiment's identity hash, so ``--resume`` with a changed experiment is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.models.weights import atomic_write_bytes
from testbed.training.errors import RunFailed
from testbed.training.experiment import ExperimentSpec

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "RunState", "check_identity", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "1"


@dataclass
class RunState:
    """Everything a checkpoint holds: the parties' states, the sl holder, and the per-round records."""

    completed: int = 0
    parties: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    holder: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(path: Path, spec: ExperimentSpec, state: RunState, init_hash: str) -> None:
    from safetensors.numpy import save

    tensors = {f"{party}#{name}": np.ascontiguousarray(arr) for party, arrs in state.parties.items()
               for name, arr in arrs.items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "identity": spec.identity_hash(),
        "init_hash": init_hash,
        "completed": str(state.completed),
        "holder": str(state.holder),
        "history": json.dumps(state.history),
    }
    atomic_write_bytes(path, save(tensors, metadata=meta))


def check_identity(path: Path, spec: ExperimentSpec) -> dict[str, str]:
    """The checkpoint's metadata, after checking that it belongs to this experiment (reads no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise RunFailed(f"cannot read checkpoint {path}: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunFailed(f"{path} is not a training checkpoint of this version")
    if meta.get("identity") != spec.identity_hash():
        raise RunFailed(
            f"{path} belongs to a different experiment (the model, data or training settings changed); "
            "resume with the same YAML, or start afresh with --fresh"
        )
    return meta


def load_checkpoint(path: Path, spec: ExperimentSpec) -> tuple[RunState, str]:
    from safetensors.numpy import load_file

    meta = check_identity(path, spec)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise RunFailed(f"cannot read checkpoint {path}: {exc}") from exc
    parties: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        party, name = key.split("#", 1)
        parties.setdefault(party, {})[name] = arr
    state = RunState(int(meta["completed"]), parties, int(meta["holder"]), json.loads(meta["history"]))
    return state, meta["init_hash"]
