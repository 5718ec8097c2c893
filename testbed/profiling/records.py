"""Measured profiles in memory: block profiles (per-block compute times) and link measurements, validated when
they are made (pure: no torch, no files; :mod:`testbed.profiling.store` reads and writes them as YAML).

* a :class:`BlockProfile`: one model on one runtime of one machine. Per batch size (:class:`BatchTimings`) and per
  block, the forward (and, for training, backward) time as a :class:`Stat` (median, p10, p90 over the timed
  repeats), plus the whole model timed in one run, the activation shape at every split point and the parameter
  bytes of every block;
* a :class:`LinkMeasurement`: round-trip time and throughput of one device's path to an edge server over the real
  ZeroMQ protocol, and the edge's fixed per-request handling cost seen over that path.

:func:`to_model_profile` turns a device's and the edge's block profiles into the planner's ModelProfile. Times are
seconds here. A record that cannot be right raises :class:`ProfileError` naming the field.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from testbed.errors import TestbedError
from testbed.planning.model import ModelProfile

__all__ = [
    "ACT_ITEMSIZE",
    "MAX_IDLE_S",
    "METHODS",
    "RUNTIMES",
    "BatchTimings",
    "BlockProfile",
    "LinkMeasurement",
    "ProfileError",
    "Stat",
    "is_int",
    "is_real",
    "to_model_profile",
    "utc_now",
]

#: Runtimes a block profile can be measured on.
RUNTIMES: Final[tuple[str, ...]] = ("onnxruntime", "torch")
#: How per-block times were obtained, per runtime: ``block`` (each block timed alone) or ``prefix`` (differences
#: of head-prefix times; see testbed.profiling.blocks).
METHODS: Final[dict[str, tuple[str, ...]]] = {"onnxruntime": ("prefix", "block"), "torch": ("block",)}
#: Bytes per element of an activation (float32 on the wire).
ACT_ITEMSIZE: Final[int] = 4
#: The longest idle wait before a timed call that a profile may record (seconds).
MAX_IDLE_S: Final[float] = 1.0



class ProfileError(TestbedError):
    """A profile that cannot be measured, saved, loaded or used: the message names the file and the field."""


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (seconds resolution), as written in profile files."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def is_int(v: object) -> bool:
    """An integer that is not a bool (YAML and numpy integers included)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A real number that is not a bool (YAML floats, ints and numpy scalars included)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# In-memory profiles


@dataclass(frozen=True)
class Stat:
    """A summary of repeated measurements of one quantity (seconds): median, 10th and 90th percentile, count."""

    median: float
    p10: float
    p90: float
    n: int

    def __post_init__(self) -> None:
        for name in ("median", "p10", "p90"):
            v = getattr(self, name)
            if not (is_real(v) and math.isfinite(v) and v >= 0):
                raise ProfileError(f"{name} = {v!r} must be a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if not (is_int(self.n) and self.n >= 1):
            raise ProfileError(f"sample count n = {self.n!r} must be an integer >= 1")
        object.__setattr__(self, "n", int(self.n))
        # Rounding to the nanosecond in the files may reorder values that were equal to within 1 ns.
        if not self.p10 - 1e-9 <= self.median <= self.p90 + 1e-9:
            raise ProfileError(f"need p10 <= median <= p90, got {self.p10!r}, {self.median!r}, {self.p90!r}")

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        """Summarise samples (seconds); percentiles by linear interpolation."""
        if len(samples) == 0:
            raise ProfileError("no samples to summarise")
        arr = np.asarray(samples, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ProfileError("samples must be finite and >= 0")
        p10, median, p90 = np.percentile(arr, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), int(arr.size))

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80% (0 when the median is 0)."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else 0.0


@dataclass(frozen=True)
class BatchTimings:
    """One batch size: per-block forward (and backward) times, and the whole model timed in one run.

    ``call`` is a fixed cost per call beyond the blocks, paid after an idle wait (see testbed.profiling.blocks):
    on onnxruntime (method ``prefix``) the cost of one more session call as a device agent makes it after waiting
    for the edge (what a tail costs beyond its blocks' prefix differences); on torch inference profiled with an
    idle wait, the edge body's wake-up: what the first block of a body run costs beyond its time inside a chain.
    None when not measured.
    """

    batch_size: int
    fwd: tuple[Stat, ...]
    model_fwd: Stat
    bwd: tuple[Stat, ...] | None = None
    model_bwd: Stat | None = None
    call: Stat | None = None

    def __post_init__(self) -> None:
        if not (is_int(self.batch_size) and self.batch_size >= 1):
            raise ProfileError(f"batch_size = {self.batch_size!r} must be an integer >= 1")
        object.__setattr__(self, "fwd", tuple(self.fwd))
        if self.bwd is not None:
            object.__setattr__(self, "bwd", tuple(self.bwd))
            if len(self.bwd) != len(self.fwd):
                raise ProfileError(f"batch {self.batch_size}: {len(self.bwd)} backward times for "
                                   f"{len(self.fwd)} blocks")
        if (self.bwd is None) != (self.model_bwd is None):
            raise ProfileError(f"batch {self.batch_size}: per-block and whole-model backward times go together")

    @property
    def fwd_s(self) -> tuple[float, ...]:
        """Per-block forward medians (seconds)."""
        return tuple(s.median for s in self.fwd)

    @property
    def bwd_s(self) -> tuple[float, ...]:
        """Per-block backward medians (seconds); zeros when not measured."""
        return tuple(s.median for s in self.bwd) if self.bwd is not None else (0.0,) * len(self.fwd)


@dataclass(frozen=True)
class BlockProfile:
    """One model measured block by block on one runtime of one machine.

    ``speed_vs_pi4`` is the speed of the machine (or device class) that measured the profile, in Raspberry Pi 4
    units, and ``speed_source`` says where that number came from; :func:`testbed.profiling.problem.build_problem`
    scales the times to other device classes with it.
    """

    model: str
    config: Mapping[str, Any]
    weights_hash: str
    runtime: str
    device: str
    threads: int
    training: bool
    warmup: int
    repeats: int
    method: str
    act_shapes: tuple[tuple[int, ...], ...]
    param_bytes: tuple[int, ...]
    batches: tuple[BatchTimings, ...]
    speed_vs_pi4: float
    speed_source: str
    host: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    #: The idle wait before every timed call (0: back to back). Served work runs after waiting for the network,
    #: with caches gone cold; see testbed.profiling.blocks.
    idle_s: float = 0.0

    def __post_init__(self) -> None:
        where = f"profile of {self.model!r}"
        if not (is_real(self.idle_s) and math.isfinite(self.idle_s) and 0 <= self.idle_s <= MAX_IDLE_S):
            raise ProfileError(f"{where}: idle wait {self.idle_s!r} s must be a number in 0..{MAX_IDLE_S:g}")
        object.__setattr__(self, "idle_s", float(self.idle_s))
        if not isinstance(self.model, str) or not self.model:
            raise ProfileError("profile: model name must be a non-empty string")
        if not isinstance(self.config, Mapping):
            raise ProfileError(f"{where}: config must be a mapping")
        if not isinstance(self.weights_hash, str):
            raise ProfileError(f"{where}: weights_hash must be a string")
        if self.runtime not in RUNTIMES:
            raise ProfileError(f"{where}: runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.runtime == "onnxruntime" and self.training:
            raise ProfileError(f"{where}: training is profiled on torch (the device trains with torch), "
                               "not onnxruntime")
        if self.method not in METHODS[self.runtime]:
            raise ProfileError(f"{where}: method {self.method!r} is not one of {', '.join(METHODS[self.runtime])} "
                               f"for {self.runtime}")
        if not isinstance(self.device, str) or not self.device:
            raise ProfileError(f"{where}: device must be a non-empty string such as 'cpu' or 'cuda:0'")
        for name in ("threads", "warmup", "repeats"):
            v = getattr(self, name)
            if not (is_int(v) and v >= (0 if name == "warmup" else 1)):
                raise ProfileError(f"{where}: {name} = {v!r} must be a positive integer")
        if not isinstance(self.training, bool):
            raise ProfileError(f"{where}: training must be true or false")
        try:
            shapes = tuple(tuple(int(d) for d in s) for s in self.act_shapes)
        except (TypeError, ValueError):
            raise ProfileError(f"{where}: act_shapes must be a list of shapes (lists of integers)") from None
        object.__setattr__(self, "act_shapes", shapes)
        object.__setattr__(self, "param_bytes", tuple(self.param_bytes))
        object.__setattr__(self, "batches", tuple(sorted(self.batches, key=lambda b: b.batch_size)))
        L = len(self.param_bytes)
        if L < 2:
            raise ProfileError(f"{where}: needs at least 2 blocks, got {L}")
        if len(shapes) != L + 1:
            raise ProfileError(f"{where}: {len(shapes)} activation shapes for {L} blocks (need L + 1 = {L + 1}: "
                               "the input, then the output of every block)")
        if any(d < 1 for s in shapes for d in s):
            raise ProfileError(f"{where}: activation dimensions must be >= 1")
        if not all(is_int(p) and p >= 0 for p in self.param_bytes):
            raise ProfileError(f"{where}: param_bytes must be integers >= 0")
        if not self.batches:
            raise ProfileError(f"{where}: no batch sizes measured")
        sizes = [b.batch_size for b in self.batches]
        if len(set(sizes)) != len(sizes):
            raise ProfileError(f"{where}: batch size measured twice ({sizes})")
        for b in self.batches:
            if len(b.fwd) != L:
                raise ProfileError(f"{where}: batch {b.batch_size} has {len(b.fwd)} forward times for {L} blocks")
            if self.training and b.bwd is None:
                raise ProfileError(f"{where}: a training profile needs backward times (batch {b.batch_size})")
            if not self.training and b.bwd is not None:
                raise ProfileError(f"{where}: an inference profile has no backward times (batch {b.batch_size})")
        if not (is_real(self.speed_vs_pi4) and math.isfinite(self.speed_vs_pi4) and self.speed_vs_pi4 > 0):
            raise ProfileError(f"{where}: speed_vs_pi4 = {self.speed_vs_pi4!r} must be a number > 0")
        object.__setattr__(self, "speed_vs_pi4", float(self.speed_vs_pi4))
        object.__setattr__(self, "config", dict(self.config))
        object.__setattr__(self, "host", dict(self.host))

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks."""
        return len(self.param_bytes)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(b.batch_size for b in self.batches)

    @property
    def act_bytes_per_sample(self) -> tuple[int, ...]:
        """Bytes crossing each split point 0..L for one sample (float32)."""
        return tuple(math.prod(s) * ACT_ITEMSIZE for s in self.act_shapes)

    def act_bytes(self, batch_size: int) -> tuple[int, ...]:
        """Bytes crossing each split point 0..L for a batch."""
        return tuple(n * batch_size for n in self.act_bytes_per_sample)

    def batch(self, batch_size: int) -> BatchTimings:
        """The timings of one measured batch size; ProfileError naming the measured ones otherwise."""
        for b in self.batches:
            if b.batch_size == batch_size:
                return b
        raise ProfileError(f"profile of {self.model!r} ({self.runtime}, {self.device}) has no batch size "
                           f"{batch_size}; measured: {', '.join(map(str, self.batch_sizes))}")

    @property
    def host_name(self) -> str:
        return str(self.host.get("hostname") or "unknown-host")


@dataclass(frozen=True)
class LinkMeasurement:
    """A device's path to an edge server, measured over the ZeroMQ protocol (seconds, bits per second).

    ``rtt`` is the round trip of an empty PING/PONG; ``uplink_rtt[k]`` that of a PING carrying ``sizes[k]`` bytes;
    ``echo_rtt[k]`` (when the edge echoed payloads) that of ``sizes[k]`` bytes up and back, less the time the
    message spent inside the edge. Rates are the inverse slopes of straight lines fitted through the medians,
    so per-message costs (headers, syscalls) land in the intercept, not in the rate.

    ``request_rtt`` (when both a PING echo and an empty-body inference echo were available) is the whole round
    trip of an INFER_REQUEST for an empty body carrying ``request_bytes`` each way, edge time included, and
    ``request_echo_rtt`` that of a PING echo of the same bytes; ``edge_request_s`` is the excess of the first
    median over the second (clamped at 0): the edge's fixed handling of one request (hand-off to the compute
    thread, copy, wake-up, reply). None: not measured. ``request_residence`` and ``request_echo_residence``
    (optional; files before them lack them) are the times the same two messages spent inside the edge
    (``edge_send_ns - edge_recv_ns``, the edge's clock); when present, ``edge_request_s`` is the excess of their
    medians instead, which carries no link noise.

    ``uplink_burst_bytes``/``downlink_burst_bytes``: what a message passes of a shaped link's token bucket at no
    cost after the link idled (an HTB or tbf burst lets its first bytes through unshaped): the rates are fitted
    on the two largest sizes, and the burst is how far that line's intercept lies below the empty round trip,
    in bytes at that rate (0: none seen, or a single size). Files before them load with 0.
    """

    endpoint: str
    rtt: Stat
    sizes: tuple[int, ...]
    uplink_rtt: tuple[Stat, ...]
    uplink_bps: float
    downlink_bps: float | None = None
    echo_rtt: tuple[Stat, ...] | None = None
    downlink_method: str = "none"
    host: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    notes: str = ""
    request_bytes: int | None = None
    request_rtt: Stat | None = None
    request_echo_rtt: Stat | None = None
    edge_request_s: float | None = None
    request_residence: Stat | None = None
    request_echo_residence: Stat | None = None
    uplink_burst_bytes: int = 0
    downlink_burst_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        for name in ("uplink_burst_bytes", "downlink_burst_bytes"):
            v = getattr(self, name)
            if not (is_int(v) and v >= 0):
                raise ProfileError(f"link measurement: {name} = {v!r} must be an integer >= 0")
            object.__setattr__(self, name, int(v))
        object.__setattr__(self, "uplink_rtt", tuple(self.uplink_rtt))
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ProfileError("link measurement: sizes must be a non-empty list of byte counts >= 1")
        if len(self.uplink_rtt) != len(self.sizes):
            raise ProfileError("link measurement: one uplink round trip per size is needed")
        if self.echo_rtt is not None:
            object.__setattr__(self, "echo_rtt", tuple(self.echo_rtt))
            if len(self.echo_rtt) != len(self.sizes):
                raise ProfileError("link measurement: one echo round trip per size is needed")
        if (self.request_rtt is None) != (self.request_echo_rtt is None) or (
                (self.request_rtt is None) != (self.request_bytes is None)):
            raise ProfileError("link measurement: request_bytes, request_rtt and request_echo_rtt go together")
        if (self.request_residence is None) != (self.request_echo_residence is None) or (
                self.request_residence is not None and self.request_rtt is None):
            raise ProfileError("link measurement: request_residence and request_echo_residence go together, "
                               "and with request_rtt")
        if self.request_bytes is not None:
            if not (is_int(self.request_bytes) and self.request_bytes >= 1):
                raise ProfileError(f"link measurement: request_bytes = {self.request_bytes!r} must be an "
                                   "integer >= 1")
            object.__setattr__(self, "request_bytes", int(self.request_bytes))
        if self.edge_request_s is not None:
            v = self.edge_request_s
            if not (is_real(v) and math.isfinite(v) and v >= 0):
                raise ProfileError(f"link measurement: edge_request_s = {v!r} must be a finite number >= 0")
            object.__setattr__(self, "edge_request_s", float(v))
        for name in ("uplink_bps", "downlink_bps"):
            v = getattr(self, name)
            if v is None and name == "downlink_bps":
                continue
            if not (is_real(v) and math.isfinite(v) and v > 0):
                raise ProfileError(f"link measurement: {name} = {v!r} must be a finite number > 0")
            object.__setattr__(self, name, float(v))
        if self.downlink_method not in ("none", "ping-echo", "empty-body"):
            raise ProfileError(f"link measurement: unknown downlink_method {self.downlink_method!r}")
        object.__setattr__(self, "host", dict(self.host))

    @property
    def delay_s(self) -> float:
        """One-way delay for the planner: half the median empty round trip."""
        return self.rtt.median / 2

    @property
    def host_name(self) -> str:
        return str(self.host.get("hostname") or "unknown-host")


# ---------------------------------------------------------------------------------------------
# Conversion to the planner's input


def _compatible(device: BlockProfile, edge: BlockProfile) -> None:
    what = f"device profile ({device.runtime}, {device.host_name}) and edge profile ({edge.runtime}, {edge.host_name})"
    if device.model != edge.model:
        raise ProfileError(f"{what} are of different models: {device.model!r} and {edge.model!r}")
    if device.config != edge.config:
        raise ProfileError(f"{what} are of different configs of {device.model!r}: {device.config} and {edge.config}")
    if device.act_shapes != edge.act_shapes or device.param_bytes != edge.param_bytes:
        raise ProfileError(f"{what} disagree on the activation shapes or parameter sizes")


def to_model_profile(
    device: BlockProfile,
    edge: BlockProfile | None = None,
    batch_size: int | None = None,
    *,
    edge_scale: float = 1.0,
    name: str | None = None,
) -> ModelProfile:
    """The planner's :class:`~testbed.planning.model.ModelProfile` for one batch size (per-batch seconds, bytes).

    ``fwd_s``/``bwd_s`` are the device profile's medians; ``edge_fwd_s``/``edge_bwd_s`` the edge profile's (the
    device profile's when ``edge`` is None), divided by ``edge_scale`` (how many times faster the edge is than
    the machine that measured it; 1 when the edge profile was measured on the edge). ``batch_size`` may be left
    out when exactly one batch size is measured in both profiles. Backward times are zeros for an inference
    profile.
    """
    edge = device if edge is None else edge
    if edge is not device:
        _compatible(device, edge)
    if not (is_real(edge_scale) and math.isfinite(edge_scale) and edge_scale > 0):
        raise ProfileError(f"edge_scale = {edge_scale!r} must be a number > 0")
    if batch_size is None:
        common = sorted(set(device.batch_sizes) & set(edge.batch_sizes))
        if len(common) != 1:
            raise ProfileError(
                f"choose a batch size: the device profile has {', '.join(map(str, device.batch_sizes))}"
                + ("" if edge is device else f" and the edge profile {', '.join(map(str, edge.batch_sizes))}"))
        batch_size = common[0]
    dev_b = device.batch(batch_size)
    edge_b = edge.batch(batch_size)
    # Only a prefix profile leaves the tail's call out of the blocks; summed single-block calls include it.
    tail_call = dev_b.call.median if dev_b.call is not None and device.method == "prefix" else 0.0
    # A torch profile measured after idle waits has the body's wake-up cost apart from its blocks (blocks.py).
    body_call = edge_b.call.median / edge_scale if edge_b.call is not None and edge.runtime == "torch" else 0.0
    return ModelProfile(
        name=name or f"{device.model}@b{batch_size}",
        fwd_s=dev_b.fwd_s,
        bwd_s=dev_b.bwd_s,
        edge_fwd_s=tuple(t / edge_scale for t in edge_b.fwd_s),
        edge_bwd_s=tuple(t / edge_scale for t in edge_b.bwd_s),
        act_bytes=device.act_bytes(batch_size),
        param_bytes=device.param_bytes,
        tail_call_s=tail_call,
        body_call_s=body_call,
    )
