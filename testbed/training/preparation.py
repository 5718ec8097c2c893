"""Before a run: the data loaded and partitioned, one shard file per device, the seeded initial model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from testbed.models import BlockModel, build_model
from testbed.models.weights import atomic_write_bytes, state_hash
from testbed.training.experiment import ExperimentSpec, device_steps, max_batch, plan_round

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    spec: ExperimentSpec
    run_dir: Path
    x_test: np.ndarray
    y_test: np.ndarray
    shards: list[tuple[np.ndarray, np.ndarray]]  # per device (centralized: one, all the data)
    sizes: list[int]
    total_rounds: int
    dataset_name: str
    init_model: BlockModel
    init_hash: str
    steps: list[int]  # per device and epoch (centralized: one)
    batch_sizes: list[int]  # the largest batch of each device


def _subset(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    if n is None:
        return x, y
    return x[:n], y[:n]


_DATASET_CACHE: dict[tuple[str, str], Any] = {}


def _load_dataset(name: str) -> Any:
    """The dataset, decoded once per process (a benchmark or a test suite runs several experiments)."""
    from testbed.training.datasets import load_dataset

    key = (name, os.environ.get("TESTBED_FASHION_MNIST_DIR", ""))
    if key not in _DATASET_CACHE:
        _DATASET_CACHE.clear()  # keep one: Fashion-MNIST is about 220 MB as float32
        _DATASET_CACHE[key] = load_dataset(name)
    return _DATASET_CACHE[key]


def prepare(spec: ExperimentSpec, run_dir: Path) -> Prepared:
    """Load and partition the data, write the device shards, build the initial model (seeded)."""
    from testbed.training.partitioning import partition

    dataset = _load_dataset(spec.data.dataset)
    x_train, y_train = _subset(dataset.x_train, dataset.y_train, spec.data.train_samples)
    x_test, y_test = _subset(dataset.x_test, dataset.y_test, spec.data.test_samples)
    if spec.scheme == "centralized":
        parts = [np.arange(len(y_train), dtype=np.int64)]
    else:
        parts = partition(y_train, spec.devices, spec.data.partition, spec.training.seed,
                          alpha=spec.data.alpha, min_samples=spec.data.min_samples)
    sizes = [len(p) for p in parts]
    t = spec.training
    steps = device_steps(t.batch_sizes, sizes, t.batch_size)  # these raise ExperimentError if the
    plan_round(spec.scheme, sizes, t.batch_size, t.rounds_per_epoch, t.fedavg_every, 0, steps)  # schedule can't work
    batch_sizes = [max_batch(t.batch_sizes, n, t.batch_size, k) for n, k in zip(sizes, steps, strict=True)]
    shards = [(np.ascontiguousarray(x_train[p]), np.ascontiguousarray(y_train[p])) for p in parts]
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec.scheme != "centralized":
        data_dir = run_dir / "data"
        data_dir.mkdir(exist_ok=True)
        for name, (x, y) in zip(spec.device_names, shards, strict=True):
            path = data_dir / f"{name}.npz"
            tmp = data_dir / f".{name}.{os.getpid()}.npz"
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
    atomic_write_bytes(run_dir / "experiment.json", json.dumps(spec.to_dict(), indent=2).encode())
    torch.manual_seed(spec.training.seed)
    model = build_model(spec.model.name, **spec.model.kwargs())
    return Prepared(
        spec=spec, run_dir=run_dir, x_test=x_test, y_test=y_test, shards=shards, sizes=sizes,
        total_rounds=spec.training.epochs * spec.training.rounds_per_epoch, dataset_name=dataset.name,
        init_model=model, init_hash=state_hash(model), steps=steps,
        batch_sizes=batch_sizes,
    )
