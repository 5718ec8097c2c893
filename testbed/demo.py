"""The demo: U-shaped split inference of a trained CNN, several devices, one edge server, on loopback.

Controller side only: it trains (or loads) the model, exports each device's head and tail to ONNX,
gives every device its own shard of the test set, starts the edge server and the device agents as
separate processes, and summarises what the devices report. Labels stay with the devices: each
reports only how many of its predictions were right.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.errors import TestbedError
from testbed.models import BlockModel, build_model
from testbed.models.weights import load_weights, save_weights
from testbed.partition import ArtifactCache, PartitionId, check_split, valid_splits
from testbed.stats import percentiles_ms
from testbed.supervisor import ProcessGroup
from testbed.training.centralized import TrainConfig, predict, train_centralized
from testbed.training.datasets import Dataset, load_dataset

STAGES = ("head", "uplink", "queue", "body", "downlink", "tail")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 3
    model: str = "cnn"
    dataset: str = "auto"
    batch_size: int = 10
    limit: int | None = None  # test images to classify (None: the whole test set)
    splits: tuple[tuple[int, int], ...] | None = None  # one per device; None: spread over the valid ones
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path = Path(os.environ.get("TESTBED_CACHE", Path.home() / ".cache" / "edge-split-testbed"))
    run_dir: Path = Path("runs/demo")
    edge_threads: int = 1
    agent_threads: int = 1
    timeout_s: float = 600.0


@dataclass(frozen=True)
class Placement:
    """Where the demo's processes run: loopback by default, or inside the emulated lab's hosts."""

    edge_bind: str = "tcp://127.0.0.1:*"
    wrap: Callable[[str, list[str]], list[str]] = field(default=lambda host, argv: argv)
    max_devices: int | None = None
    description: str = "loopback"
    agent_args: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per device, e.g. --slowdown


def choose_splits(num_blocks: int, devices: int) -> list[tuple[int, int]]:
    """Different splits with a non-empty body, spread evenly over the valid ones."""
    candidates = [(a, b) for a, b in valid_splits(num_blocks) if a < b]
    if devices == 1:
        return [candidates[len(candidates) // 2]]
    step = (len(candidates) - 1) / (devices - 1)
    return [candidates[round(i * step) % len(candidates)] for i in range(devices)]


def _weights_key(config: DemoConfig, dataset: Dataset) -> str:
    spec = {"model": config.model, "dataset": dataset.name, "train": config.train.as_dict()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def trained_model(config: DemoConfig, dataset: Dataset, say: Progress) -> tuple[BlockModel, Path, str]:
    """Train once per (model, dataset, training config); later runs load the cached weights."""
    path = config.cache_dir / "weights" / f"{config.model}-{dataset.name}-{_weights_key(config, dataset)}.safetensors"
    if path.exists():
        model, weights_hash = load_weights(path)
        say(f"loaded trained {config.model} from {path} (weights {weights_hash[:16]})")
        return model, path, weights_hash
    model = build_model(config.model)
    n = len(dataset.x_train) if config.train.max_train_samples is None else config.train.max_train_samples
    say(f"training {config.model} on {min(n, len(dataset.x_train))} {dataset.name} images, "
        f"{config.train.epochs} epoch(s) (cached afterwards)")

    def on_step(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 10) == 0:
            say(f"  step {step}/{total}  loss {loss:.3f}")

    train_centralized(model, dataset.x_train, dataset.y_train, config.train, on_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_hash = save_weights(model, path)
    return model, path, weights_hash


def summarise(result: dict[str, Any], reference_correct: int) -> dict[str, Any]:
    stages = result["stages_ms"]
    return {
        "device": result["device"],
        "split": result["split"],
        "partition": result["partition"],
        "stages": {s: percentiles_ms(stages[s]) for s in STAGES},
        "e2e": percentiles_ms(stages["e2e"]),
        "requests": result["requests"],
        "samples": result["samples"],
        "throughput_rps": round(result["throughput_rps"], 2),
        "accuracy": result["accuracy"],
        "reference_accuracy": reference_correct / result["samples"] if result["samples"] else 0.0,
    }


def run_demo(config: DemoConfig, say: Progress = print, placement: Placement | None = None) -> dict[str, Any]:
    placement = placement or Placement()
    if config.devices < 1:
        raise TestbedError("--devices must be at least 1")
    if placement.max_devices is not None and config.devices > placement.max_devices:
        raise TestbedError(f"{config.devices} devices asked for, but the lab has {placement.max_devices}: "
                           f"use --devices {placement.max_devices} or a bigger lab")
    if config.batch_size < 1:
        raise TestbedError("--batch-size must be at least 1")
    dataset = load_dataset(config.dataset)
    say(f"dataset: {dataset.name} ({dataset.source}), {len(dataset.x_test)} test images")
    model, weights_path, weights_hash = trained_model(config, dataset, say)

    splits = list(config.splits) if config.splits else choose_splits(model.num_blocks, config.devices)
    if len(splits) != config.devices:
        raise TestbedError(f"{len(splits)} splits given for {config.devices} devices")
    for a, b in splits:
        check_split(model, a, b)

    x_test, y_test = dataset.x_test, dataset.y_test
    if config.limit is not None:
        x_test, y_test = x_test[: config.limit], y_test[: config.limit]
    reference_pred = predict(model, x_test)
    reference_accuracy = float((reference_pred == y_test).mean())

    cache = ArtifactCache(config.cache_dir / "onnx")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob("*.json"):
        stale.unlink()
    say(f"exporting heads and tails to ONNX for splits {splits}")
    shards = np.array_split(np.arange(len(y_test)), config.devices)
    devices = []
    for i, ((a, b), idx) in enumerate(zip(splits, shards, strict=True)):
        head, tail = cache.partition(model, weights_hash, a, b)
        data_path = run_dir / f"dev{i + 1}-data.npz"
        np.savez(data_path, x=x_test[idx], y=y_test[idx])
        reference_correct = int((reference_pred[idx] == y_test[idx]).sum())
        devices.append((f"dev{i + 1}", PartitionId(weights_hash, a, b), head, tail, data_path, reference_correct))

    python = sys.executable
    summaries = []
    with ProcessGroup(run_dir / "logs") as group:
        ready_file = run_dir / "edge-ready.json"
        ready_file.unlink(missing_ok=True)
        edge = group.start("edge", placement.wrap("edge", [
            python, "-m", "agents.edge", "--weights", str(weights_path), "--bind", placement.edge_bind,
            "--threads", str(config.edge_threads), "--ready-file", str(ready_file), "--parent-pid", str(os.getpid()),
        ]))
        info = group.wait_ready(edge, ready_file, timeout_s=60)
        say(f"edge server up on {info['endpoint']} ({info['device']}, {placement.description}); "
            f"starting {config.devices} device agents")
        agents = []
        for name, pid, head, tail, data_path, _ in devices:
            agents.append(group.start(name, placement.wrap(name, [
                python, "-m", "agents.device", "infer", "--edge", info["endpoint"], "--device-id", name,
                "--head", str(head), "--tail", str(tail), "--partition", str(pid), "--data", str(data_path),
                "--batch-size", str(config.batch_size), "--threads", str(config.agent_threads),
                "--out", str(run_dir / f"{name}-result.json"), "--parent-pid", str(os.getpid()),
                *placement.agent_args.get(name, ()),
            ])))
        (run_dir / "pids.json").write_text(json.dumps(group.pids()))
        group.wait_all(agents, watch=[edge], timeout_s=config.timeout_s)
    for name, _, _, _, _, reference_correct in devices:
        result = json.loads((run_dir / f"{name}-result.json").read_text())
        summaries.append(summarise(result, reference_correct))

    total = sum(s["samples"] for s in summaries)
    correct = sum(round(s["accuracy"] * s["samples"]) for s in summaries)
    report = {
        "dataset": dataset.name,
        "placement": placement.description,
        "model": config.model,
        "weights": weights_hash,
        "batch_size": config.batch_size,
        "devices": summaries,
        "accuracy": correct / total if total else 0.0,
        "reference_accuracy": reference_accuracy,
    }
    return report
