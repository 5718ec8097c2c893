"""What `testbed run` needs before any process starts: weights, the planning problem, data shards, partitions.

Each piece is built from the validated :class:`~testbed.controller.runspec.RunSpec` and nothing else, so a run is
described by its file: the weights are trained once per (model, dataset) and cached as `testbed demo` does (or
read from the file the spec names), the planning problem has one device per spec device (its link profile and
class, its spec id), and every partition the plan asks for is exported once and cached by content.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from testbed.controller.replan import rename_devices
from testbed.controller.runspec import CACHED_WEIGHTS, RunSpec
from testbed.errors import TestbedError
from testbed.partition import ArtifactCache, PartitionId
from testbed.planning.model import PlanningProblem

Say = Callable[[str], None]

#: The rate the planner assumes for an unshaped (unlimited) link direction: loopback, about 10 Gbit/s.
UNSHAPED_RATE_BPS = 10e9


class RunSetupError(TestbedError):
    """Something the run needs before it starts is missing or unusable."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("TESTBED_CACHE", Path.home() / ".cache" / "edge-split-testbed"))


@dataclasses.dataclass(frozen=True)
class Weights:
    model: Any  # testbed.models.BlockModel
    path: Path
    weights_hash: str


def needs_dataset(spec: RunSpec) -> bool:
    return spec.weights == CACHED_WEIGHTS or any(d.data == "shard" for d in spec.devices)


def load_run_weights(spec: RunSpec, dataset: Any, cache_dir: Path, say: Say) -> Weights:
    """The spec's weights file, or the demo's cached training (train once per model and dataset)."""
    from testbed.models.weights import load_weights

    if spec.weights == CACHED_WEIGHTS:
        if spec.model.config:
            raise RunSetupError(f"weights: {CACHED_WEIGHTS} trains the zoo's default {spec.model.name!r}; with "
                                "model.config give a weights file of that model instead")
        from testbed.demo import DemoConfig, trained_model

        model, path, weights_hash = trained_model(DemoConfig(model=spec.model.name, cache_dir=cache_dir),
                                                  dataset, say)
        return Weights(model, path, weights_hash)
    assert isinstance(spec.weights, Path)
    model, weights_hash = load_weights(spec.weights)
    return Weights(model, spec.weights, weights_hash)


def write_shards(spec: RunSpec, dataset: Any, out_dir: Path) -> dict[str, Path]:
    """Each `data: shard` device's share of the test set (its labels stay with it), as an .npz per device."""
    ids = [d.id for d in spec.devices if d.data == "shard"]
    if not ids:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for dev, idx in zip(ids, np.array_split(np.arange(len(dataset.y_test)), len(ids)), strict=True):
        path = out_dir / f"{dev}-data.npz"
        np.savez(path, x=dataset.x_test[idx], y=dataset.y_test[idx])
        paths[dev] = path.resolve()
    return paths


def build_run_problem(spec: RunSpec, links: Mapping[str, Any] | None = None) -> PlanningProblem:
    """One planner device per spec device (its link profile and class), named by the spec's ids.

    ``links``: measured links (testbed.profiling.records.LinkMeasurement) per device id, used instead of the
    device's link profile (rates, delay and the edge's measured per-request handling)."""
    from testbed.profiling.problem import build_problem

    planner, workload = spec.planner, spec.workload
    if planner.device_profile is None:
        raise RunSetupError("planner.device_profile is required for now: profile the devices with `testbed "
                            "profile --runtime onnxruntime` and name the file (profiling inside a run is not "
                            "implemented yet)")
    devices = []
    problem: PlanningProblem | None = None
    for i, dev in enumerate(spec.devices):
        problem = build_problem(
            planner.device_profile, [(links or {}).get(dev.id, dev.link)], devices=1, mode=spec.mode,
            device_classes=[dev.device_class] if dev.device_class else (), edge_profile=planner.edge_profile,
            edge_class=spec.edge.device_class, batch_size=workload.batch_size if workload else None,
            unlimited_rate_bps=UNSHAPED_RATE_BPS)
        devices.append(dataclasses.replace(problem.devices[0], name=f"device-{i}"))
    assert problem is not None
    return rename_devices(dataclasses.replace(problem, devices=tuple(devices)), [d.id for d in spec.devices])


class Partitions:
    """Head and tail ONNX bytes per split, exported once (content-addressed cache) and kept in memory."""

    def __init__(self, weights: Weights, cache_dir: Path) -> None:
        self.weights = weights
        self.cache = ArtifactCache(cache_dir / "onnx")
        self._bytes: dict[tuple[int, int], tuple[str, bytes, bytes]] = {}

    def get(self, a: int, b: int) -> tuple[str, bytes, bytes]:
        """(partition id, head bytes, tail bytes) of split (a, b)."""
        if (a, b) not in self._bytes:
            head, tail = self.cache.partition(self.weights.model, self.weights.weights_hash, a, b)
            pid = str(PartitionId(self.weights.weights_hash, a, b))
            self._bytes[(a, b)] = (pid, head.read_bytes(), tail.read_bytes())
        return self._bytes[(a, b)]
