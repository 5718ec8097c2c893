"""Live link and compute estimates from the data plane's own timings (pure: no sockets, the clock is passed in).

Every request a device completes reports the bytes it sent up and received down, the seconds each transfer took
(``uplink_s``: device send -> edge receive, ``downlink_s``: edge send -> device receive) and the seconds of its
head, body and tail; now and then a small message's round trip. From these, per device:

* **one-way delay** ``d``: a robust straight-line fit ``seconds = d + 8 * bytes / rate`` (Theil–Sen: the median
  of pairwise slopes, then the median intercept) over the recent samples of each direction, when their sizes
  vary enough to separate the two terms; otherwise half the median small-message RTT. The fitted intercepts of
  the two directions are averaged, which also cancels a clock offset between device and edge (it adds to one
  direction what it takes from the other).
* **rates**: the fitted slope, or, with a single size, ``8 * bytes / (seconds - d)`` (median of the window).
  Without any delay information ``d = 0``: the rate then absorbs the delay, so the model still predicts the
  measured transfer time at the sizes in use (conservative for other sizes).
* **compute speed**: profiled head + tail time (speed 1, from the model profile and the request's split, with the
  tail session's fixed cost ``tail_call_s`` when there is a tail) over the measured one, per device; profiled body
  time (with the body's wake-up ``body_call_s``) over the measured one for the edge (one for all devices).

Robustness, then smoothing: each raw value is the median of a small window (one wild sample cannot move it;
a real change moves it after ``window // 2 + 1`` samples), and the medians feed an exponentially weighted
moving average with time constant ``tau``: ``x <- x + alpha (m - x)``, ``alpha = max(min_alpha,
1 - exp(-dt / tau))``. Times per bit and time ratios are averaged (not rates or speeds): transfer and compute
times are linear in them. A sample with a negative, NaN or infinite field is refused with :class:`EstimateError`
before any state changes. See docs/resplitting.md.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from testbed.errors import TestbedError
from testbed.planning.model import ModelProfile

__all__ = [
    "EDGE",
    "ComputeEstimate",
    "EstimateError",
    "EstimatorConfig",
    "LinkEstimate",
    "LiveEstimator",
    "RequestTiming",
    "theil_sen",
]

#: The name under which the edge's compute estimate is reported.
EDGE = "edge"
DelaySource = Literal["fit", "rtt", "none"]


class EstimateError(TestbedError):
    """A timing sample that cannot be right (negative, NaN, infinite) or a bad estimator setting."""


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise EstimateError(f"{name} = {value!r} is not a finite number")
    if value < 0 or (positive and value == 0):
        raise EstimateError(f"{name} = {value!r} must be {'> 0' if positive else '>= 0'}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise EstimateError(f"{name} = {value!r} must be an integer >= 0")
    return int(value)


@dataclass(frozen=True)
class EstimatorConfig:
    """How much history the estimates keep and how fast they follow a change."""

    time_constant_s: float = 2.0  # EWMA time constant tau
    window: int = 9  # samples in each median window (odd is best)
    min_alpha: float = 0.05  # every sample moves the average at least this much (bursts at one instant)
    size_ratio: float = 1.5  # two samples inform the fit when their sizes differ at least by this factor
    min_fit_pairs: int = 3  # informative pairs needed before the fit is trusted
    max_rate_bps: float = 1e12  # the rate reported when a transfer takes no measurable time

    def __post_init__(self) -> None:
        _finite("time_constant_s", self.time_constant_s, positive=True)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= 64:
            raise EstimateError(f"window = {self.window!r} must be an integer in 1..64")
        if not (_finite("min_alpha", self.min_alpha) <= 1):
            raise EstimateError(f"min_alpha = {self.min_alpha!r} must be in [0, 1]")
        if _finite("size_ratio", self.size_ratio) <= 1:
            raise EstimateError(f"size_ratio = {self.size_ratio!r} must be > 1")
        if _count("min_fit_pairs", self.min_fit_pairs) < 1:
            raise EstimateError("min_fit_pairs must be >= 1")
        _finite("max_rate_bps", self.max_rate_bps, positive=True)


@dataclass(frozen=True)
class RequestTiming:
    """What one request measured. ``a``/``b``: the split that served it (for the compute estimates).

    ``body_s`` is the body's run time on the edge, without queueing.
    """

    bytes_up: int
    uplink_s: float
    bytes_down: int
    downlink_s: float
    head_s: float = 0.0
    body_s: float = 0.0
    tail_s: float = 0.0
    a: int | None = None
    b: int | None = None

    def __post_init__(self) -> None:
        _count("bytes_up", self.bytes_up)
        _count("bytes_down", self.bytes_down)
        for name in ("uplink_s", "downlink_s", "head_s", "body_s", "tail_s"):
            _finite(name, getattr(self, name))
        if (self.a is None) != (self.b is None):
            raise EstimateError("give both a and b of the split, or neither")
        if self.a is not None and self.b is not None and not _count("a", self.a) <= _count("b", self.b):
            raise EstimateError(f"split a={self.a} > b={self.b}")


@dataclass(frozen=True)
class LinkEstimate:
    """One device's link as the latency model takes it; ``None`` where nothing was measured yet."""

    device: str
    uplink_bps: float | None
    downlink_bps: float | None
    delay_s: float | None  # one way
    delay_source: DelaySource
    samples: int  # requests that measured a transfer
    rtt_samples: int
    age_s: float | None  # since the last accepted sample (None: never)

    @property
    def rtt_s(self) -> float | None:
        return None if self.delay_s is None else 2 * self.delay_s


@dataclass(frozen=True)
class ComputeEstimate:
    """Measured speed relative to the profile (device: speed 1 = the profile's reference device; edge: 1 = as
    profiled)."""

    name: str
    speed: float | None
    samples: int
    age_s: float | None


def theil_sen(points: Iterable[tuple[float, float]], ratio: float = 1.5, min_pairs: int = 1
              ) -> tuple[float, float] | None:
    """Robust line ``y = intercept + slope * x``: the median slope over pairs whose ``x`` differ by at least
    ``ratio`` times, then the median intercept. ``None`` without ``min_pairs`` such pairs."""
    pts = list(points)
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1:]
        if min(x1, x2) > 0 and max(x1, x2) >= ratio * min(x1, x2)
    ]
    if len(slopes) < min_pairs:
        return None
    slope = statistics.median(slopes)
    return statistics.median(y - slope * x for x, y in pts), slope


class _Ewma:
    """Time-based EWMA; the first value is taken as is."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.t: float | None = None

    def update(self, x: float, now: float, cfg: EstimatorConfig) -> None:
        if self.value is None or self.t is None:
            self.value, self.t = x, now
            return
        dt = max(now - self.t, 0.0)
        alpha = max(cfg.min_alpha, -math.expm1(-dt / cfg.time_constant_s))
        self.value += alpha * (x - self.value)
        self.t = max(self.t, now)


class _Direction:
    """One direction of one link: recent (bytes, seconds) and the smoothed seconds per bit."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        self.window: deque[tuple[float, float]] = deque(maxlen=cfg.window)
        self.per_bit = _Ewma()
        self.fit_delay: float | None = None

    def add(self, nbytes: int, seconds: float, delay_s: float, now: float, cfg: EstimatorConfig) -> None:
        self.window.append((float(nbytes), seconds))
        fit = theil_sen(self.window, cfg.size_ratio, cfg.min_fit_pairs)
        if fit is not None and fit[1] > 0:
            intercept, slope = fit
            self.fit_delay = max(intercept, 0.0)
            raw = slope / 8
        else:
            self.fit_delay = None
            raw = statistics.median(max(s - delay_s, 0.0) / (8 * n) for n, s in self.window)
        self.per_bit.update(raw, now, cfg)

    def rate_bps(self, cfg: EstimatorConfig) -> float | None:
        v = self.per_bit.value
        if v is None:
            return None
        return cfg.max_rate_bps if v <= 0 else min(1 / v, cfg.max_rate_bps)


class _Ratio:
    """A smoothed ratio measured / profiled, from a median window."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.avg = _Ewma()
        self.samples = 0
        self.last: float | None = None

    def add(self, ratio: float, now: float, cfg: EstimatorConfig) -> None:
        self.window.append(ratio)
        self.avg.update(statistics.median(self.window), now, cfg)
        self.samples += 1
        self.last = now if self.last is None else max(self.last, now)

    def estimate(self, name: str, now: float) -> ComputeEstimate:
        v = self.avg.value
        speed = None if v is None or v <= 0 else 1 / v
        return ComputeEstimate(name, speed, self.samples, _age(self.last, now))


def _age(last: float | None, now: float) -> float | None:
    return None if last is None else max(now - last, 0.0)


class _Device:
    def __init__(self, cfg: EstimatorConfig) -> None:
        self.up = _Direction(cfg)
        self.down = _Direction(cfg)
        self.delay = _Ewma()
        self.delay_source: DelaySource = "none"
        self.rtts: deque[float] = deque(maxlen=cfg.window)
        self.rtt_samples = 0
        self.samples = 0
        self.last: float | None = None
        self.compute = _Ratio(cfg)

    def touch(self, now: float) -> None:
        self.last = now if self.last is None else max(self.last, now)


class LiveEstimator:
    """Per-device link and compute estimates, updated sample by sample (one per controller; not thread-safe).

    ``model``: the profile the compute speeds are measured against (per batch, the batch size in use); without
    it only the links are estimated.
    """

    def __init__(self, config: EstimatorConfig | None = None, model: ModelProfile | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._model = model
        # Prefix sums of the device's and the edge's block times, and the fixed costs per call (tail, body).
        self._prefix: tuple[list[float], list[float], float, float] | None = None
        self.set_model(model)
        self._devices: dict[str, _Device] = {}
        self._edge = _Ratio(self.config)

    def set_model(self, model: ModelProfile | None) -> None:
        """Measure compute against another profile (e.g. after re-profiling); past compute samples stay."""
        self._model = model
        if model is None:
            self._prefix = None
            return
        fwd, efwd = [0.0], [0.0]
        for x, e in zip(model.fwd_s, model.edge_fwd_s, strict=True):
            fwd.append(fwd[-1] + x)
            efwd.append(efwd[-1] + e)
        self._prefix = (fwd, efwd, model.tail_call_s, model.body_call_s)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self._devices)

    def _device(self, device: str) -> _Device:
        if not isinstance(device, str) or not device:
            raise EstimateError(f"device id must be a non-empty string, got {device!r}")
        if device not in self._devices:
            self._devices[device] = _Device(self.config)
        return self._devices[device]

    def observe(self, device: str, timing: RequestTiming, now: float) -> None:
        """One completed request. Transfers of 0 bytes say nothing about a rate and are skipped."""
        if not isinstance(timing, RequestTiming):
            raise EstimateError(f"expected a RequestTiming, got {type(timing).__name__}")
        now = _finite("now", now)
        profiled = self._profiled(timing)
        cfg = self.config
        dev = self._device(device)
        delay = dev.delay.value or 0.0
        moved = False
        if timing.bytes_up > 0:
            dev.up.add(timing.bytes_up, timing.uplink_s, delay, now, cfg)
            moved = True
        if timing.bytes_down > 0:
            dev.down.add(timing.bytes_down, timing.downlink_s, delay, now, cfg)
            moved = True
        if moved:
            dev.samples += 1
            fits = [d for d in (dev.up.fit_delay, dev.down.fit_delay) if d is not None]
            if fits:
                dev.delay.update(math.fsum(fits) / len(fits), now, cfg)
                dev.delay_source = "fit"
        if profiled is not None:
            device_s, body_s = profiled
            measured = timing.head_s + timing.tail_s
            if device_s > 0 and measured > 0:
                dev.compute.add(measured / device_s, now, cfg)
            if body_s > 0 and timing.body_s > 0:
                self._edge.add(timing.body_s / body_s, now, cfg)
        dev.touch(now)

    def _profiled(self, timing: RequestTiming) -> tuple[float, float] | None:
        """Profiled (device head + tail, edge body) seconds of the request's split, or None."""
        if self._prefix is None or timing.a is None or timing.b is None:
            return None
        fwd, efwd, tail_call_s, body_call_s = self._prefix
        L = len(fwd) - 1
        if timing.b > L:
            raise EstimateError(f"split ({timing.a}, {timing.b}) is outside the profiled model's {L} blocks")
        a, b = timing.a, timing.b
        # The runtimes' fixed costs per call are in the measured times too: the tail session's (charged at the
        # device's speed, as the latency model does) and the edge body's wake-up after idle.
        device_s = fwd[a] + (fwd[L] - fwd[b]) + (tail_call_s if b < L else 0.0)
        body_s = efwd[b] - efwd[a] + (body_call_s if a < b else 0.0)
        return device_s, body_s

    def observe_rtt(self, device: str, rtt_s: float, now: float) -> None:
        """A small message's round trip: half of it is the one-way delay, unless a fit knows better."""
        rtt_s = _finite("rtt_s", rtt_s)
        now = _finite("now", now)
        dev = self._device(device)
        dev.rtts.append(rtt_s)
        dev.rtt_samples += 1
        if dev.up.fit_delay is None and dev.down.fit_delay is None:
            dev.delay.update(statistics.median(dev.rtts) / 2, now, self.config)
            dev.delay_source = "rtt"
        dev.touch(now)

    def forget(self, device: str) -> None:
        """Drop a device's history (it left; if it comes back its link may be another)."""
        self._devices.pop(device, None)

    def link(self, device: str, now: float) -> LinkEstimate:
        now = _finite("now", now)
        dev = self._devices.get(device)
        if dev is None:
            return LinkEstimate(device, None, None, None, "none", 0, 0, None)
        return LinkEstimate(
            device=device,
            uplink_bps=dev.up.rate_bps(self.config),
            downlink_bps=dev.down.rate_bps(self.config),
            delay_s=dev.delay.value,
            delay_source=dev.delay_source,
            samples=dev.samples,
            rtt_samples=dev.rtt_samples,
            age_s=_age(dev.last, now),
        )

    def links(self, now: float) -> dict[str, LinkEstimate]:
        return {d: self.link(d, now) for d in self._devices}

    def device_speed(self, device: str, now: float) -> ComputeEstimate:
        now = _finite("now", now)
        dev = self._devices.get(device)
        if dev is None:
            return ComputeEstimate(device, None, 0, None)
        return dev.compute.estimate(device, now)

    def edge_speed(self, now: float) -> ComputeEstimate:
        return self._edge.estimate(EDGE, _finite("now", now))

    def speeds(self, now: float) -> dict[str, ComputeEstimate]:
        """Every device's compute estimate (the edge's is :meth:`edge_speed`)."""
        return {d: self.device_speed(d, now) for d in self._devices}
