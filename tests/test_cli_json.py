"""`--json` on the commands that act (lab up/down, link set/replay/import-mahimahi, remote wheelhouse, controller
serve, profile): each run for real in its own process; stdout must be exactly one JSON document (line for serve)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import REPO, RunningEdge, SavedModel, stop_process

PREFIX = "tbj"
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")


def run_testbed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def json_of(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout: nothing else may be printed there


def write_mahimahi(path: Path, per_second: list[int]) -> None:
    """A Mahimahi trace: one line per 1500-byte delivery opportunity (ms), ``per_second[k]`` of them in second k."""
    stamps = [k * 1000 + (i + 1) * 1000 // n for k, n in enumerate(per_second) for i in range(n)]
    path.write_text("".join(f"{t}\n" for t in stamps))


def test_import_mahimahi_json_names_the_file_and_the_rates(tmp_path: Path) -> None:
    write_mahimahi(tmp_path / "t.up", [500, 250])  # 6 then 3 Mbit/s
    write_mahimahi(tmp_path / "t.down", [1000, 2000])  # 12 then 24 Mbit/s
    out = tmp_path / "trace.csv"
    info = json_of(run_testbed("link", "import-mahimahi", str(tmp_path / "t.up"), str(tmp_path / "t.down"),
                           "--out", str(out), "--delay", "7ms", "--json"))
    assert info["out"] == str(out) and out.is_file()
    assert info["name"] == "trace" and info["steps"] == 2 and info["period_ms"] == 2000
    assert info["delay_us"] == 7000 and info["window_ms"] == 1000
    assert info["uplink_bps"] == {"min": 3_000_000, "max": 6_000_000}
    assert info["downlink_bps"] == {"min": 12_000_000, "max": 24_000_000}
    assert info["mean_uplink_bps"] == 4_500_000 and info["mean_downlink_bps"] == 18_000_000


def test_json_errors_stay_one_line_with_exit_2(tmp_path: Path) -> None:
    missing = run_testbed("link", "import-mahimahi", str(tmp_path / "no.up"), str(tmp_path / "no.down"),
                      "--out", str(tmp_path / "x.csv"), "--json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("testbed: error: ") and len(missing.stderr.strip().splitlines()) == 1
    nothing = run_testbed("profile", "--no-blocks", "--json")
    assert nothing.returncode == 2 and nothing.stdout == "" and "nothing to do" in nothing.stderr
    bad_extra = run_testbed("remote", "wheelhouse", "--out", str(tmp_path / "w"), "--extra", "gpu", "--json")
    assert bad_extra.returncode == 2 and bad_extra.stdout == "" and "--extra" in bad_extra.stderr


def test_profile_json_reports_the_blocks_and_the_file(tmp_path: Path) -> None:
    out = tmp_path / "cnn.yaml"
    proc = run_testbed("profile", "--json", "--repeats", "3", "--warmup", "1", "-b", "1", "-b", "2", "--out", str(out))
    info = json_of(proc)
    assert set(info) == {"block_profile"}  # no --edge: no link measurement
    blocks = info["block_profile"]
    assert blocks["path"] == str(out) and out.is_file()
    assert blocks["kind"] == "blocks" and blocks["model"]["name"] == "cnn"
    assert blocks["measurement"]["repeats"] == 3 and blocks["measurement"]["warmup"] == 1
    assert [b["batch_size"] for b in blocks["batches"]] == [1, 2]
    n = blocks["model"]["num_blocks"]
    assert len(blocks["batches"][0]["fwd_ms"]["median"]) == n and len(blocks["act_bytes_per_sample"]) == n + 1
    assert "block profile written to" in proc.stderr  # messages still shown, on stderr


@pytest.mark.slow
def test_profile_json_measures_the_link_to_a_real_edge(cnn_weights: SavedModel, edge_server: RunningEdge,
                                                       tmp_path: Path) -> None:
    info = json_of(run_testbed("profile", "--json", "--no-blocks", "--weights", str(cnn_weights.path),
                           "--edge", edge_server.endpoint, "--link-size", "1MiB", "--link-size", "4MiB",
                           "--link-count", "3", "--link-out", str(tmp_path / "link.yaml")))
    assert set(info) == {"link"}
    link = info["link"]
    assert link["path"] == str(tmp_path / "link.yaml") and Path(link["path"]).is_file()
    assert link["endpoint"] == edge_server.endpoint and link["sizes_bytes"] == [1 << 20, 4 << 20]
    assert link["uplink_bps"] > 0 and link["rtt_ms"]["median"] > 0


@pytest.mark.slow
def test_remote_wheelhouse_json_lists_the_wheels(tmp_path: Path) -> None:
    out = tmp_path / "wheels"
    info = json_of(run_testbed("remote", "wheelhouse", "--out", str(out), "--extra", "agent", "--json", timeout=900))
    assert info["directory"] == str(out) and info["extra"] == "agent"
    assert sorted(info["wheels"]) == sorted(p.name for p in out.glob("*.whl"))
    assert any(w.startswith("edge_split_testbed-") for w in info["wheels"])
    assert any(w.startswith("onnxruntime-") for w in info["wheels"])


def _first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        raise AssertionError(f"no line from the controller within {timeout_s} s") from None


@pytest.mark.slow
def test_controller_serve_json_prints_where_it_listens(tmp_path: Path) -> None:
    run_dir = tmp_path / "ctl"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli.main", "controller", "serve", "--json",
                             "--bind", "tcp://127.0.0.1:*", "--run-dir", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(_first_line(proc, 60))
        assert info["pid"] == proc.pid and info["run_dir"] == str(run_dir)
        assert info["endpoint"].startswith("tcp://127.0.0.1:") and not info["endpoint"].endswith(":*")
        status = json_of(run_testbed("status", "--controller", info["endpoint"], "--json", timeout=60))
        assert status["endpoint"] == info["endpoint"] and status["nodes"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None and proc.stdout.read() == ""  # one line, nothing after it
    finally:
        stop_process(proc)  # type: ignore[arg-type]
    assert proc.returncode == 0


def test_replay_summary_is_bounded() -> None:
    from testbed.cli.link import replay_summary
    from testbed.net.link import DirectionSpec, LinkSpec

    steps = [(100 * i, LinkSpec(DirectionSpec(rate_bps=1000 * (i + 1), delay_us=i), DirectionSpec(rate_bps=None)))
             for i in range(500)]
    summary = replay_summary(steps, limit=20)
    assert summary["count"] == 500 and summary["truncated"] and len(summary["listed"]) == 20
    assert summary["uplink_rate_bps"] == {"min": 1000, "max": 500_000} and summary["downlink_rate_bps"] is None
    assert summary["delay_us"] == {"min": 0, "max": 499}
    assert summary["listed"][19]["t_ms"] == 1900
    json.dumps(summary)  # serialisable as it is


TRACE = """# name: tbj-steps
# source: written by tests/test_cli_json.py
t_ms,uplink_bps,downlink_bps,delay_us
0,10000000,20000000,5000
200,5000000,8000000,9000
"""


@pytest.mark.netns
@pytest.mark.slow
@NEEDS_ROOT
def test_lab_and_link_json_round_trip(tmp_path: Path) -> None:
    from testbed.lab.hosts import list_namespaces

    lab = ["--prefix", PREFIX, "--state-dir", str(tmp_path / "state")]
    trace = tmp_path / "steps.csv"
    trace.write_text(TRACE)
    try:
        up = json_of(run_testbed("lab", "up", "--devices", "1", "--link", "lte", "--json", *lab))
        assert up["prefix"] == PREFIX and up["backend"] in ("netem", "delay-line") and up["complete"]
        assert [(h["name"], h["netns"], h["role"]) for h in up["hosts"]] == [
            ("edge", f"{PREFIX}-edge", "edge"), ("dev1", f"{PREFIX}-dev1", "device")]
        assert all(h["address"].startswith("10.") for h in up["hosts"])
        assert up["links"]["dev1"]["uplink"] == {"rate_bps": 5_700_000, "delay_us": 16_500, "jitter_us": 0,
                                                 "loss_ppm": 0}

        changed = json_of(run_testbed("link", "set", "dev1", "--rate", "42mbit", "--delay", "3ms",
                                  "--direction", "uplink", "--json", *lab))
        assert changed["device"] == "dev1"
        assert changed["link"]["uplink"]["rate_bps"] == 42_000_000 and changed["link"]["uplink"]["delay_us"] == 3000
        assert changed["link"]["downlink"]["rate_bps"] == 29_000_000  # the other direction keeps the profile
        shown = {d["name"]: d for d in json_of(run_testbed("link", "show", "--json", *lab))}
        assert shown["dev1"]["link"]["uplink"]["rate_bps"] == 42_000_000

        replay = json_of(run_testbed("link", "replay", "dev1", str(trace), "--duration", "0.7", "--json", *lab))
        steps = replay["steps"]
        assert replay["trace"] == "tbj-steps" and steps["count"] >= 2 and not steps["truncated"]
        assert steps["listed"][0] == {"t_ms": 0, "uplink_bps": 10_000_000, "downlink_bps": 20_000_000,
                                      "uplink_delay_us": 5000, "downlink_delay_us": 5000}
        assert steps["uplink_rate_bps"] == {"min": 5_000_000, "max": 10_000_000}
        assert replay["restored"]["uplink"]["rate_bps"] == 42_000_000  # the link as it was before the replay

        down = json_of(run_testbed("lab", "down", "--json", *lab))
        assert down["prefix"] == PREFIX and f"netns {PREFIX}-dev1" in down["removed"]
        pids = [int(r.rsplit("(", 1)[1].rstrip(")")) for r in down["removed"] if r.startswith("process ")]
        assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in pids)
        assert json_of(run_testbed("lab", "down", "--json", *lab))["removed"] == []
    finally:
        run_testbed("lab", "down", *lab)
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-")]
    assert not (tmp_path / "state" / f"lab-{PREFIX}.json").exists()
