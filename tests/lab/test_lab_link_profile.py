"""The link profiler against a really shaped link: the lab's mmWave profile through the delay line (HTB rate,
token bucket, 3 ms each way), an edge server in the edge's namespace, `testbed profile --no-blocks --edge`
from inside dev1's namespace; needs root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.lab.lab import Lab
from testbed.net.link import load_link_profile

from ..conftest import REPO
from .conftest import fresh_lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

PREFIX = "tbp"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with fresh_lab(tmp_path / "state", PREFIX) as lab:
        yield lab


def test_the_profiler_measures_a_shaped_links_rate_and_token_bucket_burst(lab: Lab, cnn_weights,
                                                                           tmp_path: Path) -> None:
    link = load_link_profile("5g-mmwave")  # 214 Mbit/s up, 3 ms each way
    lab.up(1, link.name, link.spec, backend="delay-line")
    ready = tmp_path / "edge.json"
    edge = subprocess.Popen(lab.command_in("edge", [
        sys.executable, "-m", "agents.edge", "--weights", str(cnn_weights.path), "--threads", "1",
        "--bind", f"tcp://{lab.require_state().topology.edge.address}:*", "--ready-file", str(ready)]),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert edge.poll() is None and time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.05)
        endpoint = json.loads(ready.read_text())["endpoint"]
        out = tmp_path / "link.yaml"
        proc = subprocess.run(lab.command_in("dev1", [
            sys.executable, "-m", "testbed.cli.main", "profile", "--no-blocks", "--edge", endpoint, "--json",
            "--link-count", "8", "--link-budget", "60", "--link-out", str(out),
            "--link-size", "16KiB", "--link-size", "256KiB", "--link-size", "1MiB"]),
            cwd=REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        measured = json.loads(proc.stdout)["link"]
    finally:
        edge.terminate()
        edge.wait(timeout=30)
    # The rate between the two largest sizes is the shaped rate, within a few % (headers below, bucket noise above) ...
    assert 0.85 * 214e6 <= measured["uplink_bps"] <= 1.08 * 214e6, measured
    # ... and the token bucket (two 13 kB TUN packets, GSO batches) passes tens of kB at no cost: the line through
    # the large sizes starts below the empty round trip. A 16 KiB message costs no more than an empty one.
    assert 8_000 <= measured["uplink_burst_bytes"] <= 256 * 1024, measured
    up = measured["uplink_rtt_ms"]["median"]
    assert up[0] - measured["rtt_ms"]["median"] < 0.5, measured
