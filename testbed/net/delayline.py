"""Userspace delay line: one-way delay, jitter and loss per direction between two TUN devices (no sch_netem).

Where the kernel has no `sch_netem`, a device namespace gets no veth: its only link is a TUN device `tun0`, and a
second TUN in the outer (lab) namespace carries its traffic on. This process holds both and moves packets between
them: inner → outer is the uplink (device → edge), outer → inner the downlink, each with its own `Impairment`.
Rate limiting stays in the kernel (HTB on the TUN devices); this does delay, jitter and loss (the Mahimahi approach).

Layout: a pure scheduling core in :mod:`testbed.net.delayqueue` (`Impairment`, `Direction`, `schedule`,
`ControlHandler`: arrival times in, release times and drops out, no I/O, no clock) and here a thin shell
(`DelayLine.run`: select(2) on the two TUN fds, a wake-up pipe and a timer; `ControlServer`: a UNIX socket taking
JSON lines; `main`). See docs/delayline.md.

Jitter keeps packets in order by default: a packet is released at max(arrival + delay + U(-jitter, +jitter),
release time of the packet before it), as netem does when it also shapes rate. `--allow-reorder` drops the max().

    python -m testbed.net.delayline --inner-ns tb-dev1 --inner-tun tun0 --outer-ns tb-lab --outer-tun tb1-dl \\
        --address 10.254.77.11 --mtu 65000 --up-delay-us 10000 --down-delay-us 10000 --seed 1 \\
        --control /run/testbed/dl1.sock --ready-file /run/testbed/dl1.json --parent-pid $PPID
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed.net.delayqueue import (
    DEFAULT_LIMIT_BYTES,
    DEFAULT_LIMIT_PACKETS,
    ControlHandler,
    Direction,
    Impairment,
)

# --------------------------------------------------------------------------------------------------------------
# Shell: control socket
# --------------------------------------------------------------------------------------------------------------

MAX_REQUEST_BYTES = 64 * 1024
MAX_REQUESTS_PER_CONNECTION = 10_000
CONNECTION_TIMEOUT_S = 5.0


def control_request(path: str | os.PathLike[str], request: Mapping[str, object], timeout_s: float = 5.0) -> dict:
    """Send one request to a running delay line's control socket and return its reply (client side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(os.fspath(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buf:
            if len(buf) > MAX_REQUEST_BYTES * 4 or time.monotonic() > deadline:
                raise OSError("no complete reply from the delay line")
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("the delay line closed the control connection without a reply")
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


class ControlServer:
    """UNIX stream socket (mode 0600): newline-terminated JSON requests, one JSON line back for each."""

    def __init__(self, path: Path, handler: ControlHandler) -> None:
        self.path = path
        self.handler = handler
        _clear_stale_socket(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(os.fspath(path))
            os.chmod(path, 0o600)
            self.sock.listen(8)
            self.sock.settimeout(0.2)
        except BaseException:
            self.sock.close()
            raise
        self._ino = os.stat(path).st_ino
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._serve, args=(stop,), name="delayline-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (the caller has set the stop event), close the socket, remove the socket file."""
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # accept() wakes every 0.2 s to look at the stop event
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:  # only our own socket file
                os.unlink(self.path)

    def _serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set() or self.sock.fileno() < 0:
                    return
                time.sleep(0.05)
                continue
            with conn, contextlib.suppress(OSError):
                self._serve_connection(conn, stop)

    def _serve_connection(self, conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(CONNECTION_TIMEOUT_S)
        buf = b""
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            while b"\n" not in buf:
                if len(buf) > MAX_REQUEST_BYTES:
                    conn.sendall(json.dumps({"ok": False, "error": "request too long"}).encode() + b"\n")
                    return
                if stop.is_set():
                    return
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                reply: dict[str, Any] = {"ok": False, "error": f"bad JSON: {exc}"}
            else:
                reply = self.handler.handle(request)
            conn.sendall(json.dumps(reply).encode() + b"\n")


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a killed delay line; refuse to touch anything else or a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        else:
            raise FileExistsError(f"{path}: another delay line is listening there")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------------------------------------------
# Shell: the packet loop
# --------------------------------------------------------------------------------------------------------------

READ_BATCH = 16  # packets read from one fd before due packets are released again (64 let heavy input delay releases)
MAX_WAIT_S = 0.25  # longest sleep without a due packet (the stop event is also signalled through a pipe)
DEFAULT_WAKE_COMPENSATION = 0.75  # fraction of the learnt timer overshoot a packet that woke the loop is backdated
MAX_OVERSHOOT_NS = 500_000  # cap on the learnt timer overshoot (and so on polling before a release)
_PR_SET_TIMERSLACK = 29


def set_timer_slack_ns(ns: int) -> None:
    """Shrink the kernel's timer slack for this thread (default 50 µs), so select() wakes close to its timeout."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, int(ns), 0, 0, 0)


class DelayLine:
    """Moves packets between the inner TUN (device side) and the outer TUN (lab side) through two Directions."""

    def __init__(
        self,
        inner_fd: int,
        outer_fd: int,
        uplink: Direction,
        downlink: Direction,
        *,
        read_size: int,
        hdr_len: int = 0,
        wake_compensation: float = DEFAULT_WAKE_COMPENSATION,
    ) -> None:
        self.inner_fd = inner_fd
        self.outer_fd = outer_fd
        self.uplink = uplink
        self.downlink = downlink
        self.read_size = read_size
        self.hdr_len = hdr_len  # vnet header bytes in front of each packet: not counted as packet bytes
        self.wakeups = 0
        self.overshoot_ns = 50_000  # learnt while running; see run()
        self.wake_compensation = wake_compensation

    def _read(self, fd: int, direction: Direction, backdate_ns: int = 0) -> None:
        """Read up to READ_BATCH packets; the first one is taken to have arrived `backdate_ns` before it was read."""
        read, now, hdr = os.read, time.monotonic_ns, self.hdr_len
        for _ in range(READ_BATCH):
            try:
                packet = read(fd, self.read_size)
            except BlockingIOError:
                return
            except OSError:  # e.g. EIO while the link is down: nothing to read now
                return
            if len(packet) > hdr:
                direction.push(now() - backdate_ns, packet, len(packet) - hdr)
                backdate_ns = 0

    @staticmethod
    def _release(direction: Direction, fd: int, now_ns: int) -> None:
        due = direction.pop_due(now_ns)
        for packet, n in due:
            try:
                os.write(fd, packet)
            except OSError:
                direction.write_failed()
            else:
                direction.sent(n)

    def run(self, stop: threading.Event, wake_fd: int | None = None) -> None:
        """Move packets until `stop` is set (`wake_fd`: a pipe that becomes readable when it is, e.g. on a signal).

        Timers overshoot: select() on this kind of machine wakes 50–200 µs after its timeout. The loop keeps a
        running mean of that overshoot (`self.overshoot_ns`) and wakes that much earlier; if it is then early, it
        polls (select with timeout 0) for the remaining few microseconds. No packet leaves the queue before its
        release time; but a packet that woke the sleeping loop has its arrival backdated by
        `wake_compensation` × the overshoot (the time the wake-up itself took; see docs/delayline.md).
        """
        up, down = self.uplink, self.downlink
        inner, outer = self.inner_fd, self.outer_fd
        fds = [inner, outer] + ([wake_fd] if wake_fd is not None else [])
        now_ns = time.monotonic_ns
        max_wait_ns = int(MAX_WAIT_S * 1e9)
        overshoot = self.overshoot_ns
        while not stop.is_set():
            now = now_ns()
            self._release(up, outer, now)
            self._release(down, inner, now)
            a, b = up.next_release_ns(), down.next_release_ns()
            nxt = a if b is None else b if a is None else min(a, b)
            target = None
            if nxt is None:
                timeout = MAX_WAIT_S
            else:
                now = now_ns()
                wait = nxt - now - overshoot
                if wait <= 0:
                    timeout = 0.0  # due within the expected overshoot: poll
                elif wait >= max_wait_ns:
                    timeout = MAX_WAIT_S
                else:
                    timeout = wait / 1e9
                    target = now + wait
            slept_from = now_ns()
            readable, _, _ = select.select(fds, [], [], timeout)
            self.wakeups += 1
            backdate = 0
            if self.wake_compensation and timeout > 0:
                # A packet woke a sleeping loop: it arrived about one wake-up latency ago (never before we slept).
                backdate = min(int(overshoot * self.wake_compensation), now_ns() - slept_from)
            if not readable:
                if target is not None:  # a timed wake-up: learn how late the timer fired (EWMA, 1/8)
                    late = min(max(now_ns() - target, 0), MAX_OVERSHOOT_NS)
                    overshoot += (late - overshoot) >> 3
                    self.overshoot_ns = overshoot
                continue
            if wake_fd is not None and wake_fd in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_fd, 4096)
            if inner in readable:
                self._read(inner, up, backdate)
            if outer in readable:
                self._read(outer, down, backdate)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _write_ready(path: Path, info: Mapping[str, object]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m testbed.net.delayline",
        description="Userspace delay line between a TUN in a device namespace and a TUN in the lab namespace.",
    )
    p.add_argument("--inner-ns", required=True, help="device namespace (its only link becomes the inner TUN)")
    p.add_argument("--inner-tun", default="tun0", help="TUN name in the device namespace (default tun0)")
    p.add_argument("--outer-ns", required=True, help="lab namespace that routes towards the edge")
    p.add_argument("--outer-tun", required=True, help="TUN name in the lab namespace, e.g. tb1-dl")
    p.add_argument("--address", required=True, help="device IPv4 address (/32 on the inner TUN)")
    p.add_argument("--mtu", type=int, default=65000, help="MTU of both TUNs (default 65000: few, large packets)")
    p.add_argument("--vnet-hdr", action="store_true", help="virtio-net headers + TSO/checksum offload on both TUNs")
    for prefix, name in (("up", "uplink (device → edge)"), ("down", "downlink (edge → device)")):
        p.add_argument(f"--{prefix}-delay-us", type=_nonneg_int, default=0, help=f"{name} one-way delay, µs")
        p.add_argument(f"--{prefix}-jitter-us", type=_nonneg_int, default=0, help=f"{name} jitter (uniform ±), µs")
        p.add_argument(f"--{prefix}-loss-ppm", type=_nonneg_int, default=0, help=f"{name} random loss, per million")
    p.add_argument("--allow-reorder", action="store_true", help="jitter may reorder packets (default: keep order)")
    p.add_argument("--queue-limit-packets", type=int, default=DEFAULT_LIMIT_PACKETS, help="per direction")
    p.add_argument("--queue-limit-bytes", type=int, default=DEFAULT_LIMIT_BYTES, help="per direction")
    p.add_argument("--seed", type=int, default=0, help="seed of the loss and jitter draws")
    p.add_argument(
        "--wake-compensation",
        type=float,
        default=DEFAULT_WAKE_COMPENSATION,
        help="backdate a packet that woke the idle loop by this fraction of the learnt wake-up latency "
        f"(0: off; default {DEFAULT_WAKE_COMPENSATION}, calibrated in docs/BENCHMARKS.delayline.md)",
    )
    p.add_argument("--control", type=Path, help="UNIX socket for JSON-line control (set / get / stats)")
    p.add_argument("--ready-file", type=Path, help="written (JSON) once both TUNs are up and packets move")
    p.add_argument("--parent-pid", type=int, help="exit when this process dies")
    args = p.parse_args(argv)
    try:
        ipaddress.IPv4Address(args.address)
    except ValueError:
        p.error(f"--address must be an IPv4 address, got {args.address!r}")
    if not 576 <= args.mtu <= 65535:
        p.error("--mtu must be in [576, 65535]")
    if args.queue_limit_packets < 1 or args.queue_limit_bytes < 1:
        p.error("queue limits must be positive")
    if not 0.0 <= args.wake_compensation <= 1.0:
        p.error("--wake-compensation must be in [0, 1]")
    return args


def _impairment(args: argparse.Namespace, prefix: str) -> Impairment:
    return Impairment.from_dict(
        {
            "delay_us": getattr(args, f"{prefix}_delay_us"),
            "jitter_us": getattr(args, f"{prefix}_jitter_us"),
            "loss_ppm": getattr(args, f"{prefix}_loss_ppm"),
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    from testbed.lifecycle import die_with_parent, stop_event_on_signals
    from testbed.net import tun

    args = parse_args(argv)
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals()
    try:
        up_imp, down_imp = _impairment(args, "up"), _impairment(args, "down")
    except ValueError as exc:
        print(f"delayline: {exc}", file=sys.stderr)
        return 2
    limits = {"limit_packets": args.queue_limit_packets, "limit_bytes": args.queue_limit_bytes}
    uplink = Direction("uplink", up_imp, args.seed, reorder=args.allow_reorder, **limits)
    downlink = Direction("downlink", down_imp, args.seed, reorder=args.allow_reorder, **limits)
    handler = ControlHandler(uplink, downlink)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    fds: list[int] = []
    server: ControlServer | None = None
    try:
        try:
            fds.append(
                tun.create_tun(
                    args.inner_ns,
                    args.inner_tun,
                    args.mtu,
                    address=args.address,
                    default_route=True,
                    loopback_up=True,
                    vnet_hdr=args.vnet_hdr,
                )
            )
            fds.append(
                tun.create_tun(
                    args.outer_ns, args.outer_tun, args.mtu, routes=[f"{args.address}/32"], vnet_hdr=args.vnet_hdr
                )
            )
            if args.control:
                server = ControlServer(args.control, handler)
        except (OSError, ValueError) as exc:
            print(f"delayline: {exc}", file=sys.stderr)
            return 2
        if server is not None:
            server.start(stop)
        set_timer_slack_ns(1000)
        hdr_len = tun.VNET_HDR_LEN if args.vnet_hdr else 0
        read_size = (65535 if args.vnet_hdr else args.mtu) + hdr_len
        line = DelayLine(
            fds[0],
            fds[1],
            uplink,
            downlink,
            read_size=read_size,
            hdr_len=hdr_len,
            wake_compensation=args.wake_compensation,
        )
        if args.ready_file:
            _write_ready(
                args.ready_file,
                {
                    "pid": os.getpid(),
                    "inner_ns": args.inner_ns,
                    "inner_tun": args.inner_tun,
                    "outer_ns": args.outer_ns,
                    "outer_tun": args.outer_tun,
                    "address": args.address,
                    "mtu": args.mtu,
                    "vnet_hdr": args.vnet_hdr,
                    "control": os.fspath(args.control) if args.control else None,
                    **handler.impairments(),
                },
            )
        print(
            f"delayline: {args.inner_ns}/{args.inner_tun} ⇄ {args.outer_ns}/{args.outer_tun} for {args.address}, "
            f"mtu {args.mtu}, uplink {up_imp.to_dict()}, downlink {down_imp.to_dict()}",
            flush=True,
        )
        line.run(stop, wake_r)
        print(f"delayline: stopped; {json.dumps(handler.handle({'cmd': 'stats'}))}", flush=True)
        return 0
    finally:
        stop.set()
        if server is not None:
            server.close()
        for fd in fds:  # closing the fds removes both TUNs and their routes
            os.close(fd)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


if __name__ == "__main__":
    sys.exit(main())
