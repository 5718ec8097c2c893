"""The emulated lab for real: namespaces, veth/TUN links, qdiscs read back, cgroups; needs root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.lab.hosts import list_namespaces, pids_in_namespace
from testbed.lab.lab import CONGESTION_CONTROLS, Lab, pin_congestion_control
from testbed.lab.topology import LabError
from testbed.net.link import DirectionSpec, LinkSpec

from ..conftest import REPO
from .conftest import fresh_lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

PREFIX = "tbt"

# Round-trip time and goodput between a lab device and the edge, measured with plain sockets.
PROBE = r"""
import json, socket, struct, sys, time
mode, host = sys.argv[1], sys.argv[2]
if mode == "serve":
    srv = socket.create_server((host, 7777)); srv.settimeout(30); print("listening", flush=True)
    conn, _ = srv.accept(); conn.settimeout(30)
    cc = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0]
    for _ in range(15):
        conn.recv(4); conn.sendall(b"pong")
    got, first, last = 0, None, None
    while True:  # the bulk transfer, timed where it arrives
        data = conn.recv(1 << 16)
        if not data: break
        now = time.perf_counter(); first = first or now; last = now; got += len(data)
    mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    conn.sendall(struct.pack("!d16si", got * 8 / (last - first) / 1e6, cc, mss)); conn.close(); sys.exit(0)
s = socket.create_connection((host, 7777), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(15):
    t = time.perf_counter(); s.sendall(b"ping"); s.recv(4); rtts.append((time.perf_counter() - t) * 1000)
payload = b"x" * (1 << 16); t = time.perf_counter()
while time.perf_counter() - t < 1.5:
    s.sendall(payload)
s.shutdown(socket.SHUT_WR)
reply = b""
while len(reply) < 28:
    chunk = s.recv(28 - len(reply))
    if not chunk: break
    reply += chunk
rate, edge_cc, edge_mss = struct.unpack("!d16si", reply)
cc = [c.split(b"\0")[0].decode() for c in (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16), edge_cc)]
print(json.dumps({"rtt_ms": sorted(rtts)[len(rtts) // 2], "mbit_s": rate, "congestion_control": cc,
                  "edge_mss": edge_mss}))
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with fresh_lab(tmp_path / "state", PREFIX) as lab:
        yield lab


def probe(lab: Lab, device: str) -> dict[str, float]:
    state = lab.require_state()
    edge = state.topology.edge.address
    server = subprocess.Popen(lab.command_in("edge", [sys.executable, "-c", PROBE, "serve", edge]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening", server.stderr
        client = subprocess.run(lab.command_in(device, [sys.executable, "-c", PROBE, "client", edge]),
                                capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        return json.loads(client.stdout)
    finally:
        server.wait(timeout=30)


def kinds(qdiscs: list[dict]) -> set[str]:
    return {q.get("kind", "?") for q in qdiscs}


def test_delay_line_lab_shapes_rate_and_delay(lab: Lab) -> None:
    link = LinkSpec(DirectionSpec(rate_bps=50_000_000, delay_us=5_000), DirectionSpec(rate_bps=200_000_000,
                                                                                    delay_us=5_000))
    state = lab.up(2, "test", link, backend="delay-line")
    assert state.complete and set(state.topology.namespaces()) <= set(list_namespaces())
    measured = probe(lab, "dev1")
    assert 9.5 <= measured["rtt_ms"] <= 14, measured  # 5 ms each way
    assert 35 <= measured["mbit_s"] <= 55, measured  # uplink shaped to 50 Mbit/s
    # Both ends of a real connection use the lab's congestion control, not the host's default (BBR here, which
    # paces request/response replies far below the link rate).
    device_cc, edge_cc = measured["congestion_control"]
    assert device_cc == edge_cc and device_cc in CONGESTION_CONTROLS, measured
    # The edge's veth has the delay line's TUN MTU (3125 B for 50 Mbit/s), so the edge's segments to the device
    # are as large as the link carries, not 1460 B (a 1500-byte veth).
    mtu = next(p.mtu for p in state.processes if p.name == "delayline-dev1")
    assert mtu > 1500 and 1460 < measured["edge_mss"] <= mtu - 40, (mtu, measured)
    with pytest.raises(LabError, match="no TCP congestion control out of tb-no-such-cc"):
        pin_congestion_control(f"{PREFIX}-edge", ("tb-no-such-cc",))
    status = lab.status()
    dev1 = next(h for h in status["hosts"] if h["name"] == "dev1")
    assert "htb" in kinds(dev1["qdiscs"]["uplink"]) and "htb" in kinds(dev1["qdiscs"]["downlink"])
    assert dev1["interfaces"]["tun0"] == ["10.254.77.11/32"]
    assert all(d["alive"] for d in status["delay_lines"])
    # Change the link while the lab runs: less delay, a narrower uplink.
    lab.set_link("dev1", DirectionSpec(rate_bps=20_000_000, delay_us=1_000), DirectionSpec(delay_us=1_000))
    faster = probe(lab, "dev1")
    assert faster["rtt_ms"] < 5 and 12 <= faster["mbit_s"] <= 22, faster


def test_veth_lab_with_rate_only_links(lab: Lab) -> None:
    link = LinkSpec.symmetric(DirectionSpec(rate_bps=100_000_000))
    lab.up(1, "test", link, backend="netem")  # rate only: HTB, no netem needed
    measured = probe(lab, "dev1")
    assert 80 <= measured["mbit_s"] <= 100 and measured["rtt_ms"] < 2, measured
    status = lab.status()
    dev1 = next(h for h in status["hosts"] if h["name"] == "dev1")
    assert dev1["interfaces"]["eth0"] == ["10.254.77.11/24"]
    assert "htb" in kinds(dev1["qdiscs"]["uplink"])


def test_device_class_puts_lab_processes_under_a_cpu_quota(lab: Lab) -> None:
    lab.up(1, "test", LinkSpec.unlimited(), backend="netem", device_class="raspberry-pi-4")
    proc = subprocess.Popen(lab.command_in("dev1", [sys.executable, "-c", "import time; time.sleep(30)"]))
    try:
        deadline = time.monotonic() + 10
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        while cmdline.read_bytes().split(b"\0")[1:2] != [b"-c"] and time.monotonic() < deadline:
            time.sleep(0.05)  # ip netns exec -> testbed.lab.enter (joins the cgroup) -> exec the command
        assert proc.pid in pids_in_namespace(f"{PREFIX}-dev1")
        assert f"{PREFIX}-lab/dev1" in Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert any(p["pid"] == proc.pid for h in lab.status()["hosts"] for p in h.get("processes", []))
    finally:
        lab.down()  # also stops the process running in the lab
        proc.wait(timeout=10)
    assert proc.returncode is not None


def test_lab_down_cleans_up_after_a_killed_lab_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    argv = [sys.executable, "-m", "testbed.cli.main", "lab", "up", "--devices", "4", "--link", "lte",
            "--backend", "delay-line", "--prefix", PREFIX, "--state-dir", str(state_dir)]
    up = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = state_dir / f"lab-{PREFIX}.json"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if record.exists() and json.loads(record.read_text())["processes"]:
                break
            assert up.poll() is None, "lab up finished before it could be killed"
            time.sleep(0.01)
        os.kill(up.pid, signal.SIGKILL)
        up.wait()
        pids = [p["pid"] for p in json.loads(record.read_text())["processes"]]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    for _ in range(2):  # idempotent
        down = subprocess.run([sys.executable, "-m", "testbed.cli.main", "lab", "down", "--prefix", PREFIX,
                               "--state-dir", str(state_dir)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-")]
    assert all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in pids)
    assert not record.exists()


def test_demo_runs_inside_the_lab_over_the_shaped_links(lab: Lab, tmp_path: Path) -> None:
    link = LinkSpec.symmetric(DirectionSpec(rate_bps=200_000_000, delay_us=4_000))
    lab.up(2, "test", link, backend="delay-line", device_class="raspberry-pi-5")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.cli.main", "demo", "--lab", "--lab-prefix", PREFIX, "--lab-state-dir",
         str(lab.store.dir), "--devices", "2", "--limit", "60", "--epochs", "1", "--train-samples", "1000",
         "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"), "--json", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["placement"].startswith(f"lab {PREFIX}")
    for dev in report["devices"]:
        assert dev["accuracy"] == dev["reference_accuracy"]
        assert dev["stages"]["uplink"]["p50_ms"] >= 4.0 and dev["stages"]["downlink"]["p50_ms"] >= 4.0
        assert dev["e2e"]["p50_ms"] >= 8.0


def test_cpu_quota_slows_the_cnn_head_by_the_class_factor() -> None:
    from testbed.lab.calibrate import calibrate

    result = calibrate("raspberry-pi-4", host_speed=6.0, seconds=0.7, prefix=PREFIX, rounds=2)
    assert result["target_slowdown"] == 6.0
    assert abs(result["final"]["relative_error"]) <= 0.15, result
    assert not Path(f"/sys/fs/cgroup/cpu/{PREFIX}-calibrate").exists()
