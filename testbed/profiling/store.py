"""Measured profiles on disk: block profiles (per-block compute times) and link measurements, as YAML.

Two kinds of file live under ``profiles/measured/``:

* a **block profile** (``kind: blocks``): one model on one runtime of one machine. Per batch size and per block,
  the forward (and, for training, backward) time as median, p10 and p90 over the timed repeats, plus the whole
  model timed in one run (a check on the per-block sum), the activation shape at every split point and the
  parameter bytes of every block;
* a **link measurement** (``kind: link``): round-trip time and throughput of one device's path to an edge server
  over the real ZeroMQ protocol, and the edge's fixed per-request handling cost seen over that path.

Fields added after the first files were written (``call_ms`` of a batch; ``request_bytes``, ``request_rtt_ms``,
``request_echo_rtt_ms``, ``edge_request_ms``, ``request_residence_ms`` and ``request_echo_residence_ms`` of a
link) are optional: files without them load, with the costs
unmeasured (0 in the model).

Times are milliseconds in the files (``*_ms`` keys, rounded to the nanosecond) and seconds in memory. Every file
records the host facts of the machine that measured it. Loading validates everything and raises
:class:`ProfileError` naming the file and the field. This module is pure (no torch): the planner side loads
profiles without the measuring stack.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml

from testbed.errors import TestbedError
from testbed.planning.model import ModelProfile

__all__ = [
    "FORMAT",
    "MAX_IDLE_S",
    "MEASURED_DIR",
    "METHODS",
    "RUNTIMES",
    "BatchTimings",
    "BlockProfile",
    "LinkMeasurement",
    "ProfileError",
    "Stat",
    "default_link_path",
    "default_profile_path",
    "load_block_profile",
    "load_link_measurement",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
    "runtime_tag",
    "save_profile",
    "to_model_profile",
    "utc_now",
]

#: The format tag written in (and required of) every profile file.
FORMAT: Final[str] = "testbed.profile/1"
#: Where measured profiles are kept by default (the repository's profiles/measured/).
MEASURED_DIR: Final[Path] = Path(__file__).resolve().parents[2] / "profiles" / "measured"
#: Runtimes a block profile can be measured on.
RUNTIMES: Final[tuple[str, ...]] = ("onnxruntime", "torch")
#: How per-block times were obtained, per runtime: ``block`` (each block timed alone) or ``prefix`` (differences
#: of head-prefix times; see testbed.profiling.blocks).
METHODS: Final[dict[str, tuple[str, ...]]] = {"onnxruntime": ("prefix", "block"), "torch": ("block",)}
#: Bytes per element of an activation (float32 on the wire).
ACT_ITEMSIZE: Final[int] = 4
#: The longest idle wait before a timed call that a profile may record (seconds).
MAX_IDLE_S: Final[float] = 1.0

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class ProfileError(TestbedError):
    """A profile that cannot be measured, saved, loaded or used: the message names the file and the field."""


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (seconds resolution), as written in profile files."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
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
            if not (_is_num(v) and math.isfinite(v) and v >= 0):
                raise ProfileError(f"{name} = {v!r} must be a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if not (_is_int(self.n) and self.n >= 1):
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
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
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
        if not (_is_num(self.idle_s) and math.isfinite(self.idle_s) and 0 <= self.idle_s <= MAX_IDLE_S):
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
            if not (_is_int(v) and v >= (0 if name == "warmup" else 1)):
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
        if not all(_is_int(p) and p >= 0 for p in self.param_bytes):
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
        if not (_is_num(self.speed_vs_pi4) and math.isfinite(self.speed_vs_pi4) and self.speed_vs_pi4 > 0):
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
            if not (_is_int(v) and v >= 0):
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
            if not (_is_int(self.request_bytes) and self.request_bytes >= 1):
                raise ProfileError(f"link measurement: request_bytes = {self.request_bytes!r} must be an "
                                   "integer >= 1")
            object.__setattr__(self, "request_bytes", int(self.request_bytes))
        if self.edge_request_s is not None:
            v = self.edge_request_s
            if not (_is_num(v) and math.isfinite(v) and v >= 0):
                raise ProfileError(f"link measurement: edge_request_s = {v!r} must be a finite number >= 0")
            object.__setattr__(self, "edge_request_s", float(v))
        for name in ("uplink_bps", "downlink_bps"):
            v = getattr(self, name)
            if v is None and name == "downlink_bps":
                continue
            if not (_is_num(v) and math.isfinite(v) and v > 0):
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
    if not (_is_num(edge_scale) and math.isfinite(edge_scale) and edge_scale > 0):
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


# ---------------------------------------------------------------------------------------------
# File names


def _safe(text: str) -> str:
    return _SAFE_NAME.sub("-", text).strip("-.") or "x"


def runtime_tag(profile: BlockProfile) -> str:
    """``onnxruntime``, ``torch``, ``torch-cuda``…, with ``-training`` for a training profile."""
    tag = profile.runtime
    kind = profile.device.split(":")[0]
    if kind != "cpu":
        tag += f"-{kind}"
    if profile.threads != 1:
        tag += f"-t{profile.threads}"
    return tag + ("-training" if profile.training else "")


def default_profile_path(profile: BlockProfile, root: Path = MEASURED_DIR) -> Path:
    """``root/<host>-<model>-<runtime tag>.yaml``."""
    return Path(root) / f"{_safe(profile.host_name)}-{_safe(profile.model)}-{runtime_tag(profile)}.yaml"


def default_link_path(link: LinkMeasurement, root: Path = MEASURED_DIR) -> Path:
    """``root/<host>-link-<endpoint host and port>.yaml``."""
    target = re.sub(r"^[a-z]+://", "", link.endpoint)
    return Path(root) / f"{_safe(link.host_name)}-link-{_safe(target.replace(':', '-'))}.yaml"


# ---------------------------------------------------------------------------------------------
# Serialisation


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


def _stat_to(s: Stat) -> dict[str, Any]:
    return {"median": _ms(s.median), "p10": _ms(s.p10), "p90": _ms(s.p90), "n": s.n}


def _stats_to(stats: Sequence[Stat]) -> dict[str, Any]:
    return {"median": [_ms(s.median) for s in stats], "p10": [_ms(s.p10) for s in stats],
            "p90": [_ms(s.p90) for s in stats], "n": [s.n for s in stats]}


class _Reader:
    """Field access on a parsed mapping with errors that name the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, msg: str) -> ProfileError:
        return ProfileError(f"{self.where}: {msg}")

    def mapping(self, d: Any, what: str, required: Sequence[str] = (), allowed: Sequence[str] | None = None
                ) -> Mapping[str, Any]:
        if not isinstance(d, Mapping):
            raise self.fail(f"{what} must be a mapping")
        missing = [k for k in required if k not in d]
        if missing:
            raise self.fail(f"{what}: missing {', '.join(missing)}")
        if allowed is not None:
            unknown = sorted(str(k) for k in d if k not in allowed)
            if unknown:
                raise self.fail(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        return d

    def num(self, v: Any, what: str) -> float:
        if not _is_num(v) or not math.isfinite(v):
            raise self.fail(f"{what} must be a finite number, got {v!r}")
        return float(v)

    def int_(self, v: Any, what: str) -> int:
        if not _is_int(v):
            raise self.fail(f"{what} must be an integer, got {v!r}")
        return int(v)

    def str_(self, v: Any, what: str) -> str:
        if not isinstance(v, str):
            raise self.fail(f"{what} must be a string, got {v!r}")
        return v

    def stat(self, d: Any, what: str) -> Stat:
        d = self.mapping(d, what, ("median", "p10", "p90", "n"), ("median", "p10", "p90", "n"))
        try:
            return Stat(self.num(d["median"], f"{what}.median") / 1e3, self.num(d["p10"], f"{what}.p10") / 1e3,
                        self.num(d["p90"], f"{what}.p90") / 1e3, self.int_(d["n"], f"{what}.n"))
        except ProfileError as exc:
            if str(exc).startswith(self.where):
                raise
            raise self.fail(f"{what}: {exc}") from None

    def stats(self, d: Any, what: str, length: int) -> tuple[Stat, ...]:
        d = self.mapping(d, what, ("median", "p10", "p90", "n"), ("median", "p10", "p90", "n"))
        cols = {}
        for key in ("median", "p10", "p90", "n"):
            col = d[key]
            if not isinstance(col, list) or len(col) != length:
                raise self.fail(f"{what}.{key} must be a list of {length} entries (one per block)")
            cols[key] = col
        out = []
        for k in range(length):
            out.append(self.stat({key: cols[key][k] for key in cols}, f"{what}[{k}]"))
        return tuple(out)


def profile_to_dict(profile: BlockProfile | LinkMeasurement) -> dict[str, Any]:
    """The file form of a profile (milliseconds, plain lists and mappings)."""
    if isinstance(profile, LinkMeasurement):
        return {
            "format": FORMAT,
            "kind": "link",
            "created": profile.created or utc_now(),
            "endpoint": profile.endpoint,
            "host": dict(profile.host),
            "rtt_ms": _stat_to(profile.rtt),
            "delay_ms": _ms(profile.delay_s),
            "uplink_bps": round(profile.uplink_bps),
            "downlink_bps": None if profile.downlink_bps is None else round(profile.downlink_bps),
            "downlink_method": profile.downlink_method,
            "sizes_bytes": list(profile.sizes),
            "uplink_rtt_ms": _stats_to(profile.uplink_rtt),
            "echo_rtt_ms": None if profile.echo_rtt is None else _stats_to(profile.echo_rtt),
            "request_bytes": profile.request_bytes,
            "request_rtt_ms": None if profile.request_rtt is None else _stat_to(profile.request_rtt),
            "request_echo_rtt_ms": None if profile.request_echo_rtt is None else _stat_to(profile.request_echo_rtt),
            "edge_request_ms": None if profile.edge_request_s is None else _ms(profile.edge_request_s),
            **({} if profile.request_residence is None or profile.request_echo_residence is None else {
                "request_residence_ms": _stat_to(profile.request_residence),
                "request_echo_residence_ms": _stat_to(profile.request_echo_residence)}),
            "uplink_burst_bytes": profile.uplink_burst_bytes,
            "downlink_burst_bytes": profile.downlink_burst_bytes,
            "notes": profile.notes,
        }
    if not isinstance(profile, BlockProfile):
        raise ProfileError(f"cannot save a {type(profile).__name__} as a profile")
    batches = []
    for b in profile.batches:
        batches.append({
            "batch_size": b.batch_size,
            "fwd_ms": _stats_to(b.fwd),
            "bwd_ms": None if b.bwd is None else _stats_to(b.bwd),
            "model_fwd_ms": _stat_to(b.model_fwd),
            "model_bwd_ms": None if b.model_bwd is None else _stat_to(b.model_bwd),
            **({} if b.call is None else {"call_ms": _stat_to(b.call)}),
        })
    return {
        "format": FORMAT,
        "kind": "blocks",
        "created": profile.created or utc_now(),
        "model": {"name": profile.model, "config": dict(profile.config), "weights_hash": profile.weights_hash,
                  "num_blocks": profile.num_blocks},
        "measurement": {"runtime": profile.runtime, "device": profile.device, "threads": profile.threads,
                        "training": profile.training, "method": profile.method, "warmup": profile.warmup,
                        "repeats": profile.repeats, "idle_ms": round(profile.idle_s * 1e3, 6)},
        "reference": {"speed_vs_pi4": profile.speed_vs_pi4, "source": profile.speed_source},
        "host": dict(profile.host),
        "act_shapes": [list(s) for s in profile.act_shapes],
        "act_bytes_per_sample": list(profile.act_bytes_per_sample),
        "param_bytes": list(profile.param_bytes),
        "batches": batches,
    }


_BLOCK_KEYS = ("format", "kind", "created", "model", "measurement", "reference", "host", "act_shapes",
               "act_bytes_per_sample", "param_bytes", "batches")
_LINK_KEYS = ("format", "kind", "created", "endpoint", "host", "rtt_ms", "delay_ms", "uplink_bps", "downlink_bps",
              "downlink_method", "sizes_bytes", "uplink_rtt_ms", "echo_rtt_ms", "request_bytes", "request_rtt_ms",
              "request_echo_rtt_ms", "edge_request_ms", "request_residence_ms", "request_echo_residence_ms", "notes",
              "uplink_burst_bytes", "downlink_burst_bytes")


def _link_from(d: Mapping[str, Any], r: _Reader) -> LinkMeasurement:
    d = r.mapping(d, "link measurement", ("endpoint", "rtt_ms", "uplink_bps", "sizes_bytes", "uplink_rtt_ms"),
                  _LINK_KEYS)
    sizes = d["sizes_bytes"]
    if not isinstance(sizes, list) or not all(_is_int(s) for s in sizes):
        raise r.fail("sizes_bytes must be a list of integers")
    down = d.get("downlink_bps")
    echo = d.get("echo_rtt_ms")
    request = d.get("request_rtt_ms")
    request_echo = d.get("request_echo_rtt_ms")
    request_bytes = d.get("request_bytes")
    edge_request = d.get("edge_request_ms")
    residence, echo_residence = d.get("request_residence_ms"), d.get("request_echo_residence_ms")
    try:
        link = LinkMeasurement(
            endpoint=r.str_(d["endpoint"], "endpoint"),
            rtt=r.stat(d["rtt_ms"], "rtt_ms"),
            sizes=tuple(sizes),
            uplink_rtt=r.stats(d["uplink_rtt_ms"], "uplink_rtt_ms", len(sizes)),
            uplink_bps=r.num(d["uplink_bps"], "uplink_bps"),
            downlink_bps=None if down is None else r.num(down, "downlink_bps"),
            echo_rtt=None if echo is None else r.stats(echo, "echo_rtt_ms", len(sizes)),
            downlink_method=r.str_(d.get("downlink_method", "none"), "downlink_method"),
            host=r.mapping(d.get("host", {}), "host"),
            created=str(d.get("created", "")),
            notes=r.str_(d.get("notes", ""), "notes"),
            request_bytes=None if request_bytes is None else r.int_(request_bytes, "request_bytes"),
            request_rtt=None if request is None else r.stat(request, "request_rtt_ms"),
            request_echo_rtt=None if request_echo is None else r.stat(request_echo, "request_echo_rtt_ms"),
            edge_request_s=None if edge_request is None else r.num(edge_request, "edge_request_ms") / 1e3,
            request_residence=None if residence is None else r.stat(residence, "request_residence_ms"),
            request_echo_residence=None if echo_residence is None else r.stat(echo_residence,
                                                                              "request_echo_residence_ms"),
            uplink_burst_bytes=r.int_(d.get("uplink_burst_bytes", 0), "uplink_burst_bytes"),
            downlink_burst_bytes=r.int_(d.get("downlink_burst_bytes", 0), "downlink_burst_bytes"),
        )
    except ProfileError as exc:
        if str(exc).startswith(r.where):
            raise
        raise r.fail(str(exc)) from None
    return link


def _blocks_from(d: Mapping[str, Any], r: _Reader) -> BlockProfile:
    d = r.mapping(d, "block profile", ("model", "measurement", "reference", "act_shapes", "param_bytes", "batches"),
                  _BLOCK_KEYS)
    model = r.mapping(d["model"], "model", ("name", "config", "weights_hash"),
                      ("name", "config", "weights_hash", "num_blocks"))
    keys = ("runtime", "device", "threads", "training", "method", "warmup", "repeats")
    meas = r.mapping(d["measurement"], "measurement", keys, (*keys, "idle_ms"))  # idle_ms: newer files
    ref = r.mapping(d["reference"], "reference", ("speed_vs_pi4", "source"), ("speed_vs_pi4", "source"))
    params = d["param_bytes"]
    if not isinstance(params, list) or not all(_is_int(p) for p in params):
        raise r.fail("param_bytes must be a list of integers")
    L = len(params)
    if "num_blocks" in model and model["num_blocks"] != L:
        raise r.fail(f"model.num_blocks = {model['num_blocks']!r} but param_bytes has {L} entries")
    shapes = d["act_shapes"]
    if not isinstance(shapes, list) or not all(isinstance(s, list) and all(_is_int(x) for x in s) for s in shapes):
        raise r.fail("act_shapes must be a list of shapes (lists of integers)")
    raw_batches = d["batches"]
    if not isinstance(raw_batches, list) or not raw_batches:
        raise r.fail("batches must be a non-empty list")
    batches = []
    for k, rb in enumerate(raw_batches):
        what = f"batches[{k}]"
        rb = r.mapping(rb, what, ("batch_size", "fwd_ms", "model_fwd_ms"),
                       ("batch_size", "fwd_ms", "bwd_ms", "model_fwd_ms", "model_bwd_ms", "call_ms"))
        bwd, model_bwd, call = rb.get("bwd_ms"), rb.get("model_bwd_ms"), rb.get("call_ms")
        try:
            batches.append(BatchTimings(
                batch_size=r.int_(rb["batch_size"], f"{what}.batch_size"),
                fwd=r.stats(rb["fwd_ms"], f"{what}.fwd_ms", L),
                model_fwd=r.stat(rb["model_fwd_ms"], f"{what}.model_fwd_ms"),
                bwd=None if bwd is None else r.stats(bwd, f"{what}.bwd_ms", L),
                model_bwd=None if model_bwd is None else r.stat(model_bwd, f"{what}.model_bwd_ms"),
                call=None if call is None else r.stat(call, f"{what}.call_ms"),
            ))
        except ProfileError as exc:
            if str(exc).startswith(r.where):
                raise
            raise r.fail(f"{what}: {exc}") from None
    training = meas["training"]
    if not isinstance(training, bool):
        raise r.fail(f"measurement.training must be true or false, got {training!r}")
    try:
        profile = BlockProfile(
            model=r.str_(model["name"], "model.name"),
            config=r.mapping(model["config"], "model.config"),
            weights_hash=r.str_(model["weights_hash"], "model.weights_hash"),
            runtime=r.str_(meas["runtime"], "measurement.runtime"),
            device=r.str_(meas["device"], "measurement.device"),
            threads=r.int_(meas["threads"], "measurement.threads"),
            training=training,
            warmup=r.int_(meas["warmup"], "measurement.warmup"),
            repeats=r.int_(meas["repeats"], "measurement.repeats"),
            method=r.str_(meas["method"], "measurement.method"),
            act_shapes=tuple(tuple(s) for s in shapes),
            param_bytes=tuple(params),
            batches=tuple(batches),
            speed_vs_pi4=r.num(ref["speed_vs_pi4"], "reference.speed_vs_pi4"),
            speed_source=r.str_(ref["source"], "reference.source"),
            host=r.mapping(d.get("host", {}), "host"),
            created=str(d.get("created", "")),
            idle_s=r.num(meas.get("idle_ms", 0.0), "measurement.idle_ms") * 1e-3,
        )
    except ProfileError as exc:
        if str(exc).startswith(r.where):
            raise
        raise r.fail(str(exc)) from None
    if "act_bytes_per_sample" in d and list(d["act_bytes_per_sample"]) != list(profile.act_bytes_per_sample):
        raise r.fail("act_bytes_per_sample does not match act_shapes (float32)")
    return profile


def profile_from_dict(data: Any, where: str = "profile") -> BlockProfile | LinkMeasurement:
    """Rebuild a profile from its file form; ``where`` names the source in error messages."""
    r = _Reader(where)
    d = r.mapping(data, "profile", ("format", "kind"))
    if d["format"] != FORMAT:
        raise r.fail(f"format {d['format']!r} is not {FORMAT!r} (written by another version of the testbed?)")
    if d["kind"] == "blocks":
        return _blocks_from(d, r)
    if d["kind"] == "link":
        return _link_from(d, r)
    raise r.fail(f"kind {d['kind']!r} is neither 'blocks' nor 'link'")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists of scalars (one line per per-block column)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, dict | list) for x in data) or all(
        isinstance(x, list) and all(not isinstance(y, dict | list) for y in x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def save_profile(profile: BlockProfile | LinkMeasurement, path: str | Path) -> Path:
    """Write a profile as YAML (atomically; parent folders are created); returns the path."""
    path = Path(path)
    text = yaml.dump(profile_to_dict(profile), Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)
    # The file must load back into the same profile: check before anything is written.
    profile_from_dict(yaml.safe_load(text), str(path))
    try:
        _atomic_write_text(path, text)
    except OSError as exc:
        raise ProfileError(f"cannot write profile {path}: {exc}") from None
    return path


def load_profile(path: str | Path) -> BlockProfile | LinkMeasurement:
    """Read a profile file of either kind; every problem is a :class:`ProfileError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return profile_from_dict(data, str(path))


def load_block_profile(path: str | Path) -> BlockProfile:
    """Read a block profile (``kind: blocks``)."""
    profile = load_profile(path)
    if not isinstance(profile, BlockProfile):
        raise ProfileError(f"{path} is a link measurement, not a block profile")
    return profile


def load_link_measurement(path: str | Path) -> LinkMeasurement:
    """Read a link measurement (``kind: link``)."""
    profile = load_profile(path)
    if not isinstance(profile, LinkMeasurement):
        raise ProfileError(f"{path} is a block profile, not a link measurement")
    return profile
