"""`testbed train --lab`: the edge and the device trainers in the emulated lab's namespaces; needs root."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from testbed.lab.lab import Lab
from testbed.net.link import DirectionSpec, LinkSpec

from ..lab.conftest import fresh_lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "tbx"
DELAY_S = 0.004


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with fresh_lab(tmp_path / "state", PREFIX) as lab:
        yield lab


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_psl_trains_two_rounds_in_the_lab_over_shaped_links(lab: Lab, tmp_path: Path) -> None:
    lab.up(2, "test", LinkSpec.symmetric(DirectionSpec(rate_bps=200_000_000, delay_us=int(DELAY_S * 1e6))),
           device_class="raspberry-pi-5")
    exp = tmp_path / "lab.yaml"
    exp.write_text(yaml.safe_dump({
        "scheme": "psl", "devices": 2, "split": [3, 7],
        "data": {"train_samples": 192, "test_samples": 64},
        "training": {"batch_size": 32, "rounds_per_epoch": 2, "fedavg_every": 1},
        "runtime": {"export_onnx": False, "eval_batch_size": 64},
    }))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "testbed.cli.main", "train", str(exp), "--run-dir", str(run_dir), "--lab",
           "--lab-prefix", PREFIX, "--lab-state-dir", str(lab.store.dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"agents in lab {PREFIX}" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["history"]] == [1, 2]
    assert all(0.0 < r["train_loss"] < 10.0 and 0.0 <= r["test_acc"] <= 1.0 for r in results["history"])
    # Every activation and gradient crossed the shaped link: each message waited at least its one-way delay.
    rows = list(csv.DictReader((run_dir / "devices.csv").open()))
    assert len(rows) == 2 * 2
    for row in rows:
        steps = int(row["steps"])
        assert steps >= 1
        for stage in ("up_a1_s", "down_a2_s", "up_g2_s", "down_g1_s"):
            assert float(row[stage]) >= steps * DELAY_S * 0.9, (row["device"], stage, row[stage])
    pids = json.loads((run_dir / "pids.json").read_text())
    assert sorted(pids) == ["dev1", "dev2", "edge"] and all(gone(pid) for pid in pids.values())
    assert not (run_dir / "control.sock").exists()

    # More devices than the lab has: refused before anything starts.
    big = tmp_path / "big.yaml"
    big.write_text(exp.read_text().replace("devices: 2", "devices: 3"))
    refused = subprocess.run([*cmd[:4], str(big), "--run-dir", str(tmp_path / "big"), *cmd[7:]], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "3 devices" in refused.stdout + refused.stderr
