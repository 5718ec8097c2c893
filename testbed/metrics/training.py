"""Training metrics, built from the training controller's per-round figures at scrape time.

`testbed train` keeps one frozen `TrainingSnapshot` (replaced after every round) and hands a function that
returns it to `TrainingCollector`; each scrape turns it into metric families. The controller-level figures
(nodes up, splits, the latest loss and accuracy) come from `ControllerCollector`, registered beside it, so a
training run and `testbed run` export them under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from testbed.metrics.common import DIRECTIONS, SnapshotCollector

#: Phases of a round, disjoint (they add up to the round's wall time, less the tables' write).
PHASES = ("steps", "sync", "collect", "eval", "checkpoint")


@dataclass(frozen=True)
class DeviceTotals:
    """One device's figures: cumulative totals over the rounds done, and its loss/accuracy in the latest one."""

    device: str
    samples: int = 0
    bytes_up: int = 0  # data plane, device -> edge (activations a1, gradients g2), every frame's bytes
    bytes_down: int = 0  # edge -> device (a2, g1)
    control_bytes_up: int = 0  # control plane, device -> controller (model state for FedAvg, checkpoints)
    control_bytes_down: int = 0
    stage_s: tuple[tuple[str, float], ...] = ()  # (stage, seconds summed over the rounds), bounded stage names
    loss: float | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class TrainingSnapshot:
    name: str
    scheme: str
    dataset: str = "unknown"
    model: str = "unknown"
    planned_rounds: int | None = None
    rounds_done: int = 0
    test_loss: float | None = None
    train_accuracy: float | None = None
    round_s: float | None = None  # the latest round's wall time
    phase_s: tuple[tuple[str, float], ...] = ()  # (phase, seconds summed over the rounds), phases in PHASES
    devices: tuple[DeviceTotals, ...] = ()


TrainingSource = Callable[[], TrainingSnapshot]


def _families() -> dict[str, Metric]:
    fams: list[Metric] = [
        InfoMetricFamily("testbed_training", "The experiment this training run executes", labels=[]),
        CounterMetricFamily("testbed_training_rounds", "Rounds completed (with --resume, those of the checkpoint too)"),
        GaugeMetricFamily("testbed_training_planned_rounds", "Rounds the experiment has in all"),
        GaugeMetricFamily("testbed_training_test_loss", "Test-set loss of the models the devices hold after the "
                                                        "latest round"),
        GaugeMetricFamily("testbed_training_train_accuracy_ratio",
                          "Accuracy on the devices' training batches of the latest round, 0..1"),
        GaugeMetricFamily("testbed_training_round_seconds", "Wall time of the latest round"),
        CounterMetricFamily("testbed_training_phase_seconds",
                            "Seconds spent per phase of the rounds (steps, sync, collect, eval, checkpoint)",
                            labels=["phase"]),
        CounterMetricFamily("testbed_training_device_samples", "Training samples the device has stepped on",
                            labels=["device"]),
        CounterMetricFamily("testbed_training_device_transfer_bytes",
                            "Data-plane bytes between the device and the edge (every frame)",
                            labels=["device", "direction"]),
        CounterMetricFamily("testbed_training_device_control_bytes",
                            "Control-plane bytes between the device and the controller (model state)",
                            labels=["device", "direction"]),
        CounterMetricFamily("testbed_training_device_stage_seconds",
                            "Seconds the device spent per stage of the U-shaped step", labels=["device", "stage"]),
        GaugeMetricFamily("testbed_training_device_loss", "The device's training loss in the latest round",
                          labels=["device"]),
        GaugeMetricFamily("testbed_training_device_accuracy_ratio",
                          "The device's accuracy on its training batches in the latest round, 0..1", labels=["device"]),
        CounterMetricFamily("testbed_training_snapshot_failures",
                            "Scrapes at which the training state could not be read"),
    ]
    return {f.name: f for f in fams}


def training_families(snap: TrainingSnapshot, failures: int = 0) -> list[Metric]:
    """Pure: one snapshot -> metric families. Values not known yet are absent rather than 0."""
    f = _families()
    f["testbed_training"].add_metric([], {"experiment": snap.name, "scheme": snap.scheme, "dataset": snap.dataset,
                                          "model": snap.model})
    f["testbed_training_rounds"].add_metric([], snap.rounds_done)
    f["testbed_training_snapshot_failures"].add_metric([], failures)
    for name, value in (
        ("testbed_training_planned_rounds", snap.planned_rounds),
        ("testbed_training_test_loss", snap.test_loss),
        ("testbed_training_train_accuracy_ratio", snap.train_accuracy),
        ("testbed_training_round_seconds", snap.round_s),
    ):
        if value is not None:
            f[name].add_metric([], value)
    phases = dict(snap.phase_s)
    for phase in PHASES:  # every phase from the first scrape on, so the first round shows in rate()
        f["testbed_training_phase_seconds"].add_metric([phase], phases.get(phase, 0.0))
    for dev in snap.devices:
        f["testbed_training_device_samples"].add_metric([dev.device], dev.samples)
        for direction, data, control in zip(DIRECTIONS, (dev.bytes_up, dev.bytes_down),
                                            (dev.control_bytes_up, dev.control_bytes_down), strict=True):
            f["testbed_training_device_transfer_bytes"].add_metric([dev.device, direction], data)
            f["testbed_training_device_control_bytes"].add_metric([dev.device, direction], control)
        for stage, seconds in dev.stage_s:
            f["testbed_training_device_stage_seconds"].add_metric([dev.device, stage], seconds)
        if dev.loss is not None:
            f["testbed_training_device_loss"].add_metric([dev.device], dev.loss)
        if dev.accuracy is not None:
            f["testbed_training_device_accuracy_ratio"].add_metric([dev.device], dev.accuracy)
    return list(f.values())


class TrainingCollector(SnapshotCollector[TrainingSnapshot]):
    """Register with `registry.register(TrainingCollector(monitor.training_snapshot))`."""

    def __init__(self, snapshot: TrainingSource) -> None:
        super().__init__(snapshot, TrainingSnapshot(name="unknown", scheme="unknown"), _families, training_families)
