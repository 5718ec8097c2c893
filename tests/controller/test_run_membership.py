"""A device agent SIGKILLed in the middle of `testbed run`: the controller marks it down within 3 heartbeats,
re-plans without it at once, and the other devices keep serving without a failed request."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import REPO
from ..test_supervisor import wait_gone
from .test_run import PROFILES, write_spec

HEARTBEAT_S = 0.5  # down after 1.5 s of silence: no live device is taken for dead on a loaded machine


def wait_for(check, what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s} s")


@pytest.mark.slow
def test_a_device_killed_mid_run_is_planned_out_and_the_others_keep_going(cnn_weights, tmp_path: Path) -> None:
    from testbed.controller.run import run_experiment
    from testbed.controller.runspec import load_runspec

    out = tmp_path / "out"
    spec = write_spec(tmp_path / "kill.yaml", name="kill", weights=str(cnn_weights.path), placement="loopback",
                      edge={"device": "cpu"},
                      devices=[{"id": f"dev{i}", "data": "synthetic"} for i in (1, 2, 3)],
                      planner={**PROFILES, "evaluate_every": "250ms"},
                      workload={"batch_size": 8, "duration": "9s", "rate": 20}, metrics=False, output=str(out))
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = run_experiment(load_runspec(spec, base_dir=REPO), say=lambda _: None,
                                               cache_dir=tmp_path / "cache", heartbeat_s=HEARTBEAT_S)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    runner = threading.Thread(target=run, name="testbed-run")
    runner.start()
    try:
        pids = wait_for(lambda: (out / "pids.json").exists() and json.loads((out / "pids.json").read_text()),
                        "the run's processes", 120)
        # Let the workload run a little (the first request waits for the edge's first torch run).
        wait_for(lambda: (out / "controller.json").exists(), "the controller", 60)
        time.sleep(4.0)
        killed_at = time.monotonic()
        os.kill(pids["dev2"], signal.SIGKILL)
    finally:
        runner.join(timeout=180)
    assert not runner.is_alive(), "the run did not finish"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    down = [d for d in decisions if d.get("event") == "node_down" and d.get("device") == "dev2"]
    assert len(down) == 1, decisions
    replans = [d for d in decisions if "membership changed" in str(d.get("reason", ""))]
    assert replans and "dev2" in replans[0]["reason"], decisions
    after = replans[0]["plan"]
    assert set(after) == {"dev1", "dev3"}, after  # planned without the dead device
    assert replans[0]["t_s"] >= down[0]["t_s"]
    # The survivors kept serving, before and after the kill, with no failure.
    for dev in ("dev1", "dev3"):
        stats = summary["devices"][dev]
        assert stats["requests"] > 0 and stats.get("failed", 0) == 0, stats
    assert not summary["device_failures"].get("dev1") and not summary["device_failures"].get("dev3")
    print(f"dev2 SIGKILLed {time.monotonic() - killed_at:.1f} s before the run ended; down at t={down[0]['t_s']} s, "
          f"re-plan at t={replans[0]['t_s']} s")
    assert wait_gone(list(pids.values())) == []
    assert not (out / "controller.json").exists()
