"""The device agent as a real process, with torch made unimportable, against a real edge server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.partition import PartitionId
from testbed.training.centralized import predict

from ..conftest import REPO

pytestmark = pytest.mark.slow


def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a `torch` package that refuses to import: any torch import fails loudly."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked: the device agent must not need it')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), str(REPO)])
    return env


def run_agent(tmp_path: Path, edge: str, head: Path, tail: Path, pid: str, data: Path, *extra: str):
    out = tmp_path / f"result-{pid.replace(':', '_')}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "agents.device", "infer", "--edge", edge, "--device-id", "dev1",
         "--head", str(head), "--tail", str(tail), "--partition", pid, "--data", str(data),
         "--batch-size", "7", "--out", str(out), *extra],
        env=no_torch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    return proc, out


def test_blocker_really_blocks_torch(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


@pytest.mark.parametrize("split", [(2, 6), (4, 4)], ids=["body-on-edge", "device-only"])
def test_torch_free_agent_matches_the_unsplit_model(cnn_weights, onnx_cache, edge_server, tmp_path, split) -> None:
    model = cnn_weights.model
    a, b = split
    head, tail = onnx_cache.partition(model, cnn_weights.weights_hash, a, b)
    x = np.random.default_rng(3).standard_normal((40, *model.input_shape), dtype=np.float32)
    # Labels = the unsplit model's own predictions: the split pipeline must score exactly 1.0.
    y = predict(model, x).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    pid = str(PartitionId(cnn_weights.weights_hash, a, b))
    proc, out = run_agent(tmp_path, edge_server.endpoint, head, tail, pid, data)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["samples"] == 40 and result["correct"] == 40
    assert result["requests"] == 6  # 40 images in batches of 7
    assert result["split"] == [a, b]
    body = result["stages_ms"]["body"]
    assert (min(body) > 0) if a < b else (max(body) == 0)
    assert all(len(v) == 6 for v in result["stages_ms"].values())


def test_agent_reports_an_edge_refusal_clearly(cnn_weights, onnx_cache, edge_server, tmp_path) -> None:
    model = cnn_weights.model
    head, tail = onnx_cache.partition(model, cnn_weights.weights_hash, 2, 6)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, *model.input_shape), np.float32), y=np.zeros(3, np.int64))
    wrong = str(PartitionId("f" * 16, 2, 6))
    proc, _ = run_agent(tmp_path, edge_server.endpoint, head, tail, wrong, data)
    assert proc.returncode == 2
    assert "unknown_weights" in proc.stderr and "Traceback" not in proc.stderr


def test_agent_gives_up_on_a_silent_edge(cnn_weights, onnx_cache, tmp_path) -> None:
    model = cnn_weights.model
    head, tail = onnx_cache.partition(model, cnn_weights.weights_hash, 2, 6)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, *model.input_shape), np.float32), y=np.zeros(3, np.int64))
    pid = str(PartitionId(cnn_weights.weights_hash, 2, 6))
    proc, _ = run_agent(tmp_path, "tcp://127.0.0.1:9", head, tail, pid, data, "--timeout-s", "0.5")
    assert proc.returncode == 2
    assert "no reply from the edge within 500 ms" in proc.stderr and "Traceback" not in proc.stderr


def test_slowdown_stretches_head_and_tail_on_the_device(cnn_weights, onnx_cache, edge_server, tmp_path) -> None:
    """--slowdown 4 makes the head about 4x as long as in the same agent at 1x. Two processes' sub-millisecond
    timings on a loaded machine differ by more than a few percent, so the check is loose: it fails when the
    dilation is missing (about 1x) or applied twice (about 16x), not on noise."""
    model = cnn_weights.model
    head, tail = onnx_cache.partition(model, cnn_weights.weights_hash, 5, 8)
    data = tmp_path / "data.npz"
    x = np.random.default_rng(5).standard_normal((280, *model.input_shape), dtype=np.float32)
    np.savez(data, x=x, y=np.zeros(280, np.int64))
    pid = str(PartitionId(cnn_weights.weights_hash, 5, 8))
    medians = {}  # of 40 requests each
    for factor in ("1", "4"):
        proc, out = run_agent(tmp_path, edge_server.endpoint, head, tail, pid, data, "--slowdown", factor)
        assert proc.returncode == 0, proc.stderr
        medians[factor] = float(np.median(json.loads(out.read_text())["stages_ms"]["head"]))
    assert 2.5 <= medians["4"] / medians["1"] <= 6.5, medians
    bad, _ = run_agent(tmp_path, edge_server.endpoint, head, tail, pid, data, "--slowdown", "0.5")
    assert bad.returncode == 2 and "--slowdown" in bad.stderr
