"""What every endpoint shares: the stage-duration buckets and the build/runtime `_info` metric."""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from testbed.wire.envelope import PROTOCOL_VERSION

S = TypeVar("S")

# 100 µs (a loopback hop, a small head) up to 30 s (a slow device on a bad link): 1-2.5-5 per decade.
STAGE_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0,
)

DIRECTIONS: Final[tuple[str, str]] = ("uplink", "downlink")


def package_version() -> str:
    try:
        return metadata.version("edge-split-testbed")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str, runtimes: Mapping[str, str]) -> None:
    """`testbed_build_info{component, version, protocol, python, <runtime>...} 1`.

    `runtimes` names extra runtime versions (onnxruntime, torch, ...); keys must be valid label names.
    """
    info = Info("testbed_build", "Testbed version, wire protocol and runtime versions of this process",
                registry=registry)
    info.info({
        "component": component,
        "version": package_version(),
        "protocol": str(PROTOCOL_VERSION),
        "python": platform.python_version(),
        **{name: str(value) for name, value in runtimes.items()},
    })


def register_process_metrics(registry: CollectorRegistry) -> None:
    """The standard process_* and python_info metrics, on this registry (entry points only)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


class SnapshotCollector(Collector, Generic[S]):
    """Metrics built at scrape time from a snapshot of live state (``snapshot()``), rendered by ``render``.

    A snapshot function that raises does not fail the scrape: ``empty`` is rendered instead and the failure is
    counted (the render function exports the count). ``describe`` lists the families without calling the snapshot
    (registering would otherwise call collect())."""

    def __init__(self, snapshot: Callable[[], S], empty: S, families: Callable[[], dict[str, Metric]],
                 render: Callable[[S, int], list[Metric]]) -> None:
        self.snapshot = snapshot
        self.failures = 0
        self._empty, self._families, self._render = empty, families, render
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.snapshot()
        except Exception:  # a scrape must not fail because the state is mid-update
            with self._lock:
                self.failures += 1
            snap = self._empty
        yield from self._render(snap, self.failures)
