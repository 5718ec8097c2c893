"""A training agent that cannot start (its data endpoint is taken) says why in one line and exits at once: the
socket its failed start-up left open must not keep its ZeroMQ context (and so the process) alive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import zmq

from ..conftest import REPO
from .test_split_training import experiment


def test_an_edge_whose_data_endpoint_is_taken_exits_with_a_clear_error(tmp_path: Path) -> None:
    spec = tmp_path / "experiment.json"
    spec.write_text(json.dumps(experiment(scheme="psl", devices=2, split=[3, 7]).to_dict()))
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    try:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        proc = subprocess.run(
            [sys.executable, "-m", "agents.train_edge", "--control", "tcp://127.0.0.1:9", "--spec", str(spec),
             "--bind", f"tcp://127.0.0.1:{port}"],
            cwd=REPO, capture_output=True, text=True, timeout=60)  # before the fix: blocked in ctx.term() forever
    finally:
        taken.close(linger=0)
        ctx.term()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["train-edge: Address already in use (addr='tcp://127.0.0.1:"
                                                f"{port}')"], proc.stderr
