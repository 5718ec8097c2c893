"""The controller (`testbed train`) killed with SIGKILL mid-run: its agents go with it, and --resume finishes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from testbed.training.checkpoint import CHECKPOINT
from testbed.training.experiment import parse_experiment
from testbed.training.schemes import run_experiment

REPO = Path(__file__).resolve().parents[2]

# 2 devices, 2 epochs of 6 rounds of 2 steps: long enough to be killed after the first checkpoint.
DOC = {
    "name": "crash",
    "scheme": "psl",
    "devices": 2,
    "split": [3, 7],
    "data": {"train_samples": 384, "test_samples": 64},
    "training": {"batch_size": 16, "epochs": 2, "rounds_per_epoch": 6, "fedavg_every": 3},
    "runtime": {"export_onnx": False, "eval_batch_size": 64},
}


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_until(predicate, timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def rounds_done(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "rounds.json").read_text()))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_of_the_controller_takes_its_agents_and_resume_finishes(tmp_path: Path) -> None:
    exp = tmp_path / "crash.yaml"
    exp.write_text(yaml.safe_dump(DOC))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "testbed.cli.main", "train", str(exp), "--run-dir", str(run_dir)]
    controller = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: rounds_done(run_dir) >= 1 or controller.poll() is not None, 300), "no round"
        assert controller.poll() is None, f"the run ended before it could be killed: {controller.stderr.read()}"
        agents = json.loads((run_dir / "pids.json").read_text())
        assert sorted(agents) == ["dev1", "dev2", "edge"]
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=30)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
    kept = rounds_done(run_dir)
    assert 1 <= kept < 12, "killed mid-run, after the first checkpoint"
    # Every agent notices its parent's death (PR_SET_PDEATHSIG -> SIGTERM) and exits: nothing is left behind.
    assert wait_until(lambda: all(gone(pid) for pid in agents.values()), 30), \
        {name: pid for name, pid in agents.items() if not gone(pid)}

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["history"]] == list(range(1, 13)) and results["resumed"]
    new_agents = json.loads((run_dir / "pids.json").read_text())
    assert set(new_agents.values()).isdisjoint(agents.values()) and all(gone(p) for p in new_agents.values())

    # The resumed run is the uninterrupted run, bit for bit (at most the round in progress was redone).
    straight = run_experiment(parse_experiment(DOC), tmp_path / "straight")
    a, b = load_file(str(run_dir / CHECKPOINT)), load_file(str(tmp_path / "straight" / CHECKPOINT))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [r["test_acc"] for r in results["history"]] == [r["test_acc"] for r in straight["history"]]
    assert all(gone(pid) for pid in json.loads((tmp_path / "straight" / "pids.json").read_text()).values())
