"""The training run's live state for Prometheus: fed by `run_experiment`'s events, read at scrape time.

`TrainingMonitor.on_event` (chain it into `run_experiment(on_event=...)`) folds every finished round into a
new frozen snapshot under a lock; the exporter's thread reads the latest one. Nothing here starts a server:
`register(registry)` adds the collectors to the registry the caller passes in.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from testbed.metrics.controller import ControllerCollector, ControllerSnapshot, NodeState
from testbed.metrics.training import PHASES, DeviceTotals, TrainingCollector, TrainingSnapshot
from testbed.training.experiment import ExperimentSpec
from testbed.training.results import STAGES

__all__ = ["TrainingMonitor", "fold_round"]

Alive = Callable[[], Mapping[str, bool]]


def _add(pairs: tuple[tuple[str, float], ...], more: Mapping[str, float], known: tuple[str, ...]) -> tuple[
        tuple[str, float], ...]:
    """Sum per name, keeping only `known` names (bounded label values) in `known`'s order."""
    total = dict(pairs)
    for name, seconds in more.items():
        if name in known and seconds is not None:
            total[name] = total.get(name, 0.0) + float(seconds)
    return tuple((name, total[name]) for name in known if name in total)


def fold_round(snap: TrainingSnapshot, record: Mapping[str, Any]) -> TrainingSnapshot:
    """Pure: the snapshot after one more round (a record of rounds.json)."""
    train_s, sync_s = float(record.get("train_s") or 0.0), float(record.get("sync_s") or 0.0)
    phases = {"steps": max(train_s - sync_s, 0.0), "sync": sync_s, "collect": record.get("collect_s"),
              "eval": record.get("eval_s"), "checkpoint": record.get("checkpoint_s")}
    devices = {d.device: d for d in snap.devices}
    for dev in record.get("devices", []):
        old = devices.get(dev["device"], DeviceTotals(dev["device"]))
        devices[old.device] = DeviceTotals(
            device=old.device,
            samples=old.samples + int(dev.get("samples") or 0),
            bytes_up=old.bytes_up + int(dev.get("bytes_up") or 0),
            bytes_down=old.bytes_down + int(dev.get("bytes_down") or 0),
            control_bytes_up=old.control_bytes_up + int(dev.get("control_bytes_up") or 0),
            control_bytes_down=old.control_bytes_down + int(dev.get("control_bytes_down") or 0),
            stage_s=_add(old.stage_s, dev.get("times") or {}, STAGES),
            loss=dev.get("loss"),
            accuracy=dev.get("acc"),
        )
    return dataclasses.replace(
        snap,
        rounds_done=int(record.get("round", snap.rounds_done + 1)),
        test_loss=record.get("test_loss"),
        train_accuracy=record.get("train_acc"),
        round_s=record.get("wall_s"),
        phase_s=_add(snap.phase_s, phases, PHASES),
        devices=tuple(devices.values()),
    )


class TrainingMonitor:
    """`run_experiment(..., on_event=monitor.on_event)`; `monitor.register(registry)` exports what it saw."""

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._snap = TrainingSnapshot(name=spec.name, scheme=spec.scheme, dataset=spec.data.dataset,
                                      model=spec.model.name)
        self._loss: float | None = None
        self._accuracy: float | None = None
        self._alive: Alive | None = None

    def on_event(self, kind: str, **info: Any) -> None:
        with self._lock:
            if kind == "prepared":
                self._snap = dataclasses.replace(self._snap, planned_rounds=int(info["total"]),
                                                 rounds_done=int(info["start"]),
                                                 dataset=str(info.get("dataset", self._snap.dataset)))
            elif kind == "started" and callable(info.get("alive")):
                self._alive = info["alive"]
            elif kind == "round_done":
                record = info["record"]
                self._snap = fold_round(self._snap, record)
                self._loss, self._accuracy = record.get("train_loss"), record.get("test_acc")

    def training_snapshot(self) -> TrainingSnapshot:
        with self._lock:
            return self._snap

    def controller_snapshot(self) -> ControllerSnapshot:
        """Nodes (the edge and the devices: up while their process runs), their splits, the latest figures."""
        with self._lock:
            alive, loss, accuracy = self._alive, self._loss, self._accuracy
        nodes: list[NodeState] = []
        if alive is not None:
            up = alive()
            nodes.append(NodeState("edge", "edge", bool(up.get("edge", False))))
            for name, (a, b) in zip(self.spec.device_names, self.spec.splits, strict=True):
                nodes.append(NodeState(name, "device", bool(up.get(name, False)), a=a, b=b))
        return ControllerSnapshot(devices=tuple(nodes), training_loss=loss, training_accuracy=accuracy)

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(ControllerCollector(self.controller_snapshot))
        registry.register(TrainingCollector(self.training_snapshot))
