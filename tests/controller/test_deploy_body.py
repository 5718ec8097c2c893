"""deploy_body with real processes: an edge started without --weights waits for the controller's, refuses a
corrupted transfer (and keeps serving what it has), then serves inference through the deployed body."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from testbed.controller.api import Controller
from testbed.controller.deploy import sha256_hex
from testbed.controller.server import CommandFailed
from testbed.partition import PartitionId, activation_shape
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind
from testbed.wire.messages import DATA_LIMITS

from ..conftest import REPO, stop_process, wait_for_file
from ..test_supervisor import wait_gone

pytestmark = pytest.mark.slow

HB = 0.3


def infer(ctx: zmq.Context, endpoint: str, partition: str, a1: np.ndarray, seq: int) -> tuple[Envelope, dict]:
    sock = ctx.socket(zmq.DEALER)
    channel.configure_socket(sock, DATA_LIMITS, linger_ms=0)
    try:
        sock.connect(endpoint)
        channel.send(sock, Envelope(Kind.INFER_REQUEST, "probe", seq, partition=partition), {"a1": a1},
                     limits=DATA_LIMITS)
        assert sock.poll(60_000), "no reply from the edge within 60 s"
        _, msg = channel.recv(sock, limits=DATA_LIMITS)
        return msg.envelope, msg.tensors
    finally:
        sock.close(linger=0)


def edge_status(ctl: Controller, ok: Callable[[dict], bool] = lambda s: "weights" in s) -> dict:
    """The edge's status once a heartbeat brought one that satisfies ``ok``."""
    deadline = time.monotonic() + 30
    while not ok(status := next(v.status for v in ctl.nodes() if v.name == "edge")):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def test_an_edge_without_weights_takes_a_body_checks_its_hash_and_serves_it(cnn_weights, tmp_path: Path) -> None:
    model, weights_hash = cnn_weights.model, cnn_weights.weights_hash
    weights = cnn_weights.path.read_bytes()
    partition = str(PartitionId(weights_hash, 2, 5))
    a1 = np.ones((2, *activation_shape(model, 2)), dtype=np.float32)
    ready = tmp_path / "edge-ready.json"
    work = tmp_path / "edge-work"
    ctx = zmq.Context()
    with Controller(heartbeat_s=HB, command_timeout_s=120) as ctl:
        edge = subprocess.Popen(
            [sys.executable, "-m", "agents.edge", "--threads", "1", "--ready-file", str(ready), "--controller",
             ctl.endpoint, "--heartbeat-s", str(HB), "--work-dir", str(work), "--metrics-port", "0",
             "--parent-pid", str(os.getpid())],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            info = wait_for_file(ready, edge)
            endpoint = str(info["endpoint"])
            assert info["weights"] is None
            ctl.wait_for(0, timeout_s=60)
            assert edge_status(ctl)["weights"] is None
            metrics_url = ctl.registry.get("edge").facts["metrics_url"]  # registered, as the agents do
            assert metrics_url == info["metrics_url"]

            # Before any body: a clear error, and the edge goes on.
            env, _ = infer(ctx, endpoint, partition, a1, 1)
            assert env.kind is Kind.ERROR and env.error is not None and env.error.code == "no_body"
            assert "deploy_body" in env.error.message

            # A corrupted transfer: the announced hash does not match the bytes; nothing is written.
            bad = {"weights": np.frombuffer(weights[:-1] + bytes([weights[-1] ^ 1]), np.uint8)}
            with pytest.raises(CommandFailed) as err:
                ctl.command("edge", "deploy_body", {"weights_sha256": sha256_hex(weights), "version": 1}, bad)
            assert err.value.code == "hash_mismatch" and "sha256" in str(err.value)
            assert not (work / "body").exists()

            done = ctl.deploy_body(weights)
            assert done["weights_hash"] == weights_hash and done["model"] == model.name
            assert done["version"] == 1 and done["weights_sha256"] == sha256_hex(weights)
            env, tensors = infer(ctx, endpoint, partition, a1, 2)
            assert env.kind is Kind.INFER_REPLY and env.partition == partition
            assert edge_status(ctl, lambda s: s.get("weights") is not None)["weights"] == weights_hash
            assert tensors["a2"].shape == (2, *activation_shape(model, 5))
            with urllib.request.urlopen(metrics_url, timeout=30) as resp:
                assert f'weights="{weights_hash}"' in resp.read().decode()

            # A second corrupted body is refused too, and the body in service stays.
            with pytest.raises(CommandFailed) as err:
                ctl.command("edge", "deploy_body", {"weights_sha256": "0" * 64, "version": 2},
                            {"weights": np.frombuffer(weights, np.uint8)})
            assert err.value.code == "hash_mismatch"
            # Bytes that hash right but are no weights file: refused, the old body stays.
            junk = b"not a safetensors file"
            with pytest.raises(CommandFailed) as err:
                ctl.command("edge", "deploy_body", {"weights_sha256": sha256_hex(junk), "version": 3},
                            {"weights": np.frombuffer(junk, np.uint8)})
            assert err.value.code == "failed" and "kept" in str(err.value)
            env, tensors = infer(ctx, endpoint, partition, a1, 3)
            assert env.kind is Kind.INFER_REPLY and tensors["a2"].shape[0] == 2
            assert ctl.command("edge", "report")["served"] == 2
            assert edge.poll() is None
        finally:
            stop_process(edge)
            ctx.term()
    assert wait_gone([edge.pid]) == []


def test_an_edge_without_weights_needs_a_controller(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agents.edge", "--threads", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "give --weights, or --controller" in proc.stderr and "Traceback" not in proc.stderr
