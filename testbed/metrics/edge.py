"""Metrics of the edge server: per-device queue and body time, bytes, rejected messages, edge shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from testbed.metrics.common import STAGE_BUCKETS_S
from testbed.wire.envelope import ERROR_CODES

OTHER_DEVICE: Final = "_other"


class EdgeMetrics:
    """The edge's metrics on `registry`.

    Device ids come from peers, so at most `max_devices` distinct ones get their own series; the rest
    are counted under device="_other" (a misbehaving peer cannot blow up the series count).
    """

    def __init__(self, registry: CollectorRegistry, max_devices: int = 256) -> None:
        self.max_devices = max_devices
        self._seen: set[str] = set()
        self.stage = Histogram(
            "testbed_edge_stage_duration_seconds",
            "Time a request spent at the edge, by stage: queue (waiting for compute) and body (body blocks)",
            ["device", "stage"], buckets=STAGE_BUCKETS_S, registry=registry,
        )
        self.requests = Counter("testbed_edge_requests", "Requests the edge answered with a body result",
                                ["device"], registry=registry)
        self.bytes = Counter(
            "testbed_edge_transfer_bytes",
            "Activation payload bytes received from devices (uplink) and sent back to them (downlink)",
            ["device", "direction"], registry=registry,
        )
        self.rejected = Counter("testbed_edge_rejected", "Messages the edge answered with an error, by error code",
                                ["code"], registry=registry)
        self.share = Gauge("testbed_edge_share_ratio",
                           "Fraction of the edge's compute a device gets when every device is backlogged",
                           ["device"], registry=registry)
        self.info = Info("testbed_edge", "What the edge server serves", registry=registry)
        self._share_devices: set[str] = set()
        for code in sorted(ERROR_CODES):  # known codes start at 0, so rate() sees their first rejection
            self.rejected.labels(code)

    def set_info(self, model: str, weights_hash: str, accelerator: str) -> None:
        self.info.info({"model": model, "weights": weights_hash, "accelerator": accelerator})

    def _label(self, device: str) -> str:
        if device in self._seen:
            return device
        if len(self._seen) >= self.max_devices:
            return OTHER_DEVICE
        self._seen.add(device)
        return device

    def observe_request(self, device: str, queue_s: float, body_s: float, bytes_in: int, bytes_out: int) -> None:
        label = self._label(device)
        self.stage.labels(label, "queue").observe(max(0.0, queue_s))
        self.stage.labels(label, "body").observe(max(0.0, body_s))
        self.requests.labels(label).inc()
        self.bytes.labels(label, "uplink").inc(bytes_in)
        self.bytes.labels(label, "downlink").inc(bytes_out)

    def observe_rejected(self, code: str) -> None:
        """`code` is a wire error code (a fixed set), so it is safe as a label."""
        self.rejected.labels(code).inc()

    def set_shares(self, shares: Mapping[str, float]) -> None:
        """Relative weights, as the scheduler takes them; exported normalised to sum 1."""
        total = sum(shares.values())
        for gone in self._share_devices - set(shares):
            self.share.remove(gone)
        self._share_devices = set(shares)
        for device, weight in shares.items():
            self.share.labels(device).set(weight / total if total > 0 else 0.0)
