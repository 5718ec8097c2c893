"""Controller metrics, built from the controller's live state at scrape time.

The controller hands over a `snapshot()` function; every scrape calls it once and turns the frozen
`ControllerSnapshot` into metric families, so nothing has to be kept in sync between the controller's
state and the exported gauges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from testbed.metrics.common import SnapshotCollector


@dataclass(frozen=True)
class NodeState:
    """One registered node as the controller sees it; None where nothing is known (yet)."""

    name: str
    role: Literal["device", "edge"]
    up: bool
    device_class: str = "unknown"
    a: int | None = None
    b: int | None = None
    share: float | None = None  # fraction of edge compute, 0..1
    uplink_bps: float | None = None  # bits per second, estimated from the data plane
    downlink_bps: float | None = None
    rtt_s: float | None = None


@dataclass(frozen=True)
class ControllerSnapshot:
    devices: tuple[NodeState, ...]
    replans_total: int = 0
    predicted_round_s: float | None = None
    measured_round_s: float | None = None
    training_loss: float | None = None
    training_accuracy: float | None = None


Snapshot = Callable[[], ControllerSnapshot]


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _families() -> dict[str, Metric]:
    """Every family the collector exports, empty; `describe()` and `collect()` share the names and help."""
    fams: list[Metric] = [
        _gauge("testbed_node_up", "1 while the node heartbeats, 0 once it missed 3 heartbeats", ("device",)),
        InfoMetricFamily("testbed_node", "Role and device class of a registered node", labels=["device"]),
        _gauge("testbed_plan_body_start_block", "Planned split point a (head = blocks [0, a))", ("device",)),
        _gauge("testbed_plan_body_end_block", "Planned split point b (tail = blocks [b, L))", ("device",)),
        _gauge("testbed_plan_edge_share_ratio", "Planned fraction of the edge's compute for the device", ("device",)),
        _gauge("testbed_link_estimated_rate_bytes_per_second",
               "Link rate the controller estimates from data-plane timings (smoothed)", ("device", "direction")),
        _gauge("testbed_link_estimated_rtt_seconds", "Round-trip time the controller estimates", ("device",)),
        CounterMetricFamily("testbed_planner_replans", "Plans deployed after the first (adaptive re-splits)"),
        _gauge("testbed_planner_predicted_round_seconds", "Round time (slowest device) the current plan predicts"),
        _gauge("testbed_planner_measured_round_seconds", "Round time (slowest device) measured on the data plane"),
        _gauge("testbed_training_loss", "Latest training loss the controller received"),
        _gauge("testbed_training_accuracy_ratio", "Latest training (evaluation) accuracy, 0..1"),
        CounterMetricFamily("testbed_controller_snapshot_failures",
                            "Scrapes at which the controller state could not be read"),
    ]
    return {f.name: f for f in fams}


def snapshot_families(snap: ControllerSnapshot, failures: int = 0) -> list[Metric]:
    """Pure: one snapshot -> metric families (testable without HTTP)."""
    f = _families()
    for node in snap.devices:
        f["testbed_node_up"].add_metric([node.name], 1.0 if node.up else 0.0)
        f["testbed_node"].add_metric([node.name], {"role": node.role, "device_class": node.device_class})
        if node.a is not None:
            f["testbed_plan_body_start_block"].add_metric([node.name], node.a)
        if node.b is not None:
            f["testbed_plan_body_end_block"].add_metric([node.name], node.b)
        if node.share is not None:
            f["testbed_plan_edge_share_ratio"].add_metric([node.name], node.share)
        for direction, bps in (("uplink", node.uplink_bps), ("downlink", node.downlink_bps)):
            if bps is not None:
                f["testbed_link_estimated_rate_bytes_per_second"].add_metric([node.name, direction], bps / 8)
        if node.rtt_s is not None:
            f["testbed_link_estimated_rtt_seconds"].add_metric([node.name], node.rtt_s)
    f["testbed_planner_replans"].add_metric([], snap.replans_total)
    f["testbed_controller_snapshot_failures"].add_metric([], failures)
    for name, value in (
        ("testbed_planner_predicted_round_seconds", snap.predicted_round_s),
        ("testbed_planner_measured_round_seconds", snap.measured_round_s),
        ("testbed_training_loss", snap.training_loss),
        ("testbed_training_accuracy_ratio", snap.training_accuracy),
    ):
        if value is not None:
            f[name].add_metric([], value)
    return list(f.values())


class ControllerCollector(SnapshotCollector[ControllerSnapshot]):
    """Register with `registry.register(ControllerCollector(controller.snapshot))`."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(snapshot, ControllerSnapshot(devices=()), _families, snapshot_families)
