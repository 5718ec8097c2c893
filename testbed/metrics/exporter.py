"""The thin HTTP shell around a registry: serves /metrics on a background thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from testbed.errors import TestbedError


class ExporterError(TestbedError):
    """The metrics endpoint could not be started (port taken, address not local, ...)."""


@dataclass
class Exporter:
    server: WSGIServer
    thread: threading.Thread
    bind: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/metrics"

    @property
    def address(self) -> str:
        """host:port, as a Prometheus scrape target names it."""
        return self.url.removeprefix("http://").removesuffix("/metrics")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_exporter(registry: CollectorRegistry, bind: str = "127.0.0.1", port: int = 0) -> Exporter:
    """Serve `registry` on http://bind:port/metrics; port 0 picks a free port (see `.port`)."""
    if not 0 <= port <= 65535:
        raise ExporterError(f"metrics port {port} is outside 0..65535")
    try:
        server, thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ExporterError(f"cannot serve metrics on {bind}:{port}: {exc.strerror or exc}") from exc
    return Exporter(server, thread, bind, int(server.server_port))
