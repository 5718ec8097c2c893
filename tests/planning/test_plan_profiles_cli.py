"""`testbed plan --profiles …`: plans from measured profiles, device classes and link profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO

MEASURED = REPO / "profiles" / "measured"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_plan_from_measured_profiles(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    proc = run("--profiles", str(MEASURED / "vm-cnn-onnxruntime.yaml"),
               "--profiles", str(MEASURED / "vm-cnn-torch.yaml"),
               "--devices", "3", "--device-class", "raspberry-pi-4", "--link", "6g-vision", "--link", "lte",
               "--batch-size", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "round time" in proc.stdout and "fixed-middle" in proc.stdout
    report = json.loads(out.read_text())
    text = json.dumps(report)
    assert "lscra" in text and text.count("raspberry-pi-4") >= 3


def test_plan_needs_exactly_one_input() -> None:
    neither = run()
    assert neither.returncode == 2 and "--input FILE or --profiles" in neither.stderr
    both = run("--input", "x.yaml", "--profiles", str(MEASURED / "vm-cnn-onnxruntime.yaml"))
    assert both.returncode == 2 and "Traceback" not in both.stderr
    unknown = run("--profiles", str(MEASURED / "vm-cnn-onnxruntime.yaml"), "--batch-size", "8",
                  "--device-class", "pi-9")
    assert unknown.returncode == 2 and "pi-9" in unknown.stderr and "Traceback" not in unknown.stderr


def test_compact_table_groups_every_stage() -> None:
    """Every stage (the measured fixed costs included) lands in one column of the compact table, and the
    per-stage table names them."""
    import dataclasses

    from rich.console import Console

    from testbed.cli.plan import GROUPS, plans_for, render
    from testbed.planning.instances import random_problem
    from testbed.planning.model import TRAINING_STAGES

    grouped = [s for group in GROUPS.values() for s in group]
    assert sorted(grouped) == sorted(TRAINING_STAGES)  # each stage exactly once
    rnd = random_problem(1, 2, 5)
    problem = dataclasses.replace(
        rnd, model=dataclasses.replace(rnd.model, tail_call_s=0.001),
        devices=tuple(dataclasses.replace(d, edge_request_s=0.002) for d in rnd.devices))
    primary, others = plans_for(problem)
    console = Console(record=True, width=250)
    render(problem, primary, others, console, all_stages=True)
    text = console.export_text()
    assert "edge_request" in text and "tail_call" in text
