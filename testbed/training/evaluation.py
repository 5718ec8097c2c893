"""The models the devices hold, assembled whole (head and tail + the edge's body), evaluated and exported."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from testbed.models import BlockModel, build_model
from testbed.models.weights import atomic_write_bytes, save_weights, state_hash
from testbed.training.checkpoint import RunState
from testbed.training.experiment import ExperimentSpec
from testbed.training.preparation import Prepared

__all__ = ["assemble", "evaluate", "evaluate_all", "export_models", "models_to_evaluate"]


def assemble(spec: ExperimentSpec, init: BlockModel, device_state: Mapping[str, np.ndarray] | None,
             edge_state: Mapping[str, np.ndarray] | None, index: int, edge_copy: str) -> BlockModel:
    """Device ``index``'s whole model: its head and tail, and the edge's body (copy ``edge_copy``)."""
    model = build_model(spec.model.name, **spec.model.kwargs())
    merged = {k: v.clone() for k, v in init.state_dict().items()}
    for source, prefix in ((edge_state, f"w/{edge_copy}/"), (device_state, "w/main/")):
        for key, arr in (source or {}).items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if name in merged:
                    merged[name] = torch.from_numpy(np.array(arr, copy=True))
    model.load_state_dict(merged, strict=True)
    model.eval()
    return model


@torch.inference_mode()
def evaluate(model: BlockModel, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a test set."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))
        yb = torch.from_numpy(np.ascontiguousarray(y[i : i + batch_size]))
        logits = model(xb)
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return correct / n, loss / n


def models_to_evaluate(prep: Prepared, state: RunState) -> dict[str, BlockModel]:
    """The models the devices hold now: per device (deduplicated by weights), the sl holder's only."""
    spec = prep.spec
    if spec.scheme == "centralized":
        return {"central": assemble(spec, prep.init_model, state.parties.get("central"), None, 0, "main")}
    names = spec.device_names
    indices = [state.holder] if spec.scheme == "sl" else list(range(spec.devices))
    out: dict[str, BlockModel] = {}
    for i in indices:
        copy = names[i] if spec.scheme == "sfl" else "main"
        out[names[i]] = assemble(spec, prep.init_model, state.parties.get(names[i]), state.parties.get("edge"), i,
                                 copy)
    return out


def evaluate_all(prep: Prepared, state: RunState) -> tuple[dict[str, dict[str, Any]], dict[str, BlockModel]]:
    models = models_to_evaluate(prep, state)
    results: dict[str, dict[str, Any]] = {}
    seen: dict[str, dict[str, Any]] = {}
    torch.set_num_threads(prep.spec.runtime.eval_threads)
    for name, model in models.items():
        digest = state_hash(model)
        if digest not in seen:
            acc, loss = evaluate(model, prep.x_test, prep.y_test, prep.spec.runtime.eval_batch_size)
            seen[digest] = {"test_acc": acc, "test_loss": loss, "weights": digest}
        results[name] = dict(seen[digest])
    return results, models


def export_models(prep: Prepared, state: RunState) -> dict[str, Any]:
    """Save each distinct trained model and export its devices' heads and tails to ONNX."""
    from testbed.partition import ArtifactCache, PartitionId

    spec = prep.spec
    out_dir = prep.run_dir / "export"
    models = models_to_evaluate(prep, state)
    cache = ArtifactCache(out_dir / "onnx")
    exported: dict[str, Any] = {}
    by_hash: dict[str, str] = {}
    for name, model in models.items():
        digest = state_hash(model)
        weights = out_dir / f"model-{digest[:16]}.safetensors"
        if digest not in by_hash:
            save_weights(model, weights)
            by_hash[digest] = str(weights)
        entry: dict[str, Any] = {"weights": str(weights), "weights_hash": digest}
        if spec.scheme != "centralized" and spec.runtime.export_onnx:
            index = spec.device_names.index(name)
            a, b = spec.splits[index]
            head, tail = cache.partition(model, digest, a, b)
            entry.update(partition=str(PartitionId(digest, a, b)), head=str(head), tail=str(tail))
        exported[name] = entry
    if spec.scheme == "sl":  # every device continues from the last holder's model
        for name in spec.device_names:
            exported.setdefault(name, exported[spec.device_names[state.holder]])
    atomic_write_bytes(out_dir / "models.json", json.dumps(exported, indent=2).encode())
    return exported
