"""Shared fixtures: a small CNN with saved weights, its ONNX partitions, and a running edge server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests check properties, not speed: no per-example deadline (Hypothesis' default 200 ms fails a test on a
# loaded CI machine that merely paused it). Tests that set their own settings keep them.
settings.register_profile("testbed", deadline=None)
settings.load_profile("testbed")


@dataclass(frozen=True)
class SavedModel:
    model: object  # testbed.models.BlockModel (kept untyped so collecting tests needs no torch import)
    path: Path
    weights_hash: str


@pytest.fixture(scope="session")
def cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    import torch

    from testbed.models import build_model
    from testbed.models.weights import save_weights

    torch.manual_seed(0)
    model = build_model("cnn").eval()
    path = tmp_path_factory.mktemp("weights") / "cnn.safetensors"
    return SavedModel(model, path, save_weights(model, path))


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory):  # -> ArtifactCache
    from testbed.partition import ArtifactCache

    return ArtifactCache(tmp_path_factory.mktemp("onnx"))


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before {path} appeared:\n{out}")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout_s} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass(frozen=True)
class RunningEdge:
    endpoint: str
    proc: subprocess.Popen[bytes]


def start_edge(weights: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    ready = tmp_path / f"edge-ready-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.edge", "--weights", str(weights), "--threads", "1",
         "--ready-file", str(ready), "--parent-pid", str(os.getpid()), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )
    return proc, wait_for_file(ready, proc)


@pytest.fixture(scope="module")
def edge_server(cnn_weights: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEdge]:
    proc, info = start_edge(cnn_weights.path, tmp_path_factory.mktemp("edge"))
    try:
        yield RunningEdge(str(info["endpoint"]), proc)
    finally:
        stop_process(proc)
