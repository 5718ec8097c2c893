"""A real run with metrics: an edge server and two device agents (real processes, split inference on
loopback) with metrics ports, and a controller collector served by an exporter in the test process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from testbed.metrics.controller import ControllerCollector, ControllerSnapshot, NodeState
from testbed.metrics.exporter import Exporter, start_exporter
from testbed.metrics.prometheus import LocalPrometheus
from testbed.metrics.scrape import JOB_CONTROLLER, JOB_DEVICE, JOB_EDGE, ScrapeTarget, scrape_config_yaml
from testbed.partition import PartitionId

from ..conftest import REPO, start_edge, stop_process

SPLITS = {"dev1": (2, 6), "dev2": (4, 8)}
SHARES = {"dev1": 1.0, "dev2": 3.0}
IMAGES, BATCH = 4800, 4
REQUESTS = IMAGES // BATCH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@dataclass
class Device:
    name: str
    proc: subprocess.Popen[bytes]
    metrics_url: str
    out: Path


@dataclass
class LiveRun:
    """The run's processes and endpoints; `snapshot()` is the controller's view of it, read live."""

    edge: subprocess.Popen[bytes]
    edge_endpoint: str
    edge_metrics_url: str
    devices: dict[str, Device] = field(default_factory=dict)
    controller: Exporter | None = None
    prometheus: LocalPrometheus | None = None
    started_s: float = 0.0  # wall clock when Prometheus was up, before any device started

    def snapshot(self) -> ControllerSnapshot:
        """Built from the live processes and the devices' own /metrics (what the data plane measured)."""
        nodes = [NodeState("edge", "edge", self.edge.poll() is None, "cpu")]
        rounds = []
        total = sum(SHARES.values())
        for dev in self.devices.values():
            up = dev.proc.poll() is None
            a, b = SPLITS[dev.name]
            up_bps = down_bps = rtt_s = None
            if up:
                text = scrape(dev.metrics_url)
                stage = "testbed_device_stage_duration_seconds"
                n = sample(text, f"{stage}_count", stage="uplink") or 0.0
                if n > 0:
                    up_s = sample(text, f"{stage}_sum", stage="uplink") or 0.0
                    down_s = sample(text, f"{stage}_sum", stage="downlink") or 0.0
                    up_bytes = sample(text, "testbed_device_transfer_bytes_total", direction="uplink") or 0.0
                    down_bytes = sample(text, "testbed_device_transfer_bytes_total", direction="downlink") or 0.0
                    up_bps = 8 * up_bytes / max(up_s, 1e-9)
                    down_bps = 8 * down_bytes / max(down_s, 1e-9)
                    rtt_s = (up_s + down_s) / n
                    rounds.append((sample(text, f"{stage}_sum", stage="e2e") or 0.0) / n)
            nodes.append(NodeState(dev.name, "device", up, "lab", a, b, SHARES[dev.name] / total,
                                   up_bps, down_bps, rtt_s))
        # No training figures: this run does not train (a real `testbed train` feeds the training dashboard,
        # tests/metrics/test_training_live.py).
        return ControllerSnapshot(
            devices=tuple(nodes), replans_total=0,
            predicted_round_s=0.01, measured_round_s=max(rounds) if rounds else None,
        )


def start_device(name: str, run_dir: Path, cnn_weights, onnx_cache, endpoint: str, port: int) -> Device:
    model = cnn_weights.model
    a, b = SPLITS[name]
    head, tail = onnx_cache.partition(model, cnn_weights.weights_hash, a, b)
    rng = np.random.default_rng(a)
    data = run_dir / f"tb-{name}.npz"
    np.savez(data, x=rng.standard_normal((IMAGES, *model.input_shape), dtype=np.float32),
             y=rng.integers(0, 10, IMAGES))
    out = run_dir / f"tb-{name}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.device", "infer", "--edge", endpoint, "--device-id", name,
         "--head", str(head), "--tail", str(tail), "--partition", str(PartitionId(cnn_weights.weights_hash, a, b)),
         "--data", str(data), "--batch-size", str(BATCH), "--out", str(out), "--parent-pid", str(os.getpid()),
         "--metrics-port", str(port), "--metrics-hold-s", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )
    return Device(name, proc, f"http://127.0.0.1:{port}/metrics", out)


def wait_until(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


SCRAPE_INTERVAL_S = 0.5


def address(url: str) -> str:
    return url.removeprefix("http://").removesuffix("/metrics")


@pytest.fixture(scope="module")
def live_run(cnn_weights, onnx_cache, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """Edge, controller exporter and Prometheus first, then the devices, so Prometheus sees all their work."""
    run_dir = tmp_path_factory.mktemp("tb-run")
    shares = ",".join(f"{d}={w}" for d, w in SHARES.items())
    edge, info = start_edge(cnn_weights.path, run_dir, "--metrics-port", "0", "--shares", shares)
    run = LiveRun(edge, str(info["endpoint"]), str(info["metrics_url"]))
    registry = CollectorRegistry()
    registry.register(ControllerCollector(run.snapshot))
    try:
        run.controller = start_exporter(registry)
        ports = {name: free_port() for name in SPLITS}
        targets = [ScrapeTarget(JOB_EDGE, address(run.edge_metrics_url)),
                   ScrapeTarget(JOB_CONTROLLER, run.controller.address),
                   *(ScrapeTarget(JOB_DEVICE, f"127.0.0.1:{port}", {"host": "lab-" + name})
                     for name, port in ports.items())]
        run.prometheus = LocalPrometheus(scrape_config_yaml(targets, interval_s=SCRAPE_INTERVAL_S),
                                         free_port(), workdir=run_dir)
        run.prometheus.start()
        run.started_s = time.time()
        for name, port in ports.items():
            run.devices[name] = start_device(name, run_dir, cnn_weights, onnx_cache, run.edge_endpoint, port)
        yield run
    finally:
        for dev in run.devices.values():
            stop_process(dev.proc)
        if run.prometheus is not None:
            run.prometheus.stop()
        stop_process(edge)
        if run.controller is not None:
            run.controller.close()
    procs = [edge, *(d.proc for d in run.devices.values())]
    if run.prometheus is not None and run.prometheus.proc is not None:
        procs.append(run.prometheus.proc)
    left = [p.pid for p in procs if p.poll() is None]
    assert not left, f"processes still running after the run: {left}"


def wait_finished(run: LiveRun, timeout_s: float = 180.0) -> dict[str, dict]:
    """Wait for every device to write its result (it then holds its metrics endpoint open)."""
    results = {}
    for dev in run.devices.values():
        def done(dev: Device = dev) -> bool:
            if dev.proc.poll() is not None:
                out = dev.proc.stdout.read().decode(errors="replace") if dev.proc.stdout else ""
                raise AssertionError(f"{dev.name} exited with {dev.proc.returncode}:\n{out}")
            return dev.out.exists()
        wait_until(done, f"{dev.name}'s result", timeout_s)
        results[dev.name] = json.loads(dev.out.read_text())
    return results
