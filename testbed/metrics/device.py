"""Metrics of one device agent: per-stage latency of every request, bytes moved, failures, its partition.

Stages (seconds): head, uplink, queue, body, downlink, tail, e2e, as the device agent measures them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from testbed.metrics.common import STAGE_BUCKETS_S

STAGES: Final[tuple[str, ...]] = ("head", "uplink", "queue", "body", "downlink", "tail", "e2e")
FAILURE_REASONS: Final[frozenset[str]] = frozenset({"timeout", "refused", "malformed", "other"})


class DeviceMetrics:
    """One device's metrics on `registry`; several devices may share one registry (distinct `device`)."""

    def __init__(self, registry: CollectorRegistry, device: str, device_class: str = "unknown") -> None:
        self.device = device
        self.stage = Histogram(
            "testbed_device_stage_duration_seconds",
            "Duration of one stage of a split-inference request, measured on the device (e2e: head start to tail end)",
            ["device", "stage"], buckets=STAGE_BUCKETS_S, registry=registry,
        )
        self.requests = Counter("testbed_device_requests", "Requests that completed (all stages)",
                                ["device"], registry=registry)
        self.bytes = Counter(
            "testbed_device_transfer_bytes",
            "Activation payload bytes the device sent to the edge (uplink) and received from it (downlink)",
            ["device", "direction"], registry=registry,
        )
        self.failures = Counter("testbed_device_failures", "Requests that failed, by reason",
                                ["device", "reason"], registry=registry)
        # The split (a, b) as the body's block range [a, b): "split_b" would read as "split bytes" to promtool.
        self.split_a = Gauge("testbed_device_body_start_block", "Current split point a: the head is blocks [0, a)",
                             ["device"], registry=registry)
        self.split_b = Gauge("testbed_device_body_end_block", "Current split point b: the tail is blocks [b, L)",
                             ["device"], registry=registry)
        self.partition = Info("testbed_device_partition", "Partition id (weights hash:a:b) the device runs now",
                              ["device"], registry=registry)
        Info("testbed_device", "Static facts about the device agent", ["device"], registry=registry) \
            .labels(device).info({"device_class": device_class})
        # Create the children up front: a rate() over a series that appears late misses its first value.
        for stage in STAGES:
            self.stage.labels(device, stage)
        for direction in ("uplink", "downlink"):
            self.bytes.labels(device, direction)
        self.requests.labels(device)
        for reason in sorted(FAILURE_REASONS):
            self.failures.labels(device, reason)

    def observe_request(self, stages_s: Mapping[str, float], bytes_up: int, bytes_down: int) -> None:
        for stage, seconds in stages_s.items():
            if stage in STAGES:
                self.stage.labels(self.device, stage).observe(max(0.0, seconds))
        self.requests.labels(self.device).inc()
        self.bytes.labels(self.device, "uplink").inc(bytes_up)
        self.bytes.labels(self.device, "downlink").inc(bytes_down)

    def observe_failure(self, reason: str) -> None:
        """`reason` is folded into a fixed set (timeout, refused, malformed, other) to bound the series."""
        self.failures.labels(self.device, reason if reason in FAILURE_REASONS else "other").inc()

    def set_partition(self, partition: str, a: int, b: int) -> None:
        self.split_a.labels(self.device).set(a)
        self.split_b.labels(self.device).set(b)
        self.partition.labels(self.device).info({"partition": partition})
