"""The lab as a user drives it: `testbed lab|link|doctor` commands in real processes (needs root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.lab.hosts import list_namespaces

from ..conftest import REPO

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]
PREFIX = "tbc"
TRACES = REPO.parent / "shared" / "traces" / "mahimahi"


def run_testbed(*args: str, state_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    extra = ["--prefix", PREFIX, "--state-dir", str(state_dir)] if state_dir else []
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", *args, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    run_testbed("lab", "down", state_dir=path)
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-")]


def test_doctor_reports_the_backend_of_each_capability() -> None:
    proc = run_testbed("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    caps = {c["name"]: c for c in report["capabilities"]}
    assert caps["htb"]["available"]
    assert report["backends"]["rate"] == "htb"
    netem = caps["netem"]["available"]
    assert report["backends"]["delay"] == ("netem" if netem else "delay-line")
    if not netem:
        assert "ENOENT" in caps["netem"]["reason"]


def test_lab_link_commands_round_trip(state_dir: Path, tmp_path: Path) -> None:
    up = run_testbed("lab", "up", "--devices", "2", "--link", "lte", "--device-class", "raspberry-pi-5",
                 state_dir=state_dir)
    assert up.returncode == 0, up.stderr
    again = run_testbed("lab", "up", "--devices", "2", state_dir=state_dir)
    assert again.returncode == 2 and "exists already" in again.stderr and "Traceback" not in again.stderr

    status = json.loads(run_testbed("lab", "status", "--json", state_dir=state_dir).stdout)
    assert [h["name"] for h in status["hosts"]] == ["edge", "dev1", "dev2"]
    assert all(h["present"] for h in status["hosts"])
    assert status["hosts"][1]["device_class"] == "raspberry-pi-5"

    changed = run_testbed("link", "set", "dev2", "--rate", "42mbit", "--delay", "3ms", "--direction", "uplink",
                      state_dir=state_dir)
    assert changed.returncode == 0, changed.stderr
    links = {d["name"]: d for d in json.loads(run_testbed("link", "show", "--json", state_dir=state_dir).stdout)}
    assert links["dev2"]["link"]["uplink"] == {"rate_bps": 42_000_000, "delay_us": 3000, "jitter_us": 0,
                                               "loss_ppm": 0}
    assert links["dev2"]["link"]["downlink"]["delay_us"] == 16_500  # untouched: the lte profile
    htb = [q for q in links["dev2"]["qdiscs"]["uplink"] if q.get("kind") == "htb-class"]
    assert htb and htb[0]["rate_bps"] == 42_000_000  # read back from the kernel

    bad = run_testbed("link", "set", "dev2", "--rate", "fast", state_dir=state_dir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    edge = run_testbed("link", "set", "edge", "--rate", "1mbit", state_dir=state_dir)
    assert edge.returncode == 2 and "never shaped" in edge.stderr

    if not TRACES.exists():
        pytest.skip(f"{TRACES} (the project's shared traces) is not beside this checkout")
    trace = tmp_path / "verizon.csv"
    imported = run_testbed("link", "import-mahimahi", str(TRACES / "Verizon-LTE-short.up"),
                       str(TRACES / "Verizon-LTE-short.down"), "--out", str(trace))
    assert imported.returncode == 0, imported.stderr
    assert "mean uplink 5.9" in imported.stdout
    replay = run_testbed("link", "replay", "dev1", str(trace), "--duration", "2.5", state_dir=state_dir)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.count("dev1: up") >= 2  # the rate changed at least once a second
    after = {d["name"]: d for d in json.loads(run_testbed("link", "show", "--json", state_dir=state_dir).stdout)}
    assert after["dev1"]["link"] == links["dev1"]["link"]  # the replay put the profile back

    down = run_testbed("lab", "down", state_dir=state_dir)
    assert down.returncode == 0 and "netns tbc-dev1" in down.stdout
    assert run_testbed("lab", "down", state_dir=state_dir).stdout.strip() == "nothing to remove"
