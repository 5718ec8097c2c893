"""Model state the training parties share: named arrays, optimizers, FedAvg, who holds which blocks.

A party (a device, the edge) holds model copies restricted to the blocks it owns; its state moves over
the control plane as named numpy arrays: ``w/<copy>/<state-dict key>`` (weights and buffers) and
``o/<copy>/<parameter>/<optimizer field>`` (optimizer state). Imported by the agents: no dataset here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from testbed.models import BlockModel, build_model
from testbed.training.errors import ProtocolError
from testbed.training.experiment import ExperimentError, ExperimentSpec, TrainingSpec, parse_experiment
from testbed.wire.messages import META

__all__ = [
    "Party",
    "device_blocks",
    "edge_blocks",
    "edge_copies",
    "fedavg",
    "in_blocks",
    "load_spec_json",
    "make_optimizer",
]


def make_optimizer(params: Iterable[nn.Parameter], training: TrainingSpec) -> torch.optim.Optimizer:
    params = list(params)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


def in_blocks(key: str, blocks: frozenset[int]) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) in blocks


class Party:
    """One participant's model copies, restricted to the blocks it owns, each with its own optimizer.

    A device has one copy (``main``) of its head and tail blocks; the psl/sl edge one copy of the
    body; the sfl edge one body copy per device. ``dump``/``load`` move the state (weights, buffers
    and optionally the optimizer state) as named numpy arrays.
    """

    def __init__(self, spec: ExperimentSpec, copies: Iterable[str], blocks: Iterable[int]) -> None:
        self.spec = spec
        self.blocks = frozenset(int(b) for b in blocks)
        self.models: dict[str, BlockModel] = {}
        self.params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for copy in copies:
            model = build_model(spec.model.name, **spec.model.kwargs())
            model.train()
            named = [(n, p) for n, p in model.named_parameters() if in_blocks(n, self.blocks)]
            self.models[copy] = model
            self.params[copy] = named
            self.optimizers[copy] = make_optimizer([p for _, p in named], spec.training)

    def state_keys(self, copy: str) -> list[str]:
        return [k for k in self.models[copy].state_dict() if in_blocks(k, self.blocks)]

    def dump(self, optimizer: bool = False) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for copy, model in self.models.items():
            for key, value in model.state_dict().items():
                if in_blocks(key, self.blocks):
                    out[f"w/{copy}/{key}"] = value.detach().cpu().numpy().copy()
            if optimizer:
                opt = self.optimizers[copy]
                for name, param in self.params[copy]:
                    for fname, fvalue in opt.state.get(param, {}).items():
                        if isinstance(fvalue, torch.Tensor):
                            out[f"o/{copy}/{name}/{fname}"] = fvalue.detach().cpu().numpy().copy()
                        else:  # pragma: no cover - torch keeps every field as a tensor
                            out[f"o/{copy}/{name}/{fname}"] = np.asarray(fvalue, dtype=np.float64)
        return out

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load weights (all required) and, if any ``o/`` entries are present, the whole optimizer state."""
        weights = {k: v for k, v in arrays.items() if k.startswith("w/")}
        opt_entries = {k: v for k, v in arrays.items() if k.startswith("o/")}
        unknown = sorted(set(arrays) - set(weights) - set(opt_entries) - {META})
        if unknown:
            raise ProtocolError(f"unexpected state entries {unknown[:4]}")
        for copy, model in self.models.items():
            keys = self.state_keys(copy)
            expected = {f"w/{copy}/{k}" for k in keys}
            given = {k for k in weights if k.startswith(f"w/{copy}/")}
            if given != expected:
                missing, extra = sorted(expected - given), sorted(given - expected)
                raise ProtocolError(f"state for copy {copy!r}: missing {missing[:4]}, unexpected {extra[:4]}")
            current = model.state_dict()
            with torch.no_grad():
                for key in keys:
                    arr = weights[f"w/{copy}/{key}"]
                    target = current[key]
                    if tuple(arr.shape) != tuple(target.shape):
                        raise ProtocolError(f"state {copy}/{key}: shape {arr.shape}, expected {tuple(target.shape)}")
                    target.copy_(torch.from_numpy(np.array(arr, copy=True)))
        if not opt_entries:
            return
        for copy in self.models:
            opt = self.optimizers[copy]
            by_name = dict(self.params[copy])
            opt.state.clear()
            for key, arr in opt_entries.items():
                _, c, rest = key.split("/", 2)
                if c != copy:
                    continue
                pname, fname = rest.rsplit("/", 1)
                param = by_name.get(pname)
                if param is None:
                    raise ProtocolError(f"optimizer state for unknown parameter {copy}/{pname}")
                opt.state[param][fname] = torch.from_numpy(np.array(arr, copy=True))
        known = {f"o/{c}/" for c in self.models}
        stray = [k for k in opt_entries if not any(k.startswith(p) for p in known)]
        if stray:
            raise ProtocolError(f"optimizer state for unknown copies {stray[:4]}")


def fedavg(states: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Weighted average of same-keyed states, entry by entry in a fixed order (deterministic).

    Float entries are averaged in float64 and cast back; integer entries (BatchNorm's batch counter)
    take the maximum.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state")
    keys = list(states[0])
    if any(list(s) != keys and set(s) != set(keys) for s in states):
        raise ProtocolError("fedavg: the states do not have the same entries")
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = states[0][key]
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros(first.shape, dtype=np.float64)
            for s, w in zip(states, weights, strict=True):
                acc += (w / total) * s[key].astype(np.float64)
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max(np.stack([s[key] for s in states]), axis=0).astype(first.dtype)
    return out


def device_blocks(spec: ExperimentSpec, index: int) -> list[int]:
    a, b = spec.splits[index]
    return [*range(0, a), *range(b, spec.num_blocks)]


def edge_blocks(spec: ExperimentSpec) -> list[int]:
    return list(range(min(a for a, _ in spec.splits), max(b for _, b in spec.splits)))


def edge_copies(spec: ExperimentSpec) -> list[str]:
    return list(spec.device_names) if spec.scheme == "sfl" else ["main"]


def load_spec_json(path: Path) -> ExperimentSpec:
    """The normalised experiment the controller wrote for its agents."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"cannot read {path}: {exc}") from exc
    return parse_experiment(data, source=str(path))
