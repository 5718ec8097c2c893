"""Low-rate probes of a device's path to the edge, so the controller sees a link also when no request crosses it.

A device whose split went device-only sends nothing over its link, so the data plane's own timings (the live
estimator's usual input) stop: without probes the controller would never see the link recover, and the split
could never move back. Every ``interval_s`` the prober sends, on its own DEALER socket (never in the way of a
request), the two messages of testbed.profiling.links' protocol:

* an empty PING: its round trip (the device's monotonic clock) is an RTT sample;
* a PING carrying an ``echo`` tensor of ``payload_bytes``, which the edge sends back in its PONG: the uplink time
  is ``edge_recv_ns - device_send_ns`` and the downlink time ``device_recv - edge_send_ns`` (wall clocks, as the
  data plane's own stages; exact on one host or with synchronised clocks).

One probe in flight, every wait bounded by ``timeout_s``; a lost probe is skipped (its late PONG never matches a
later sequence); the first probe on a new connection is not reported (it pays for the set-up). At the default
16 KiB once a second a probe costs 0.03 % of a 1 Gbit/s link and 2.3 % of an LTE uplink (5.7 Mbit/s). Torch-free,
like the rest of the device agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zmq

from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind, WireError
from testbed.wire.messages import DATA_LIMITS

MAX_PAYLOAD_BYTES: Final = 1 << 20
MIN_INTERVAL_S: Final = 0.05


@dataclass(frozen=True)
class ProbeSettings:
    interval_s: float = 1.0  # 0: no probes
    payload_bytes: int = 16 * 1024
    timeout_s: float = 2.0

    def check(self) -> str:
        """"" when usable, else why not (one line)."""
        if self.interval_s != 0 and not MIN_INTERVAL_S <= self.interval_s <= 3600:
            return f"--probe-interval-s must be 0 (off) or between {MIN_INTERVAL_S} and 3600, got {self.interval_s}"
        if not 1 <= self.payload_bytes <= MAX_PAYLOAD_BYTES:
            return f"--probe-bytes must be between 1 and {MAX_PAYLOAD_BYTES}, got {self.payload_bytes}"
        if not 0 < self.timeout_s <= 60:
            return f"probe timeout must be in (0, 60] s, got {self.timeout_s}"
        return ""


class LinkProber:
    """A thread that probes ``endpoint()`` (None: nothing to probe now) and hands samples to ``emit``."""

    def __init__(self, ctx: zmq.Context, device_id: str, endpoint: Callable[[], str | None],
                 emit: Callable[[dict[str, Any]], None], stop: threading.Event,
                 settings: ProbeSettings = ProbeSettings()) -> None:
        self.ctx, self.device_id, self.endpoint, self.emit = ctx, device_id, endpoint, emit
        self.stop, self.settings = stop, settings
        self.sent = self.answered = 0
        self._seq = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="link-probe", daemon=True)
            self._thread.start()

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        sock: zmq.Socket | None = None
        connected = ""
        try:
            while not self.stop.wait(self.settings.interval_s):
                target = self.endpoint()
                if target != connected and sock is not None:
                    sock.close(linger=0)
                    sock, connected = None, ""
                if target is None:
                    continue
                if sock is None:
                    sock = self.ctx.socket(zmq.DEALER)
                    channel.configure_socket(sock, DATA_LIMITS, linger_ms=0)
                    sock.connect(target)
                    connected = target
                    self.probe(sock)  # warm-up, not reported: it pays for the connection's set-up
                sample = self.probe(sock)
                if sample is not None:
                    self.emit(sample)
        finally:
            if sock is not None:
                sock.close(linger=0)

    def probe(self, sock: zmq.Socket) -> dict[str, Any] | None:
        """One RTT and one echo exchange; the heartbeat sample, or None when either got no answer in time."""
        wall = time.time()
        t0 = time.perf_counter_ns()
        if self._exchange(sock, {}) is None:
            return None
        rtt_s = (time.perf_counter_ns() - t0) / 1e9
        nbytes = self.settings.payload_bytes
        send_ns = time.time_ns()
        got = self._exchange(sock, {"echo": np.ones(nbytes, dtype=np.uint8)}, {"device_send_ns": send_ns})
        if got is None:
            return None
        recv_ns, times, echoed = got
        edge_recv = times.get("edge_recv_ns")
        if edge_recv is None or echoed != nbytes:
            return None  # an edge that does not echo PINGs: nothing to learn about the downlink
        edge_send = times.get("edge_send_ns", edge_recv)
        return {"t_s": round(wall, 6), "probe": True, "rtt_s": round(rtt_s, 7), "bytes_up": nbytes,
                "uplink_s": round((edge_recv - send_ns) / 1e9, 7), "bytes_down": nbytes,
                "downlink_s": round((recv_ns - edge_send) / 1e9, 7)}

    def _exchange(self, sock: zmq.Socket, tensors: dict[str, np.ndarray], times_ns: dict[str, int] | None = None
                  ) -> tuple[int, dict[str, int], int] | None:
        """Send a PING, wait for its PONG: (receive wall time ns, the PONG's timestamps, echoed bytes) or None."""
        self._seq += 1
        seq = self._seq
        try:
            channel.send(sock, Envelope(Kind.PING, self.device_id, seq, times_ns=times_ns or {}), tensors,
                         limits=DATA_LIMITS)
        except (WireError, zmq.ZMQError):
            return None
        self.sent += 1
        deadline = time.monotonic() + self.settings.timeout_s
        while not self.stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(min(left_ms, 100)):
                if left_ms <= 0:
                    return None
                continue
            try:
                _, msg = channel.recv(sock, limits=DATA_LIMITS)
            except (WireError, zmq.ZMQError):
                return None
            recv_ns = time.time_ns()
            env = msg.envelope
            if env.seq != seq:
                continue  # a late answer to a probe that timed out
            if env.kind is not Kind.PONG:
                return None
            self.answered += 1
            echo = msg.tensors.get("echo")
            return recv_ns, dict(env.times_ns), 0 if echo is None else int(echo.nbytes)
        return None
