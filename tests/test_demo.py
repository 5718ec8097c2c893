"""`testbed demo` end to end, as a user runs it: real processes on loopback, and no orphan left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .test_supervisor import alive, wait_gone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the module's demo runs: the model is trained and exported once."""
    return tmp_path_factory.mktemp("demo-cache")


def demo_argv(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "testbed.cli.main", "demo", "--epochs", "1", "--train-samples", "3000",
            "--cache-dir", str(cache), "--run-dir", str(tmp_path / "run"), *extra]


def test_demo_reports_stages_and_matches_the_unsplit_model(tmp_path: Path, cache_dir: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(demo_argv(tmp_path, cache_dir, "--limit", "300", "--json", str(report_path)),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["dataset"] in {"fashion-mnist", "digits"}
    devices = report["devices"]
    assert len(devices) == 3
    assert len({tuple(d["split"]) for d in devices}) == 3, "each device has its own split"
    assert sum(d["samples"] for d in devices) == 300
    for d in devices:
        assert set(d["stages"]) == {"head", "uplink", "queue", "body", "downlink", "tail"}
        assert all(set(v) == {"p50_ms", "p95_ms"} for v in d["stages"].values())
        assert 0 < d["e2e"]["p50_ms"] <= d["e2e"]["p95_ms"]
        assert d["throughput_rps"] > 0
        assert d["accuracy"] == d["reference_accuracy"]
    assert report["accuracy"] == pytest.approx(report["reference_accuracy"])
    assert report["accuracy"] > 0.5, "one epoch on 3000 images already classifies well above chance"
    assert "end to end" in proc.stdout and "equal" in proc.stdout
    # A second run reuses the trained weights and the ONNX files.
    again = subprocess.run(demo_argv(tmp_path, cache_dir, "--limit", "30", "--devices", "2"), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "loaded trained cnn" in again.stdout


def test_demo_rejects_bad_input_without_a_traceback(tmp_path: Path, cache_dir: Path) -> None:
    proc = subprocess.run(demo_argv(tmp_path, cache_dir, "--limit", "10", "--split", "0:3", "--devices", "1"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "1 <= a <= b <=" in proc.stderr


def start_long_demo(tmp_path: Path, cache_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    proc = subprocess.Popen(demo_argv(tmp_path, cache_dir, "--batch-size", "1"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids_file = tmp_path / "run" / "pids.json"
    deadline = time.monotonic() + 300
    while not pids_file.exists():
        assert proc.poll() is None, "the demo ended before starting its devices"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    return proc, json.loads(pids_file.read_text())


@pytest.mark.parametrize("victim", ["controller", "edge"])
def test_a_killed_process_leaves_no_orphan(tmp_path: Path, cache_dir: Path, victim: str) -> None:
    proc, pids = start_long_demo(tmp_path, cache_dir)
    try:
        assert len(pids) == 4 and all(alive(p) for p in pids.values())
        os.kill(proc.pid if victim == "controller" else pids["edge"], signal.SIGKILL)
        proc.wait(timeout=60)
        if victim == "edge":
            assert proc.returncode == 2
        assert wait_gone(list(pids.values())) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_stops_everything(tmp_path: Path, cache_dir: Path) -> None:
    proc, pids = start_long_demo(tmp_path, cache_dir)
    try:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert wait_gone(list(pids.values())) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
