"""Prometheus for one run (`metrics: {prometheus: true}`): every exporter of the run scraped by a real server.

The targets are the run's own exporters: the controller's, the edge's and every device agent's (their URLs come
from the edge's ready file or the placement, and from the agents' registration facts, `metrics_url`). The server
runs where all of them are reachable: on this host for loopback and inventory runs, inside the lab's switch
namespace (`<prefix>-lab`, which routes to every lab host) for a lab run — the exporters of the lab's hosts
listen on their lab addresses, the controller's is opened inside that namespace too. The scrape config is
written to the run's output directory; the server is stopped by its pid at the end (LocalPrometheus), its TSDB
removed with it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from testbed.metrics.prometheus import LocalPrometheus
from testbed.metrics.scrape import JOB_CONTROLLER, JOB_DEVICE, JOB_EDGE, ScrapeTarget, scrape_config_yaml

CONFIG_NAME = "prometheus.yml"


@contextlib.contextmanager
def in_namespace(netns: str | None) -> Iterator[None]:
    """The calling thread in `netns` (None: where it is); sockets and children made meanwhile belong there."""
    if netns is None:
        yield
        return
    from testbed.net.tun import in_netns

    with in_netns(netns):
        yield


def free_port(netns: str | None = None) -> int:
    with in_namespace(netns), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def address_of(url: str) -> str:
    """http://HOST:PORT/metrics -> HOST:PORT."""
    return url.removeprefix("http://").removesuffix("/metrics")


def run_targets(controller: str | None, edge: str | None, devices: dict[str, str]) -> list[ScrapeTarget]:
    """Scrape targets from metrics URLs (controller, edge, device id -> URL); None: that one exports nothing."""
    out = []
    if controller:
        out.append(ScrapeTarget(JOB_CONTROLLER, address_of(controller)))
    if edge:
        out.append(ScrapeTarget(JOB_EDGE, address_of(edge)))
    out += [ScrapeTarget(JOB_DEVICE, address_of(url), {"host": name}) for name, url in sorted(devices.items())]
    return out


class RunPrometheus:
    """A LocalPrometheus for the run's targets, in `netns` (None: here); `close` stops it by pid."""

    def __init__(self, targets: Sequence[ScrapeTarget], out_dir: Path, *, interval_s: float,
                 netns: str | None = None) -> None:
        self.netns = netns
        config = scrape_config_yaml(targets, interval_s=interval_s)
        self.config_path = out_dir / CONFIG_NAME
        self.config_path.write_text(config)
        self.server = LocalPrometheus(config, free_port(netns), workdir=out_dir)
        with in_namespace(netns):  # Prometheus is forked from this thread: it starts in the same namespace
            self.server.start()
        self.targets = len(targets)

    def wait_scraped(self, timeout_s: float = 20.0) -> bool:
        """Wait until every target has been scraped successfully once (Prometheus applies a new configuration's
        targets after up to 5 s, `--scrape.discovery-reload-interval`): then the whole workload is recorded."""
        from testbed.metrics.prometheus import PrometheusError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with in_namespace(self.netns):
                    health = self.server.targets_up()
            except PrometheusError:
                health = {}
            if len(health) >= self.targets and all(health.values()):
                return True
            time.sleep(0.25)
        return False

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def where(self) -> str:
        return f"{self.url} (inside network namespace {self.netns}: `ip netns exec {self.netns} curl ...`)" \
            if self.netns else self.url

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc is not None else None

    def close(self) -> None:
        self.server.stop()
