"""The lab's delay lines: one userspace delay-line process per device where the kernel has no netem."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.lab.hosts import process_start_ticks
from testbed.lab.state import ProcessRecord
from testbed.lab.topology import LabError, LabHost, Topology
from testbed.net.link import DirectionSpec, LinkSpec

READY_TIMEOUT_S = 20.0
MIN_MTU, MAX_MTU = 1500, 65000
MTU_TIME_S = 0.0005  # a packet is at most this long on the slower direction's wire


def tun_mtu(link: LinkSpec) -> int:
    """Big packets keep a Python delay line fast; small ones keep HTB's burst (two packets) short.

    The MTU is what the slower direction sends in 0.5 ms, within 1500..65000: 1500 for LTE and 5G sub-6
    uplinks (a burst of 0.4-2 ms), 13 kB for a 214 Mbit/s mmWave uplink, 56 kB for 900 Mbit/s Wi-Fi 6.
    """
    rates = [r for r in (link.uplink.rate_bps, link.downlink.rate_bps) if r]
    if not rates:
        return MAX_MTU
    return max(MIN_MTU, min(MAX_MTU, int(min(rates) * MTU_TIME_S / 8)))


def _impairment(spec: DirectionSpec) -> dict[str, int]:
    return {"delay_us": spec.delay_us, "jitter_us": spec.jitter_us, "loss_ppm": spec.loss_ppm}


def start_delay_line(topo: Topology, dev: LabHost, link: LinkSpec, run_dir: Path) -> ProcessRecord:
    """Start the device's delay line as a daemon (it outlives `lab up`); `lab down` stops it by pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    control = run_dir / f"{dev.name}-delayline.sock"
    ready = run_dir / f"{dev.name}-delayline.ready"
    ready.unlink(missing_ok=True)
    mtu = tun_mtu(link)
    argv = [
        sys.executable, "-m", "testbed.net.delayline", "--inner-ns", dev.netns, "--inner-tun", "tun0",
        "--outer-ns", topo.switch_ns, "--outer-tun", topo.switch_port(dev), "--address", dev.address,
        "--seed", str(dev.index), "--control", str(control), "--ready-file", str(ready), "--mtu", str(mtu),
    ]
    for prefix, spec in (("up", link.uplink), ("down", link.downlink)):
        argv += [f"--{prefix}-delay-us", str(spec.delay_us), f"--{prefix}-jitter-us", str(spec.jitter_us),
                 f"--{prefix}-loss-ppm", str(spec.loss_ppm)]
    with open(run_dir / f"{dev.name}-delayline.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            tail = (run_dir / f"{dev.name}-delayline.log").read_text(errors="replace")[-800:]
            raise LabError(f"the delay line of {dev.name} exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise LabError(f"the delay line of {dev.name} was not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    ticks = process_start_ticks(proc.pid)
    return ProcessRecord(f"delayline-{dev.name}", proc.pid, ticks or 0, str(control), mtu)


class DelayLineControl:
    """Client of a delay line's control socket (JSON lines over a UNIX socket)."""

    def __init__(self, path: str | Path, timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.connect(self.path)
                sock.sendall(json.dumps(message).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise LabError(f"cannot reach the delay line at {self.path}: {exc}") from exc
        try:
            reply = json.loads(buf)
        except ValueError as exc:
            raise LabError(f"the delay line at {self.path} answered garbage: {buf[:200]!r}") from exc
        if not reply.get("ok"):
            raise LabError(f"the delay line refused: {reply.get('error')}")
        return reply

    def set(self, uplink: DirectionSpec, downlink: DirectionSpec) -> dict[str, Any]:
        return self.request({"cmd": "set", "uplink": _impairment(uplink), "downlink": _impairment(downlink)})

    def stats(self) -> dict[str, Any]:
        return self.request({"cmd": "stats"})
