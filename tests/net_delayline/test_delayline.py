"""The delay line's shell: the packet loop and control socket (no root), then real TUNs in namespaces (root).

The root tests create only namespaces named `tb-t-dl-<pid>-…` and remove exactly those. The outer namespace plays
the edge: it holds the edge address on its loopback, so traffic between the device namespace and the edge crosses
the delay line and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.net.delayline import ControlServer, DelayLine, control_request
from testbed.net.delayqueue import ControlHandler, Direction, Impairment
from tests.conftest import REPO, stop_process, wait_for_file

EDGE_IP = "10.254.77.1"
DEVICE_IP = "10.254.77.11"
SO_TIMESTAMPNS = 35

# -- the packet loop over socket pairs (no root) -----------------------------------------------------------------


@contextlib.contextmanager
def running_loop(up: Impairment, down: Impairment) -> Iterator[tuple[socket.socket, socket.socket, DelayLine]]:
    """A DelayLine whose 'TUNs' are datagram socket pairs; yields (device end, edge end, line)."""
    dev_a, dev_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    edge_a, edge_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (dev_a, edge_a):
        s.setblocking(False)
    line = DelayLine(
        dev_a.fileno(), edge_a.fileno(), Direction("uplink", up), Direction("downlink", down), read_size=65536
    )
    stop = threading.Event()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    t = threading.Thread(target=line.run, args=(stop, wake_r), daemon=True)
    t.start()
    try:
        yield dev_b, edge_b, line
    finally:
        stop.set()
        os.write(wake_w, b"x")
        t.join(2)
        alive = t.is_alive()
        for fd in (wake_r, wake_w):
            os.close(fd)
        for s in (dev_a, dev_b, edge_a, edge_b):
            s.close()
        assert not alive, "the loop did not stop within 2 s of the stop event and a wake-up"


def test_loop_delays_each_direction_and_stops() -> None:
    with running_loop(Impairment(delay_us=30_000), Impairment(delay_us=10_000)) as (dev, edge, line):
        dev.settimeout(2)
        edge.settimeout(2)
        t0 = time.monotonic()
        dev.send(b"up-1")
        assert edge.recv(100) == b"up-1"
        t_up = time.monotonic() - t0
        t0 = time.monotonic()
        edge.send(b"down-1")
        assert dev.recv(100) == b"down-1"
        t_down = time.monotonic() - t0
        assert 0.030 <= t_up < 0.130  # never early; late only by what a loaded machine's scheduler adds
        assert 0.010 <= t_down < 0.110
        deadline = time.monotonic() + 1.0  # the loop counts a packet just after the receiver may have it
        while time.monotonic() < deadline and line.downlink.stats()["bytes_out"] != 6:
            time.sleep(0.01)
        assert line.uplink.stats()["packets_out"] == 1 and line.downlink.stats()["bytes_out"] == 6


def test_loop_keeps_order_and_counts_loss() -> None:
    with running_loop(Impairment(delay_us=5_000, jitter_us=4_000, loss_ppm=500_000), Impairment()) as (dev, edge, line):
        edge.settimeout(2.0)  # the end of the stream: 2 s without a packet (not a stall of this loaded process)
        for i in range(200):
            dev.send(struct.pack("!i", i))
        got = []
        with contextlib.suppress(TimeoutError):
            while len(got) < 200:
                got.append(struct.unpack("!i", edge.recv(16))[0])
        assert got == sorted(got), "order-keeping jitter reordered packets"
        s = line.uplink.stats()  # the last packet arrived at least 2 s ago: the counters have settled
        assert s["packets_in"] == 200 and s["packets_out"] == len(got) and s["drops_loss"] == 200 - len(got)
        assert 60 < len(got) < 140


# -- the control socket (no root) ---------------------------------------------------------------------------------


def test_control_socket_round_trip(tmp_path: Path) -> None:
    h = ControlHandler(Direction("uplink", Impairment()), Direction("downlink", Impairment()))
    path = tmp_path / "dl.sock"
    server = ControlServer(path, h)
    stop = threading.Event()
    server.start(stop)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        reply = control_request(path, {"uplink": {"delay_us": 7000}})
        assert reply["ok"] and reply["uplink"]["delay_us"] == 7000
        assert control_request(path, {"cmd": "stats"})["uplink"]["delay_us"] == 7000
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # raw: two requests on one connection
            s.settimeout(2)
            s.connect(str(path))
            s.sendall(b'not json\n{"cmd": "get"}\n')
            buf = b""
            while buf.count(b"\n") < 2:
                chunk = s.recv(4096)
                assert chunk
                buf += chunk
            first, second = (json.loads(x) for x in buf.split(b"\n")[:2])
        assert first["ok"] is False and "bad JSON" in first["error"]
        assert second["ok"] and second["uplink"]["delay_us"] == 7000
        with pytest.raises(FileExistsError):
            ControlServer(path, h)  # a live one is never replaced
    finally:
        stop.set()
        server.close()
    assert not path.exists()


def test_control_socket_replaces_a_stale_one_but_nothing_else(tmp_path: Path) -> None:
    h = ControlHandler(Direction("uplink", Impairment()), Direction("downlink", Impairment()))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # left behind, nobody listening: like a SIGKILLed delay line
    server = ControlServer(stale, h)
    server.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        ControlServer(regular, h)
    assert regular.read_text() == "keep me"


# -- real TUN devices in namespaces (root) -----------------------------------------------------------------------

HAVE_ROOT = os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None
needs_root = pytest.mark.skipif(not HAVE_ROOT, reason="needs root, /dev/net/tun and iproute2")


def ip(*args: str, check: bool = True) -> str:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10).stdout


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[tuple[str, str]]:
    """Create `tb-t-dl-<pid>-<tag>-i` (device) and `-o` (edge, EDGE_IP on lo); remove exactly those."""
    inner, outer = f"tb-t-dl-{os.getpid()}-{tag}-i", f"tb-t-dl-{os.getpid()}-{tag}-o"
    made: list[str] = []
    try:
        for ns in (inner, outer):
            ip("netns", "add", ns)
            made.append(ns)
        ip("-n", outer, "link", "set", "lo", "up")
        ip("-n", outer, "addr", "add", f"{EDGE_IP}/32", "dev", "lo")
        yield inner, outer
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)


@dataclass
class Running:
    inner: str
    outer: str
    outer_tun: str
    proc: subprocess.Popen[bytes]
    control: Path
    info: dict[str, object]

    def set(self, **dirs: dict[str, int]) -> dict[str, object]:
        reply = control_request(self.control, {"cmd": "set", **dirs})
        assert reply["ok"], reply
        return reply

    def stats(self) -> dict[str, dict[str, int]]:
        return control_request(self.control, {"cmd": "stats"})


def start_delayline(inner: str, outer: str, rundir: Path, *extra: str, outer_tun: str = "tbt-dl") -> Running:
    ready, control = rundir / f"{outer_tun}.json", rundir / f"{outer_tun}.sock"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.net.delayline", "--inner-ns", inner, "--outer-ns", outer,
         "--outer-tun", outer_tun, "--address", DEVICE_IP, "--control", str(control), "--ready-file", str(ready),
         "--seed", "1", "--parent-pid", str(os.getpid()), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        info = wait_for_file(ready, proc, timeout_s=20)
    except BaseException:
        stop_process(proc)
        raise
    return Running(inner, outer, outer_tun, proc, control, info)


def in_ns_socket(ns: str, kind: int) -> socket.socket:
    from testbed.net.tun import in_netns

    with in_netns(ns):
        return socket.socket(socket.AF_INET, kind)


def udp_rtts(r: Running, count: int, interval_s: float = 0.005) -> list[float]:
    """UDP echo round trips (ms), device → edge → device; lost ones are left out."""
    srv = in_ns_socket(r.outer, socket.SOCK_DGRAM)
    srv.bind((EDGE_IP, 0))
    srv.settimeout(0.1)
    cli = in_ns_socket(r.inner, socket.SOCK_DGRAM)
    cli.settimeout(0.5)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, addr = srv.recvfrom(64)
            except TimeoutError:
                continue
            srv.sendto(data, addr)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    out: list[float] = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            cli.sendto(struct.pack("!i", i), srv.getsockname())
            with contextlib.suppress(TimeoutError):
                while struct.unpack("!i", cli.recv(64))[0] != i:
                    pass
                out.append((time.perf_counter() - t0) * 1000)
            time.sleep(interval_s)
    finally:
        stop.set()
        t.join(2)
        srv.close()
        cli.close()
    return out


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    if not HAVE_ROOT:
        pytest.skip("needs root, /dev/net/tun and iproute2")
    with namespaces("m") as (inner, outer):
        r = start_delayline(inner, outer, tmp_path_factory.mktemp("dl"), "--up-delay-us", "10000",
                            "--down-delay-us", "10000")
        try:
            yield r
        finally:
            rc = stop_process(r.proc)
            out = r.proc.stdout.read().decode(errors="replace") if r.proc.stdout else ""
            assert rc == 0, out
            assert "delayline: stopped" in out
            assert not ip("-n", outer, "link", "show", r.outer_tun, check=False).strip()


@needs_root
@pytest.mark.netns
def test_topology_as_the_lab_expects(line: Running) -> None:
    assert line.info["address"] == DEVICE_IP and line.info["pid"] == line.proc.pid
    inner_addr = ip("-n", line.inner, "-o", "addr", "show", "dev", "tun0")
    assert f"inet {DEVICE_IP}/32" in inner_addr
    assert "mtu 65000" in ip("-n", line.inner, "link", "show", "tun0")
    assert "UP" in ip("-n", line.inner, "link", "show", "lo")
    assert ip("-n", line.inner, "route", "show", "default").startswith("default dev tun0")
    assert f"{DEVICE_IP} dev {line.outer_tun}" in ip("-n", line.outer, "route")
    assert "mtu 65000" in ip("-n", line.outer, "link", "show", line.outer_tun)


@needs_root
@pytest.mark.netns
def test_rtt_is_twice_the_one_way_delay(line: Running) -> None:
    line.set(uplink={"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 0},
             downlink={"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 0})
    rtts = udp_rtts(line, 100)
    med = statistics.median(rtts)
    print(f"\nRTT at 10 ms each way: median {med:.3f} ms, min {min(rtts):.3f}, max {max(rtts):.3f} (n={len(rtts)})")
    assert len(rtts) == 100
    assert 19.0 <= med <= 21.0
    assert min(rtts) >= 19.8, "packets left the delay line early"


@needs_root
@pytest.mark.netns
def test_one_way_delay_each_direction(line: Running) -> None:
    """Send time → kernel receive timestamp (SO_TIMESTAMPNS): the delay line's own accuracy, per direction."""
    line.set(uplink={"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 0},
             downlink={"delay_us": 5_000, "jitter_us": 0, "loss_ppm": 0})
    result = {}
    for name, src, src_ip, dst, dst_ip in (("uplink", line.inner, DEVICE_IP, line.outer, EDGE_IP),
                                           ("downlink", line.outer, EDGE_IP, line.inner, DEVICE_IP)):
        rx = in_ns_socket(dst, socket.SOCK_DGRAM)
        rx.bind((dst_ip, 0))
        rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rx.settimeout(1.0)
        tx = in_ns_socket(src, socket.SOCK_DGRAM)
        tx.bind((src_ip, 0))
        samples = []
        try:
            for _ in range(60):
                tx.sendto(struct.pack("!q", time.time_ns()), (dst_ip, rx.getsockname()[1]))
                data, anc, _, _ = rx.recvmsg(64, socket.CMSG_SPACE(16))
                sec, nsec = struct.unpack("qq", anc[0][2][:16])
                samples.append((sec * 10**9 + nsec - struct.unpack("!q", data)[0]) / 1e6)
                time.sleep(0.005)
        finally:
            rx.close()
            tx.close()
        result[name] = statistics.median(samples)
    print(f"\none-way medians: uplink {result['uplink']:.3f} ms (set 10), downlink {result['downlink']:.3f} ms (set 5)")
    assert abs(result["uplink"] - 10.0) < 0.5
    assert abs(result["downlink"] - 5.0) < 0.5


@needs_root
@pytest.mark.netns
def test_uplink_loss_only_in_the_uplink(line: Running) -> None:
    line.set(uplink={"delay_us": 0, "jitter_us": 0, "loss_ppm": 100_000},
             downlink={"delay_us": 0, "jitter_us": 0, "loss_ppm": 0})
    before = line.stats()
    rx = in_ns_socket(line.outer, socket.SOCK_DGRAM)
    rx.bind((EDGE_IP, 0))
    rx.settimeout(0.3)
    tx = in_ns_socket(line.inner, socket.SOCK_DGRAM)
    n, received = 500, [0]

    def drain() -> None:  # read while sending, so the receive buffer never overflows
        with contextlib.suppress(TimeoutError):
            while received[0] < n:
                rx.recv(64)
                received[0] += 1

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        for i in range(n):
            tx.sendto(struct.pack("!i", i), (EDGE_IP, rx.getsockname()[1]))
            if i % 20 == 19:
                time.sleep(0.001)
        t.join(5)
    finally:
        rx.close()
        tx.close()
    got = received[0]
    after = line.stats()
    lost = n - got
    print(f"\nuplink loss 10%: {lost}/{n} UDP datagrams lost")
    assert 25 <= lost <= 80  # Binomial(500, 0.1): mean 50, sd 6.7
    assert after["uplink"]["drops_loss"] - before["uplink"]["drops_loss"] == lost
    assert after["downlink"]["drops_loss"] == before["downlink"]["drops_loss"]
    assert after["uplink"]["drops_queue"] == before["uplink"]["drops_queue"]
    line.set(uplink={"loss_ppm": 0})
    assert len(udp_rtts(line, 50, 0.001)) == 50  # downlink carries every echo back


@needs_root
@pytest.mark.netns
def test_parameters_change_while_running(line: Running) -> None:
    line.set(uplink={"delay_us": 0, "jitter_us": 0, "loss_ppm": 0},
             downlink={"delay_us": 0, "jitter_us": 0, "loss_ppm": 0})
    fast = statistics.median(udp_rtts(line, 40, 0.002))
    reply = line.set(uplink={"delay_us": 15_000}, downlink={"delay_us": 5_000, "jitter_us": 1_000})
    assert reply["downlink"] == {"delay_us": 5_000, "jitter_us": 1_000, "loss_ppm": 0}
    slow = udp_rtts(line, 40, 0.002)
    print(f"\nRTT median before {fast:.3f} ms, after 15 ms up + 5±1 ms down {statistics.median(slow):.3f} ms")
    assert fast < 3.0
    assert 19.0 <= statistics.median(slow) <= 21.5
    assert min(slow) >= 18.8
    bad = control_request(line.control, {"uplink": {"delay_us": "lots"}})
    assert bad["ok"] is False and line.proc.poll() is None
    assert control_request(line.control, {"cmd": "get"})["uplink"]["delay_us"] == 15_000


def tcp_transfer(r: Running, *, seconds: float = 0.0, payload: bytes = b"") -> tuple[int, str, float, float]:
    """Device → edge over TCP: for `seconds` (zeros), or `payload` once. Returns (bytes received, sha256 of what
    was received, wall seconds, delay line CPU seconds used meanwhile)."""
    srv = in_ns_socket(r.outer, socket.SOCK_STREAM)
    srv.bind((EDGE_IP, 0))
    srv.listen(1)
    srv.settimeout(5)
    cli = in_ns_socket(r.inner, socket.SOCK_STREAM)
    cli.settimeout(5)
    got = [0]
    digest = hashlib.sha256()

    def sink() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with conn, contextlib.suppress(OSError):
            while n := conn.recv_into(buf):
                got[0] += n
                digest.update(view[:n])

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    stat = Path(f"/proc/{r.proc.pid}/stat")

    def cpu() -> float:
        f = stat.read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    cli.connect((EDGE_IP, srv.getsockname()[1]))
    chunk = b"\0" * (1 << 20)
    c0, w0 = cpu(), time.monotonic()
    try:
        if payload:
            cli.sendall(payload)
        while time.monotonic() - w0 < seconds:
            cli.sendall(chunk)
    finally:
        cli.close()
        t.join(10)
        srv.close()
    return got[0], digest.hexdigest(), time.monotonic() - w0, cpu() - c0


@needs_root
@pytest.mark.netns
def test_tcp_throughput_and_cpu(line: Running) -> None:
    line.set(uplink={"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 0},
             downlink={"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 0})
    before = line.stats()["uplink"]
    nbytes, _, wall, used = tcp_transfer(line, seconds=2.0)
    after = line.stats()["uplink"]
    mbit = nbytes * 8 / wall / 1e6
    packets = after["packets_out"] - before["packets_out"]
    mean_packet = (after["bytes_out"] - before["bytes_out"]) / max(packets, 1)
    print(f"\nTCP uplink at 10 ms each way, MTU 65000: {mbit:.0f} Mbit/s over {wall:.2f} s, mean packet "
          f"{mean_packet:.0f} B; delay line CPU {100 * used / wall:.1f}% of a core")
    assert mbit > 100, "far below the ~1 Gbit/s this design reaches on this kind of machine"
    assert mean_packet > 30_000, "the large MTU should give few, large packets"
    assert after["drops_queue"] == before["drops_queue"] and after["drops_write"] == before["drops_write"]


@needs_root
@pytest.mark.netns
def test_vnet_header_mode_moves_tso_segments_intact(tmp_path: Path) -> None:
    """--vnet-hdr at MTU 1500: TCP hands over 64 KiB segments with offloaded checksums; data arrives intact."""
    payload = os.urandom(8 << 20)
    with namespaces("v") as (inner, outer):
        r = start_delayline(inner, outer, tmp_path, "--vnet-hdr", "--mtu", "1500", "--up-delay-us", "2000",
                            "--down-delay-us", "2000", outer_tun="tbv-dl")
        try:
            nbytes, digest, wall, _ = tcp_transfer(r, payload=payload)
            s = r.stats()["uplink"]
        finally:
            assert stop_process(r.proc) == 0
    assert nbytes == len(payload) and digest == hashlib.sha256(payload).hexdigest()
    mean_packet = s["bytes_out"] / s["packets_out"]
    print(f"\nvnet-hdr, MTU 1500: 8 MiB in {wall:.2f} s, mean packet {mean_packet:.0f} B")
    assert mean_packet > 5000, "no TSO segments came through: offloads not negotiated?"


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_delay_line_leaves_nothing_behind(sig: int, tmp_path: Path) -> None:
    with namespaces("k") as (inner, outer):
        r = start_delayline(inner, outer, tmp_path, outer_tun="tbk-dl")
        try:
            assert ip("-n", outer, "link", "show", "tbk-dl").strip()
            os.kill(r.proc.pid, sig)
            rc = r.proc.wait(10)
        finally:
            stop_process(r.proc)
        assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # netdev teardown is asynchronous; bounded poll
            left = ip("-n", outer, "-o", "link", "show", check=False) + ip("-n", inner, "-o", "link", "show")
            if "tbk-dl" not in left and "tun0" not in left:
                break
            time.sleep(0.05)
        assert "tbk-dl" not in left and "tun0" not in left
        assert DEVICE_IP not in ip("-n", outer, "route")
        assert not ip("-n", inner, "route").strip()
        if sig == signal.SIGTERM:
            assert not r.control.exists()


@needs_root
@pytest.mark.netns
def test_exits_when_its_parent_dies(tmp_path: Path) -> None:
    with namespaces("p") as (inner, outer):
        pidfile = tmp_path / "child.pid"
        ready = tmp_path / "p.json"
        parent_code = (
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'testbed.net.delayline', '--inner-ns', sys.argv[1],"
            " '--outer-ns', sys.argv[2], '--outer-tun', 'tbp-dl', '--address', sys.argv[3],"
            " '--ready-file', sys.argv[4], '--parent-pid', str(os.getpid())])\n"
            "open(sys.argv[5], 'w').write(str(p.pid))\n"
            "time.sleep(60)\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", parent_code, inner, outer, DEVICE_IP, str(ready),
                                   str(pidfile)], cwd=REPO)
        child = None
        try:
            wait_for_file(ready, parent, timeout_s=20)
            child = int(pidfile.read_text())
            parent.kill()
            parent.wait(5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(child):
                time.sleep(0.05)
            assert not _alive(child), "the delay line outlived its parent"
            child = None
        finally:
            stop_process(parent)
            if child is not None and _alive(child):
                os.kill(child, signal.SIGKILL)  # the one we started, by pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@needs_root
@pytest.mark.netns
def test_refuses_a_missing_namespace_and_a_busy_tun(line: Running, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "testbed.net.delayline", "--address", DEVICE_IP, "--outer-tun", "tbx-dl"]
    missing = subprocess.run([*base, "--inner-ns", f"tb-t-dl-{os.getpid()}-absent", "--outer-ns", line.outer],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "no network namespace" in missing.stderr
    busy = subprocess.run([*base, "--inner-ns", line.inner, "--outer-ns", line.outer],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert busy.returncode == 2 and "in use" in busy.stderr
    assert "tbx-dl" not in ip("-n", line.outer, "-o", "link", "show")
    assert line.proc.poll() is None and control_request(line.control, {"cmd": "get"})["ok"]
