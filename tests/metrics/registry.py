"""A registry holding every testbed metric, filled with one of everything (shared by the pure tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from testbed.metrics.common import register_build_info
from testbed.metrics.controller import ControllerCollector, ControllerSnapshot, NodeState
from testbed.metrics.device import DeviceMetrics
from testbed.metrics.edge import EdgeMetrics
from testbed.metrics.training import DeviceTotals, TrainingCollector, TrainingSnapshot

SNAPSHOT = ControllerSnapshot(
    devices=(NodeState("dev1", "device", True, "pi4", 2, 6, 0.25, 8e6, 16e6, 0.004),
             NodeState("dev2", "device", False, "jetson"),
             NodeState("edge", "edge", True, "gpu")),
    replans_total=2, predicted_round_s=0.05, measured_round_s=0.06, training_loss=0.7, training_accuracy=0.8,
)

TRAINING = TrainingSnapshot(
    name="psl-iid", scheme="psl", dataset="fashion-mnist", model="cnn", planned_rounds=4, rounds_done=2,
    test_loss=0.5, train_accuracy=0.75, round_s=1.5, phase_s=(("steps", 2.0), ("eval", 0.5)),
    devices=(DeviceTotals("dev1", 128, 1000, 2000, 300, 400, (("head_fwd", 0.1), ("up_a1", 0.2)), 0.6, 0.7),),
)


def full_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    register_build_info(registry, "test", {"numpy": "1"})
    dev = DeviceMetrics(registry, "dev1", "pi4")
    dev.observe_request({s: 0.001 for s in ("head", "uplink", "queue", "body", "downlink", "tail", "e2e")}, 10, 20)
    dev.observe_failure("timeout")
    dev.set_partition("abcd:2:6", 2, 6)
    edge = EdgeMetrics(registry)
    edge.set_info("cnn", "abcd", "cpu")
    edge.observe_request("dev1", 0.001, 0.002, 10, 20)
    edge.observe_rejected("bad_header")
    edge.set_shares({"dev1": 1.0})
    registry.register(ControllerCollector(lambda: SNAPSHOT))
    registry.register(TrainingCollector(lambda: TRAINING))
    return registry


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes (with _total, _bucket, _info, ...)."""
    return {s.name for family in registry.collect() for s in family.samples}
