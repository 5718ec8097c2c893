"""Measure a device's path to a running edge server over the real ZeroMQ protocol: round trip and throughput.

What is timed, from a DEALER socket on the device side (the edge's ROUTER answers):

* **round trip**: an empty PING and its PONG; the one-way delay for the planner is half the median;
* **uplink**: a PING carrying a ``payload`` tensor of S bytes (the PONG carries none): ``t(S) = t0 + 8 S / up``;
* **downlink**, when the edge sends payloads back: ``S`` bytes up and ``S`` bytes down, less the time the message
  spent inside the edge (``edge_send_ns - edge_recv_ns``, both on the edge's clock), so
  ``t(S) = t0 + 8 S / up + 8 S / down``. Two ways to get an echo:

  - ``ping-echo``: a PING carrying an ``echo`` tensor answered by a PONG carrying it back. Today's edge does not
    do this (a one-line change; see docs/profiling.md); the profiler probes for it and uses it when present;
  - ``empty-body``: an INFER_REQUEST for the partition ``(a, a)``, whose body is empty, so the edge returns its
    input unchanged. It needs the edge's weights hash and the activation shape at ``a``
    (:func:`empty_body_echo`), and sizes are rounded to whole samples of that activation.

* **edge request handling**, when the edge echoes PINGs *and* ``echo`` is given: each round also one empty-body
  INFER_REQUEST of one sample of the echo split point and one PING echo of exactly those bytes. What the edge adds
  to any request beyond moving bytes — admission, the hand-off from the I/O thread to the compute thread, the copy
  of the activations, the wake-up of the I/O thread — is the excess of the request's median time inside the edge
  (``edge_send_ns - edge_recv_ns``, the edge's own clock) over the PING echo's: the latency model's
  ``edge_request_s`` (clamped at 0). Taken on the edge's clock, no link transfer is in it (a difference of two
  round trips carries the link's noise: ±3 ms on LTE). Both round trips are kept too; an edge whose replies carry
  no timestamps falls back on their difference.

Rates are the inverse slopes of least-squares lines through the per-size medians (the empty PING as size 0):
per-message costs (header, syscalls, wake-ups) land in the intercept, and the rate is what an extra byte costs —
which is how the planner charges activations (``bytes * 8 / rate + delay``). Exchanges are interleaved round by
round (empty, then every size) so drift affects every size alike. Every wait is bounded by ``timeout_s`` and the
whole measurement by ``budget_s``. This module needs numpy and pyzmq only (no torch), like a device agent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from testbed.profiling.hostfacts import host_facts
from testbed.profiling.records import LinkMeasurement, ProfileError, Stat, utc_now
from testbed.wire import channel
from testbed.wire.envelope import DEFAULT_LIMITS, Envelope, Kind, WireError, WireLimits

__all__ = ["DEFAULT_SIZES", "EchoTarget", "burst_bytes", "empty_body_echo", "fit_rate_bps", "fit_tail_line",
           "measure_link"]

#: Payload sizes (bytes) of the throughput probes.
DEFAULT_SIZES: tuple[int, ...] = (64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
MAX_COUNT = 100_000
MIN_ROUNDS = 3

Clock = Callable[[], int]


@dataclass(frozen=True)
class EchoTarget:
    """An empty-body partition of the edge's model: an INFER_REQUEST for it comes back unchanged.

    ``partition`` is ``"<weights hash>:<a>:<a>"``; ``sample_shape`` the per-sample activation shape at ``a``
    (float32), which the edge checks.
    """

    partition: str
    sample_shape: tuple[int, ...]

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.sample_shape) * 4


def empty_body_echo(model: Any, weights_hash: str) -> EchoTarget:
    """The echo target of a BlockModel served by the edge under ``weights_hash``: the split point with the
    largest activation (fewest samples per byte). Imports the model stack (torch) only when called."""
    from testbed.partition import PartitionId, activation_shapes

    shapes = activation_shapes(model)
    inner = range(1, model.num_blocks)
    a = max(inner, key=lambda p: math.prod(shapes[p]))
    return EchoTarget(str(PartitionId(weights_hash, a, a)), tuple(shapes[a]))


def fit_rate_bps(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """Bits per second from the least-squares slope of ``seconds`` against ``sizes`` (bytes); inf if flat."""
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ProfileError("a rate needs at least two different sizes")
    slope = float(np.polyfit(x, y, 1)[0])
    return 8.0 / slope if slope > 0 else math.inf


def fit_tail_line(sizes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float] | None:
    """Slope (seconds per byte) and intercept (seconds) of the line through the two largest sizes' times; None
    with fewer than two sizes or a slope that is not positive (noise)."""
    pairs = sorted(zip(sizes, seconds, strict=True))
    if len(pairs) < 2:
        return None
    (s1, t1), (s2, t2) = pairs[-2], pairs[-1]
    slope = (t2 - t1) / (s2 - s1)
    return (slope, t2 - slope * s2) if slope > 0 else None


def burst_bytes(empty_s: float, line: tuple[float, float], ceiling: int) -> int:
    """Bytes a message passes at no cost (a token bucket's burst): how far ``line``'s intercept lies below the
    empty message's time, at the line's rate; 0 to ``ceiling`` (the second largest size: beyond it the line
    was fitted)."""
    slope, intercept = line
    return int(min(ceiling, max(0.0, (empty_s - intercept) / slope)))


class _Peer:
    """One DEALER socket, request/reply with sequence matching and bounded waits."""

    def __init__(self, ctx: zmq.Context, endpoint: str, device: str, limits: WireLimits, timeout_s: float,
                 clock: Clock) -> None:
        self.endpoint, self.device, self.limits, self.timeout_s, self.clock = endpoint, device, limits, timeout_s, clock
        self.sock = ctx.socket(zmq.DEALER)
        channel.configure_socket(self.sock, limits, linger_ms=0)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            raise ProfileError(f"cannot connect to the edge at {endpoint!r}: {exc}") from None
        self.seq = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def exchange(self, kind: Kind, tensors: dict[str, np.ndarray], partition: str = "",
                 timeout_s: float | None = None) -> tuple[float, Any]:
        """Send one request, wait for the reply with the same seq; returns (seconds, reply message)."""
        timeout_s = timeout_s or self.timeout_s
        self.seq += 1
        env = Envelope(kind, self.device, self.seq, partition=partition)
        t0 = self.clock()
        try:
            channel.send(self.sock, env, tensors, limits=self.limits)
        except WireError as exc:
            raise ProfileError(f"cannot send a {kind.value} of {sum(t.nbytes for t in tensors.values())} bytes: "
                               f"{exc}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left_ms):
                raise ProfileError(f"no reply from the edge at {self.endpoint} within {timeout_s:g} s "
                                   f"(is it running, and reachable from here?)")
            try:
                _, msg = channel.recv(self.sock, limits=self.limits)
            except WireError as exc:
                raise ProfileError(f"bad reply from the edge at {self.endpoint}: {exc}") from None
            t1 = self.clock()
            if msg.envelope.seq != self.seq:
                continue  # a late reply to an earlier, timed-out request
            if msg.envelope.kind is Kind.ERROR:
                err = msg.envelope.error
                raise ProfileError(f"the edge at {self.endpoint} answered a {kind.value} with an error: "
                                   f"{err.code if err else '?'}: {err.message if err else ''}")
            return (t1 - t0) * 1e-9, msg


def _payload(nbytes: int) -> np.ndarray:
    # A fresh buffer per message: a zero-copy frame must never be reused while it may be in flight.
    return np.ones(nbytes, dtype=np.uint8)


def _edge_residence_s(msg: Any) -> float:
    times = msg.envelope.times_ns
    if "edge_send_ns" in times and "edge_recv_ns" in times:
        return max(0, times["edge_send_ns"] - times["edge_recv_ns"]) * 1e-9
    return 0.0


def _edge_stamps_s(msg: Any) -> float | None:
    """``edge_send_ns - edge_recv_ns`` of a reply (both on the edge's clock), None when it lacks either."""
    times = msg.envelope.times_ns
    if "edge_send_ns" in times and "edge_recv_ns" in times:
        return max(0, times["edge_send_ns"] - times["edge_recv_ns"]) * 1e-9
    return None


def _check_sizes(sizes: Sequence[int], limits: WireLimits) -> list[int]:
    if not sizes or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ProfileError(f"link sizes must be a non-empty list of byte counts >= 1, got {list(sizes)!r}")
    out = sorted({int(s) for s in sizes})
    if out[-1] > limits.max_message_bytes - limits.max_header_bytes:
        raise ProfileError(f"link size {out[-1]} bytes exceeds the message cap of {limits.max_message_bytes} bytes")
    return out


def measure_link(
    endpoint: str,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    count: int = 20,
    warmup: int = 3,
    timeout_s: float = 5.0,
    first_timeout_s: float = 30.0,
    budget_s: float = 60.0,
    echo: EchoTarget | None = None,
    probe_ping_echo: bool = True,
    device_id: str = "profiler",
    limits: WireLimits = DEFAULT_LIMITS,
    host: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock: Clock = time.perf_counter_ns,
    ctx: zmq.Context | None = None,
) -> LinkMeasurement:
    """Measure round trip, uplink and (if the edge echoes) downlink to the edge at ``endpoint``.

    ``count`` rounds of one empty PING and one exchange per size (and per size one echo when available), after
    ``warmup`` untimed rounds. Every reply must come within ``timeout_s``, except the first empty-body echo's,
    which may take ``first_timeout_s`` (an edge's first request loads and traces lazily: seconds on a busy
    machine). ``echo`` enables the empty-body echo (:func:`empty_body_echo`) when the edge does not echo PING
    payloads (probed first unless ``probe_ping_echo`` is False). The measurement stops early, keeping what it
    has, when ``budget_s`` runs out (at least 3 rounds are needed). Raises ProfileError when the edge does not
    answer in time, answers with an error, or the rates cannot be resolved.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise ProfileError(f"count must be an integer in 1..{MAX_COUNT}, got {count!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ProfileError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not (timeout_s > 0 and first_timeout_s > 0 and budget_s > 0):
        raise ProfileError("timeout_s, first_timeout_s and budget_s must be > 0")
    sizes_list = _check_sizes(sizes, limits)
    own_ctx = ctx is None
    ctx = ctx or zmq.Context()
    peer = _Peer(ctx, endpoint, device_id, limits, timeout_s, clock)
    try:
        return _measure(peer, endpoint, sizes_list, count, warmup, max(timeout_s, first_timeout_s), budget_s, echo,
                        probe_ping_echo, host, progress)
    finally:
        peer.close()
        if own_ctx:
            ctx.term()


def _measure(peer: _Peer, endpoint: str, sizes: list[int], count: int, warmup: int, first_timeout_s: float,
             budget_s: float, echo: EchoTarget | None, probe_ping_echo: bool, host: dict[str, Any] | None,
             progress: Callable[[int, int], None] | None) -> LinkMeasurement:
    start = time.monotonic()
    peer.exchange(Kind.PING, {})  # is anyone there? (the edge's I/O thread answers PINGs: no cold start)
    method = "none"
    if probe_ping_echo:
        _, reply = peer.exchange(Kind.PING, {"echo": _payload(16)})
        if "echo" in reply.tensors and reply.tensors["echo"].nbytes == 16:
            method = "ping-echo"
    requests = echo is not None  # the empty-body request: the downlink's echo, or (with ping-echo) the overhead
    if method == "none" and echo is not None:
        n = echo.sample_bytes
        sizes = sorted({max(1, round(s / n)) * n for s in sizes})
        method = "empty-body"

    def do_request(nbytes: int, timeout_s: float | None = None) -> tuple[float, Any]:
        assert echo is not None
        a1 = np.ones((nbytes // echo.sample_bytes, *echo.sample_shape), dtype=np.float32)
        seconds, msg = peer.exchange(Kind.INFER_REQUEST, {"a1": a1}, partition=echo.partition, timeout_s=timeout_s)
        got = msg.tensors.get("a2")
        if got is None or got.nbytes != nbytes:
            raise ProfileError(f"the edge at {endpoint} did not send the {nbytes} bytes back (empty-body echo)")
        return seconds, msg

    def do_ping_echo_msg(nbytes: int) -> tuple[float, Any]:
        seconds, msg = peer.exchange(Kind.PING, {"echo": _payload(nbytes)})
        got = msg.tensors.get("echo")
        if got is None or got.nbytes != nbytes:
            raise ProfileError(f"the edge at {endpoint} did not send the {nbytes} bytes back (ping-echo)")
        return seconds, msg

    def do_ping_echo(nbytes: int) -> float:
        # The whole round trip: a PONG's edge residence is the I/O thread's few microseconds, nothing to subtract.
        return do_ping_echo_msg(nbytes)[0]

    def do_echo(nbytes: int) -> float:
        if method == "ping-echo":
            return do_ping_echo(nbytes)
        seconds, msg = do_request(nbytes)
        return max(0.0, seconds - _edge_residence_s(msg))

    if requests:
        assert echo is not None
        do_request(echo.sample_bytes if method == "ping-echo" else sizes[0], first_timeout_s)  # lazy loading
    request_bytes = echo.sample_bytes if requests and method == "ping-echo" and echo is not None else None

    rtt: list[float] = []
    up: list[list[float]] = [[] for _ in sizes]
    back: list[list[float]] | None = [[] for _ in sizes] if method != "none" else None
    pair: tuple[list[float], list[float]] | None = ([], []) if request_bytes is not None else None
    # The same two exchanges as seen by the edge's own clock (edge_send_ns - edge_recv_ns): no link in them.
    resident: tuple[list[float], list[float]] = ([], [])
    residence_complete = True
    total = warmup + count
    done_rounds = 0
    stopped_early = False
    for r in range(total):
        if r > warmup and time.monotonic() - start > budget_s:
            stopped_early = True
            break
        timed = r >= warmup
        seconds, _ = peer.exchange(Kind.PING, {})
        if timed:
            rtt.append(seconds)
        for k, size in enumerate(sizes):
            seconds, _ = peer.exchange(Kind.PING, {"payload": _payload(size)})
            if timed:
                up[k].append(seconds)
            if back is not None:
                seconds = do_echo(size)
                if timed:
                    back[k].append(seconds)
        if pair is not None and request_bytes is not None:
            seconds, req_msg = do_request(request_bytes)
            plain, echo_msg = do_ping_echo_msg(request_bytes)
            if timed:
                pair[0].append(seconds)
                pair[1].append(plain)
                stamps = _edge_stamps_s(req_msg), _edge_stamps_s(echo_msg)
                if stamps[0] is None or stamps[1] is None:
                    residence_complete = False
                else:
                    resident[0].append(stamps[0])
                    resident[1].append(stamps[1])
        done_rounds += timed
        if progress is not None:
            progress(r + 1, total)
    if done_rounds < MIN_ROUNDS:
        raise ProfileError(f"only {done_rounds} timed round(s) fit in the time budget of {budget_s:g} s; "
                           f"allow more time or use smaller sizes")
    rtt_stat = Stat.of(rtt)
    up_stats = tuple(Stat.of(s) for s in up)
    xs = [0, *sizes]
    # A shaped link passes a message's first bytes at no cost after idle (its token bucket's burst) and the rest
    # at its rate: t(n) = t0 + max(0, n - burst) / rate. The rate is the slope between the two largest sizes
    # (beyond the burst when the sizes are large enough), the burst how far that line starts below t0. With one
    # size, or a noisy slope, a line through the empty message and every size, and no burst.
    up_line = fit_tail_line(sizes, [s.median for s in up_stats])
    ceiling = sorted(sizes)[-2] if len(sizes) > 1 else 0
    up_burst = 0
    if up_line is not None:
        up_bps = 8.0 / up_line[0]
        up_burst = burst_bytes(rtt_stat.median, up_line, ceiling)
    else:
        up_bps = fit_rate_bps(xs, [rtt_stat.median, *(s.median for s in up_stats)])
    if not math.isfinite(up_bps):
        raise ProfileError(f"cannot resolve the uplink rate to {endpoint}: the largest payload ({sizes[-1]} bytes) "
                           "took no longer than an empty message; measure with larger sizes")
    notes = []
    if stopped_early:
        notes.append(f"time budget reached after {done_rounds} of {count} rounds")
    echo_stats = None
    down_bps: float | None = None
    down_burst = 0
    if back is not None:
        echo_stats = tuple(Stat.of(s) for s in back)
        both_line = fit_tail_line(sizes, [s.median for s in echo_stats])
        if up_line is not None and both_line is not None:
            # Up and back: slope_up + slope_down; the echo's line starts below t0 by both bursts' worth.
            inv_down = both_line[0] - up_line[0]
            if inv_down > 0:  # the uplink's burst taken out, the rest of the gap is the downlink's
                down_burst = burst_bytes(rtt_stat.median - up_burst * up_line[0], (inv_down, both_line[1]), ceiling)
        else:
            both_bps = fit_rate_bps(xs, [rtt_stat.median, *(s.median for s in echo_stats)])
            inv_down = 8.0 / both_bps - 8.0 / up_bps
        if inv_down > 0:
            down_bps = 8.0 / inv_down
        else:
            notes.append("downlink not resolved: an echo cost no more than the uplink alone (noise)")
    else:
        notes.append("downlink not measured: the edge does not echo payloads (see docs/profiling.md)")
    request_stats = request_echo_stats = request_residence = request_echo_residence = None
    edge_request_s = None
    if pair is not None:
        request_stats, request_echo_stats = Stat.of(pair[0]), Stat.of(pair[1])
        if residence_complete and resident[0]:
            # The edge's clock: what the edge adds, free of the link's transfer noise (docs/profiling.md).
            request_residence, request_echo_residence = Stat.of(resident[0]), Stat.of(resident[1])
            edge_request_s = max(0.0, request_residence.median - request_echo_residence.median)
        else:  # an edge that does not stamp its replies: the difference of the two round trips
            edge_request_s = max(0.0, request_stats.median - request_echo_stats.median)
            notes.append("edge request handling from round trips (the edge's replies carry no timestamps)")
    elif echo is None:
        notes.append("edge request handling not measured: it needs the edge's weights (--weights)")
    else:
        notes.append("edge request handling not measured: the edge does not echo PINGs")
    return LinkMeasurement(
        endpoint=endpoint,
        rtt=rtt_stat,
        sizes=tuple(sizes),
        uplink_rtt=up_stats,
        uplink_bps=up_bps,
        downlink_bps=down_bps,
        echo_rtt=echo_stats,
        downlink_method=method,
        host=host if host is not None else host_facts(probe_accelerator=False),
        created=utc_now(),
        notes="; ".join(notes),
        request_bytes=request_bytes,
        request_rtt=request_stats,
        request_echo_rtt=request_echo_stats,
        edge_request_s=edge_request_s,
        request_residence=request_residence,
        request_echo_residence=request_echo_residence,
        uplink_burst_bytes=up_burst,
        downlink_burst_bytes=down_burst,
    )
