"""The latency model of U-shaped split inference and training with a shared edge server (pure, no I/O).

A model is a sequence of ``L`` blocks; split points are the block boundaries ``0..L``. Device ``i`` runs the
partition ``(a, b)``: head ``blocks[0:a]`` and tail ``blocks[b:L]`` on the device, body ``blocks[a:b]`` on the
edge, which it shares with the other devices: device ``i`` gets the fraction ``f_i`` of the edge's compute
(``sum f_i <= 1``), so a body that takes ``S`` seconds on the whole edge takes ``S / f_i``.

Every delay is an affine function of ``1 / f_i``::

    T_i(a, b, f_i) = A_i(a, b) + S_i(a, b) / f_i

``A_i`` is the device compute, the transfers (bytes * 8 / rate), the one-way delays and two measured fixed costs
per request (the edge's request handling, the device runtime's call of the separate tail session); ``S_i`` is the
body work at full edge speed. Both are per round: ``batches_per_round`` batches, one after the other (no pipelining).
See docs/planner.md for the stage-by-stage formulas.

Units: seconds, bytes, bits per second. A device's ``speed`` divides the profiled device times (a device twice as
slow as the profiled one has ``speed=0.5``); the edge times are the profiled ones.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from testbed.errors import TestbedError

__all__ = [
    "EDGE_STAGES",
    "INFERENCE_STAGES",
    "MODES",
    "TRAINING_STAGES",
    "DevicePlan",
    "DeviceProfile",
    "Mode",
    "ModelProfile",
    "Plan",
    "PlanningError",
    "PlanningProblem",
    "body_time",
    "cost_tensor",
    "device_time",
    "edge_requests",
    "evaluate_plan",
    "plan_to_dict",
    "split_costs",
    "split_violations",
    "valid_splits",
]

Mode = Literal["inference", "training"]
MODES: tuple[str, ...] = ("inference", "training")

#: Stage names, in the order they happen. Inference uses the first seven, training all twelve. ``edge_request``
#: (the edge's fixed per-request handling and the body's wake-up) and ``tail_call`` (the device runtime's per-call
#: cost of the tail session) are measured fixed costs, 0 unless the profiles give them (docs/planner.md).
INFERENCE_STAGES: tuple[str, ...] = ("head_fwd", "uplink_act", "edge_request", "body_fwd", "downlink_act", "tail_call",
                                     "tail_fwd")
TRAINING_STAGES: tuple[str, ...] = (
    "head_fwd", "uplink_act", "edge_request", "body_fwd", "downlink_act", "tail_call", "tail_fwd",
    "tail_bwd", "uplink_grad", "body_bwd", "downlink_grad", "head_bwd",
)
EDGE_STAGES: tuple[str, ...] = ("body_fwd", "body_bwd")


class PlanningError(TestbedError):
    """A malformed planning input (profile lengths, negative times, bad constraints) or an infeasible problem."""


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _times(name: str, values: tuple[float, ...], length: int, owner: str) -> None:
    if len(values) != length:
        raise PlanningError(f"{owner}: {name} has {len(values)} entries, expected {length}")
    for k, v in enumerate(values):
        if not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise PlanningError(f"{owner}: {name}[{k}] = {v!r} is not a finite number >= 0")


def _fixed_cost(name: str, v: object, owner: str) -> None:
    if not (_is_number(v) and math.isfinite(v) and v >= 0):  # type: ignore[arg-type]
        raise PlanningError(f"{owner}: {name} = {v!r} must be a finite number >= 0")


def edge_requests(problem: PlanningProblem, a: int, b: int) -> int:
    """Requests a device sends the edge per batch with split ``(a, b)``: none device-only; one in inference;
    in training one more for the backward when a tail sends its gradient up (``b < L``)."""
    if a >= b:
        return 0
    return 2 if problem.mode == "training" and b < problem.model.n_blocks else 1


@dataclass(frozen=True)
class ModelProfile:
    """One model, profiled per batch (seconds, bytes).

    ``fwd_s``/``bwd_s`` are per-block times on the reference device runtime, ``edge_fwd_s``/``edge_bwd_s`` on the
    whole edge. ``act_bytes[p]`` is what crosses split point ``p`` (``p = 0..L``): ``act_bytes[0]`` is the input,
    ``act_bytes[p]`` the output of block ``p - 1``, ``act_bytes[L]`` the logits; a gradient has the size of its
    activation. ``param_bytes`` (per block) feeds the device memory constraint. ``bwd_s``/``edge_bwd_s`` may be
    all zeros for an inference-only profile. ``tail_call_s`` is the device runtime's fixed cost of one more session
    call, paid by the tail (a separate call after the reply; the head's call is inside ``fwd_s`` when the blocks
    are differences of head-prefix times), on the reference device like ``fwd_s``; 0 when not measured.
    ``body_call_s`` is the edge body's fixed wake-up cost per request (its first block after the edge idled,
    beyond that block's time inside a chain), on the edge; like the edge's request handling it is latency paid
    once per request, not divided by the share; 0 when not measured.
    """

    name: str
    fwd_s: tuple[float, ...]
    bwd_s: tuple[float, ...]
    edge_fwd_s: tuple[float, ...]
    edge_bwd_s: tuple[float, ...]
    act_bytes: tuple[int, ...]
    param_bytes: tuple[int, ...]
    tail_call_s: float = 0.0
    body_call_s: float = 0.0

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        for name in ("fwd_s", "bwd_s", "edge_fwd_s", "edge_bwd_s", "act_bytes", "param_bytes"):
            try:
                object.__setattr__(self, name, tuple(getattr(self, name)))  # lists and arrays welcome
            except TypeError:
                raise PlanningError(f"{owner}: {name} must be a sequence of numbers") from None
        n = len(self.fwd_s)
        if n < 2:
            raise PlanningError(f"{owner}: a U-shaped split needs at least 2 blocks, got {n}")
        for name in ("fwd_s", "bwd_s", "edge_fwd_s", "edge_bwd_s", "param_bytes"):
            _times(name, tuple(getattr(self, name)), n, owner)
        _times("act_bytes", tuple(self.act_bytes), n + 1, owner)
        for name in ("act_bytes", "param_bytes"):
            values = getattr(self, name)
            if any(v != int(v) for v in values):
                raise PlanningError(f"{owner}: {name} must be whole numbers of bytes")
            object.__setattr__(self, name, tuple(int(v) for v in values))
        for name in ("fwd_s", "bwd_s", "edge_fwd_s", "edge_bwd_s"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("tail_call_s", "body_call_s"):
            _fixed_cost(name, getattr(self, name), owner)
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def n_blocks(self) -> int:
        return len(self.fwd_s)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One device and its link to the edge. ``delay_s`` is one way; each crossing pays it once.

    ``edge_request_s`` is the edge's fixed handling of one request from this device, beyond a plain echo of the
    same bytes (hand-off from the I/O thread to the compute thread, copy of the activations, wake-up, reply),
    as measured over this device's path; 0 when not measured. It is latency, not edge work: no share divides it.
    ``uplink_burst_bytes``/``downlink_burst_bytes``: what a message passes of the link's token bucket at no cost
    (a shaped link's burst; a message of ``n`` bytes takes ``max(0, n - burst) * 8 / rate``); 0 when not measured.
    Every message is taken to find the bucket full: they are further apart than ``burst / rate``.
    """

    name: str
    speed: float = 1.0
    uplink_bps: float
    downlink_bps: float
    delay_s: float = 0.0
    memory_bytes: int | None = None
    edge_request_s: float = 0.0
    uplink_burst_bytes: int = 0
    downlink_burst_bytes: int = 0

    def __post_init__(self) -> None:
        owner = f"device {self.name!r}"
        for name in ("uplink_burst_bytes", "downlink_burst_bytes"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0):
                raise PlanningError(f"{owner}: {name} = {v!r} must be an integer >= 0")
            object.__setattr__(self, name, int(v))
        for name in ("speed", "uplink_bps", "downlink_bps"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise PlanningError(f"{owner}: {name} = {v!r} must be a finite number > 0")
        if not (_is_number(self.delay_s) and math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise PlanningError(f"{owner}: delay_s = {self.delay_s!r} must be a finite number >= 0")
        _fixed_cost("edge_request_s", self.edge_request_s, owner)
        object.__setattr__(self, "edge_request_s", float(self.edge_request_s))
        if self.memory_bytes is not None and not (
            isinstance(self.memory_bytes, numbers.Integral) and not isinstance(self.memory_bytes, bool)
            and self.memory_bytes >= 0
        ):
            raise PlanningError(f"{owner}: memory_bytes = {self.memory_bytes!r} must be an integer >= 0 or None")


@dataclass(frozen=True)
class PlanningProblem:
    """What the planner solves: one model, N devices sharing one edge, the split constraints and the mode."""

    model: ModelProfile
    devices: tuple[DeviceProfile, ...]
    min_head: int = 1
    min_tail: int = 1
    mode: Mode = "inference"
    batches_per_round: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        L = self.model.n_blocks
        if not self.devices:
            raise PlanningError("a planning problem needs at least one device")
        names = [d.name for d in self.devices]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanningError(f"device names must be unique; repeated: {', '.join(dup)}")
        if self.mode not in MODES:
            raise PlanningError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (isinstance(self.min_head, int) and isinstance(self.min_tail, int)):
            raise PlanningError("min_head and min_tail must be integers")
        if self.min_head < 1 or self.min_tail < 1:
            raise PlanningError(f"min_head and min_tail must be >= 1 (U-shape: input and labels stay on the device), "
                                f"got {self.min_head} and {self.min_tail}")
        if self.min_head + self.min_tail > L:
            raise PlanningError(f"min_head + min_tail = {self.min_head + self.min_tail} exceeds the {L} blocks "
                                f"of model {self.model.name!r}")
        if not (isinstance(self.batches_per_round, int) and self.batches_per_round >= 1):
            raise PlanningError(f"batches_per_round must be an integer >= 1, got {self.batches_per_round!r}")

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def stages(self) -> tuple[str, ...]:
        return TRAINING_STAGES if self.mode == "training" else INFERENCE_STAGES


@dataclass(frozen=True)
class DevicePlan:
    """One device's split, edge share and predicted per-round stage times (seconds)."""

    device: str
    a: int
    b: int
    share: float
    stages: dict[str, float] = field(hash=False)
    total_s: float

    @property
    def uses_edge(self) -> bool:
        return self.a < self.b


@dataclass(frozen=True)
class Plan:
    """A split and a share per device; ``round_s`` is the largest device delay (inf: infeasible)."""

    method: str
    devices: tuple[DevicePlan, ...]
    round_s: float
    note: str = ""

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.round_s)

    @property
    def total_share(self) -> float:
        return math.fsum(d.share for d in self.devices)


def _check_index(problem: PlanningProblem, i: int) -> DeviceProfile:
    if not 0 <= i < problem.n_devices:
        raise PlanningError(f"device index {i} out of range 0..{problem.n_devices - 1}")
    return problem.devices[i]


def body_time(work_s: float, share: float) -> float:
    """``work / share`` with the conventions: no work takes no time (whatever the share), no share takes forever."""
    if work_s == 0:
        return 0.0
    if share <= 0:
        return math.inf
    return work_s / share


def device_time(problem: PlanningProblem, i: int, a: int, b: int, share: float) -> tuple[float, dict[str, float]]:
    """Round time of device ``i`` with split ``(a, b)`` and edge share ``share``, and the per-stage times.

    Any ``0 <= a <= b <= L`` is evaluated (``(0, L)`` is the edge-only reference); whether the split is allowed
    is :func:`split_violations`'s business. ``a == b`` is device-only: no transfer, no edge, share irrelevant.
    A gradient goes down at ``a`` only if there is a head (``a > 0``) and up at ``b`` only if there is a tail
    (``b < L``; otherwise the loss is computed on the edge and the label bytes are neglected).
    """
    dev = _check_index(problem, i)
    m = problem.model
    L = m.n_blocks
    if not (isinstance(a, int | np.integer) and isinstance(b, int | np.integer) and 0 <= a <= b <= L):
        raise PlanningError(f"split ({a}, {b}) is outside 0 <= a <= b <= {L}")
    if not (isinstance(share, int | float) and share >= 0 and not math.isnan(share)):
        raise PlanningError(f"share must be a number >= 0, got {share!r}")
    training = problem.mode == "training"
    k = problem.batches_per_round
    edge = a < b

    def up(p: int) -> float:  # one message of act_bytes[p] up, its delay included
        return max(0, m.act_bytes[p] - dev.uplink_burst_bytes) * 8.0 / dev.uplink_bps + dev.delay_s

    def down(p: int) -> float:
        return max(0, m.act_bytes[p] - dev.downlink_burst_bytes) * 8.0 / dev.downlink_bps + dev.delay_s

    st: dict[str, float] = {}
    st["head_fwd"] = math.fsum(m.fwd_s[:a]) / dev.speed
    st["uplink_act"] = up(a) if edge else 0.0
    st["edge_request"] = edge_requests(problem, a, b) * (dev.edge_request_s + m.body_call_s)
    st["body_fwd"] = body_time(math.fsum(m.edge_fwd_s[a:b]), share) if edge else 0.0
    st["downlink_act"] = down(b) if edge else 0.0
    st["tail_call"] = m.tail_call_s / dev.speed if b < L else 0.0
    st["tail_fwd"] = math.fsum(m.fwd_s[b:]) / dev.speed
    if training:
        st["tail_bwd"] = math.fsum(m.bwd_s[b:]) / dev.speed
        st["uplink_grad"] = up(b) if edge and b < L else 0.0
        st["body_bwd"] = body_time(math.fsum(m.edge_bwd_s[a:b]), share) if edge else 0.0
        st["downlink_grad"] = down(a) if edge and a > 0 else 0.0
        st["head_bwd"] = math.fsum(m.bwd_s[:a]) / dev.speed
    st = {name: v * k for name, v in st.items()}
    return math.fsum(st.values()), st


def split_violations(problem: PlanningProblem, i: int, a: int, b: int) -> list[str]:
    """Why split ``(a, b)`` is not allowed for device ``i`` (empty: allowed)."""
    dev = _check_index(problem, i)
    L = problem.model.n_blocks
    out: list[str] = []
    if not 0 <= a <= b <= L:
        return [f"({a}, {b}) is outside 0 <= a <= b <= {L}"]
    if a < problem.min_head:
        out.append(f"head depth {a} < min_head {problem.min_head}")
    if L - b < problem.min_tail:
        out.append(f"tail depth {L - b} < min_tail {problem.min_tail}")
    if dev.memory_bytes is not None:
        need = sum(problem.model.param_bytes[:a]) + sum(problem.model.param_bytes[b:])
        if need > dev.memory_bytes:
            out.append(f"head + tail parameters {need} B exceed the device memory {dev.memory_bytes} B")
    return out


def valid_splits(problem: PlanningProblem, i: int) -> list[tuple[int, int]]:
    """Every allowed ``(a, b)`` of device ``i``, in lexicographic order."""
    L = problem.model.n_blocks
    return [(a, b) for a in range(L + 1) for b in range(a, L + 1) if not split_violations(problem, i, a, b)]


def _candidate_splits(problem: PlanningProblem) -> np.ndarray:
    """All ``(a, b)`` with ``min_head <= a <= b <= L - min_tail`` (memory not yet applied), shape (P, 2)."""
    L = problem.model.n_blocks
    hi = L - problem.min_tail
    return np.array([(a, b) for a in range(problem.min_head, hi + 1) for b in range(a, hi + 1)], dtype=np.int64)


def cost_tensor(problem: PlanningProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A`` and ``S`` of every device and candidate split, vectorised: ``(splits (P, 2), A (N, P), S (N, P))``.

    ``T[i, p] = A[i, p] + S[i, p] / f_i``; a split that breaks device ``i``'s memory constraint has
    ``A[i, p] = inf``. Candidates are the splits allowed by ``min_head``/``min_tail``.
    """
    m = problem.model
    L = m.n_blocks
    devs = problem.devices
    splits = _candidate_splits(problem)
    a, b = splits[:, 0], splits[:, 1]
    zero = np.zeros(1)
    fwd = np.concatenate([zero, np.cumsum(np.asarray(m.fwd_s, dtype=float))])
    efwd = np.concatenate([zero, np.cumsum(np.asarray(m.edge_fwd_s, dtype=float))])
    act = np.asarray(m.act_bytes, dtype=float)
    speed = np.array([d.speed for d in devs])[:, None]
    up = (8.0 / np.array([d.uplink_bps for d in devs]))[:, None]
    down = (8.0 / np.array([d.downlink_bps for d in devs]))[:, None]
    up_burst = np.array([d.uplink_burst_bytes for d in devs], dtype=float)[:, None]
    down_burst = np.array([d.downlink_burst_bytes for d in devs], dtype=float)[:, None]
    delay = np.array([d.delay_s for d in devs])[:, None]
    edge = (a < b)[None, :]
    dev_work = fwd[a] + (fwd[L] - fwd[b])
    body = efwd[b] - efwd[a]

    def sent(p: np.ndarray, burst: np.ndarray) -> np.ndarray:  # bytes past each device's token bucket, (N, P)
        return np.maximum(act[p][None, :] - burst, 0.0)

    xfer = sent(a, up_burst) * up + sent(b, down_burst) * down + 2 * delay
    if problem.mode == "training":
        bwd = np.concatenate([zero, np.cumsum(np.asarray(m.bwd_s, dtype=float))])
        ebwd = np.concatenate([zero, np.cumsum(np.asarray(m.edge_bwd_s, dtype=float))])
        dev_work = dev_work + bwd[a] + (bwd[L] - bwd[b])
        body = body + (ebwd[b] - ebwd[a])
        # 1 <= a and b <= L - 1 for every candidate, so both gradients always cross.
        xfer = xfer + sent(b, up_burst) * up + sent(a, down_burst) * down + 2 * delay
    k = problem.batches_per_round
    # Fixed costs: every candidate has a tail (b <= L - min_tail), so it pays the tail's call; an edge user pays
    # the edge's request handling once per request (edge_requests: 1, or 2 in training, where b < L always).
    dev_work = dev_work + m.tail_call_s
    requests = 2.0 if problem.mode == "training" else 1.0
    xfer = xfer + requests * (np.array([d.edge_request_s for d in devs])[:, None] + m.body_call_s)
    A = k * (dev_work[None, :] / speed + np.where(edge, xfer, 0.0))
    S = np.broadcast_to(k * np.where(a < b, body, 0.0)[None, :], A.shape).copy()
    mem = np.array([np.inf if d.memory_bytes is None else d.memory_bytes for d in devs])[:, None]
    if np.isfinite(mem).any():
        pb = np.concatenate([zero, np.cumsum(np.asarray(m.param_bytes, dtype=float))])
        need = (pb[a] + (pb[L] - pb[b]))[None, :]
        A[need > mem] = np.inf
    return splits, A, S


def split_costs(problem: PlanningProblem, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``A[a, b]`` and ``S[a, b]`` of device ``i`` as ``(L+1, L+1)`` matrices, so ``T = A + S / f``.

    Entries of splits that are not allowed (``a > b``, depth or memory constraints) are ``inf`` in ``A`` and
    ``0`` in ``S``.
    """
    _check_index(problem, i)
    L = problem.model.n_blocks
    sub = PlanningProblem(problem.model, (problem.devices[i],), problem.min_head, problem.min_tail,
                          problem.mode, problem.batches_per_round)
    splits, A1, S1 = cost_tensor(sub)
    A = np.full((L + 1, L + 1), np.inf)
    S = np.zeros((L + 1, L + 1))
    A[splits[:, 0], splits[:, 1]] = A1[0]
    S[splits[:, 0], splits[:, 1]] = S1[0]
    return A, S


def evaluate_plan(problem: PlanningProblem, method: str, splits: list[tuple[int, int]] | np.ndarray,
                  shares: list[float] | np.ndarray, *, note: str = "", check: bool = True) -> Plan:
    """Build a :class:`Plan` from a split and a share per device, timing each with :func:`device_time`.

    A device-only split gets share 0. With ``check``, a device whose split breaks a constraint gets
    ``total_s = inf`` (so the plan is infeasible) and the reason goes into the note.
    """
    devices = []
    notes = [note] if note else []
    for i, ((a, b), f) in enumerate(zip(splits, shares, strict=True)):
        a, b, f = int(a), int(b), float(f) if a < b else 0.0
        total, stages = device_time(problem, i, a, b, f)
        if check and (why := split_violations(problem, i, a, b)):
            total = math.inf
            notes.append(f"{problem.devices[i].name}: {'; '.join(why)}")
        devices.append(DevicePlan(problem.devices[i].name, a, b, f, stages, total))
    round_s = max(d.total_s for d in devices)
    return Plan(method, tuple(devices), round_s, "; ".join(notes))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A JSON-ready view of a plan (infinite times become ``None``)."""
    return {
        "method": plan.method,
        "round_s": _finite_or_none(plan.round_s),
        "total_share": plan.total_share,
        "note": plan.note,
        "devices": [
            {"device": d.device, "a": d.a, "b": d.b, "share": d.share, "total_s": _finite_or_none(d.total_s),
             "stages": {k: _finite_or_none(v) for k, v in d.stages.items()}}
            for d in plan.devices
        ],
    }
