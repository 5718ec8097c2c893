"""Adaptive re-splitting, the pure core: when does a fresh plan replace the one deployed, and what changes.

The controller rebuilds the planning problem with the live estimates in place of the profiled links and speeds
(:func:`problem_with_estimates`) and asks a :class:`Replanner` for a :class:`Decision`. The current plan's splits
and shares are timed on the new problem and compared with a fresh LSCRA plan's round time. A change is worth a
redeployment only if it is clearly better, for a while, and not too soon after the last one (hysteresis:
without it two devices whose links hover around a threshold make the splits flap). Membership changes (a device
down or back) and an infeasible current plan re-plan at once.

The fresh plan keeps a device's current split whenever that costs nothing (the round time stays within
``keep_slack`` of the fresh optimum): the min-max objective is indifferent to the splits of devices that do not
set the round time, and moving them would redeploy partitions for nothing. See docs/resplitting.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from testbed.controller.estimates import ComputeEstimate, LinkEstimate
from testbed.errors import TestbedError
from testbed.planning.baselines import device_only, fixed_middle, neurosurgeon
from testbed.planning.lscra import equalize_shares, needed_shares, plan_lscra
from testbed.planning.model import Plan, PlanningError, PlanningProblem, cost_tensor, evaluate_plan

__all__ = ["BASELINE_PLANNERS", "Decision", "ReplanError", "ReplanPolicy", "Replanner", "plan_fresh",
           "problem_with_estimates", "rename_devices"]

Split = tuple[int, int]

#: Baselines a run may plan with instead of LSCRA, to measure the planner against them (``planner.algorithm``).
#: Neurosurgeon: each device's best split with the whole edge, then equal shares among the edge's users.
BASELINE_PLANNERS: dict[str, Callable[[PlanningProblem], Plan]] = {
    "fixed-middle": fixed_middle,
    "neurosurgeon": lambda problem: neurosurgeon(problem, "equal"),
    "device-only": device_only,
}
_REL_TOL = 1e-9


class ReplanError(TestbedError):
    """A bad re-planning policy or input."""


def _number(name: str, value: object, low: float, *, strict: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ReplanError(f"{name} = {value!r} must be a finite number {'>' if strict else '>='} {low}")
    return float(value)


@dataclass(frozen=True)
class ReplanPolicy:
    """Hysteresis: re-plan when ``current > fresh * (1 + margin)`` for ``consecutive`` evaluations in a row and
    ``min_interval_s`` after the last change. ``common``: one split for all (None: by the problem's mode)."""

    margin: float = 0.1
    consecutive: int = 3
    min_interval_s: float = 10.0
    common: bool | None = None
    keep_slack: float = 0.02  # keep a device's split if the round time stays within this (relative) of the optimum

    def __post_init__(self) -> None:
        _number("margin", self.margin, 0.0)
        _number("min_interval_s", self.min_interval_s, 0.0)
        _number("keep_slack", self.keep_slack, 0.0)
        if isinstance(self.consecutive, bool) or not isinstance(self.consecutive, int) or self.consecutive < 1:
            raise ReplanError(f"consecutive = {self.consecutive!r} must be an integer >= 1")
        if self.common not in (None, True, False):
            raise ReplanError(f"common = {self.common!r} must be true, false or null")


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation. ``plan`` is the plan in force afterwards (the fresh one if ``replan``)."""

    replan: bool
    reason: str
    current_round_s: float  # the current plan's splits and shares on the new problem (inf: none or infeasible)
    fresh_round_s: float
    plan: Plan
    fresh: Plan
    changed: tuple[str, ...]  # devices whose split changes (empty when only the shares move)
    streak: int  # consecutive evaluations with current > fresh * (1 + margin)


# ---------------------------------------------------------------------------------------------
# The problem with live estimates


def problem_with_estimates(
    problem: PlanningProblem,
    estimates: Mapping[str, LinkEstimate],
    speeds: Mapping[str, ComputeEstimate | float],
    *,
    edge_speed: ComputeEstimate | float | None = None,
    devices: Sequence[str] | None = None,
    max_age_s: float | None = None,
) -> PlanningProblem:
    """``problem`` with every measured quantity replaced by its live estimate.

    Per device (by name): ``uplink_bps``, ``downlink_bps``, ``delay_s`` from ``estimates``, ``speed`` from
    ``speeds``; ``edge_speed`` divides the edge's block times. Missing, unmeasured (``None``) or stale
    (``age_s > max_age_s``) values keep the profiled ones. ``devices``: keep only these, in this order (the
    devices that are up); unknown names are an error.
    """
    if max_age_s is not None:
        max_age_s = _number("max_age_s", max_age_s, 0.0)

    def fresh(est: LinkEstimate | ComputeEstimate) -> bool:
        return max_age_s is None or est.age_s is None or est.age_s <= max_age_s

    by_name = {d.name: d for d in problem.devices}
    names = list(by_name) if devices is None else list(devices)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ReplanError(f"unknown device(s) {', '.join(map(str, unknown))}; the problem has "
                          f"{', '.join(by_name)}")
    if not names:
        raise ReplanError("no device left to plan for")
    out = []
    for name in names:
        dev = by_name[name]
        changes: dict[str, float] = {}
        est = estimates.get(name)
        if est is not None and fresh(est):
            for key in ("uplink_bps", "downlink_bps", "delay_s"):
                value = getattr(est, key)
                if value is not None:
                    changes[key] = value
        sp = speeds.get(name)
        if isinstance(sp, ComputeEstimate):
            if sp.speed is not None and fresh(sp):
                changes["speed"] = sp.speed
        elif sp is not None:
            changes["speed"] = _number(f"speed of {name}", sp, 0.0, strict=True)
        try:
            out.append(dataclasses.replace(dev, **changes))
        except PlanningError as exc:
            raise ReplanError(f"estimate for {name} is unusable: {exc}") from None
    model = problem.model
    scale: float | None = None
    if isinstance(edge_speed, ComputeEstimate):
        if edge_speed.speed is not None and fresh(edge_speed):
            scale = edge_speed.speed
    elif edge_speed is not None:
        scale = edge_speed
    if scale is not None:
        scale = _number("edge speed", scale, 0.0, strict=True)
        model = dataclasses.replace(model, edge_fwd_s=tuple(t / scale for t in model.edge_fwd_s),
                                    edge_bwd_s=tuple(t / scale for t in model.edge_bwd_s))
    return dataclasses.replace(problem, model=model, devices=tuple(out))


def rename_devices(problem: PlanningProblem, names: Sequence[str]) -> PlanningProblem:
    """The same problem with the devices named ``names`` (the experiment's device ids, in order).

    :func:`testbed.profiling.problem.build_problem` names devices after their class and link; build it with one
    link and one class per device (device ``i`` takes ``links[i]``, ``classes[i]``) and rename.
    """
    if len(names) != problem.n_devices:
        raise ReplanError(f"{len(names)} names for {problem.n_devices} devices")
    try:
        return dataclasses.replace(problem, devices=tuple(
            dataclasses.replace(d, name=n) for d, n in zip(problem.devices, names, strict=True)))
    except PlanningError as exc:
        raise ReplanError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Planning with fixed and preferred splits


def _fixed_mask(problem: PlanningProblem, splits: np.ndarray, fixed: Mapping[str, Split]) -> np.ndarray:
    """Boolean (N, P): which candidate splits each device may take."""
    allowed = np.ones((problem.n_devices, len(splits)), dtype=bool)
    index = {tuple(int(x) for x in s): p for p, s in enumerate(splits)}
    for i, dev in enumerate(problem.devices):
        if dev.name in fixed:
            a, b = fixed[dev.name]
            if (a, b) not in index:
                raise ReplanError(f"fixed split ({a}, {b}) of {dev.name} is not allowed by min_head/min_tail")
            allowed[i] = False
            allowed[i, index[(a, b)]] = True
    return allowed


def _bisect(feasible, lo: float, hi: float) -> float:
    """Least feasible T in [lo, hi] (hi feasible), to full precision; bounded loop."""
    if feasible(lo):
        return lo
    for _ in range(2100):
        mid = lo + 0.5 * (hi - lo)
        if not lo < mid < hi:
            break
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


def plan_fresh(problem: PlanningProblem, *, common: bool | None = None,
               fixed: Mapping[str, Split] | None = None) -> Plan:
    """The best plan, honouring ``fixed`` splits (device name -> (a, b)); LSCRA itself when nothing is fixed.

    Per-device splits: bisection on the round time with each free device taking its least-share split and each
    fixed device its own. Common split: every fixed split must be the same, and it is then the common one.
    """
    fixed = {k: v for k, v in (fixed or {}).items() if k in {d.name for d in problem.devices}}
    if common is None:
        common = problem.mode == "training"
    if not fixed:
        return plan_lscra(problem, common=common)
    if common:
        if len(set(fixed.values())) > 1:
            raise ReplanError(f"a common split cannot honour different fixed splits {sorted(set(fixed.values()))}")
        return _with_splits(problem, "lscra-common-fixed", [next(iter(fixed.values()))] * problem.n_devices)
    splits, A, S = cost_tensor(problem)
    A = np.where(_fixed_mask(problem, splits, fixed), A, np.inf)
    if not np.isfinite(A).any(axis=1).all():
        bad = [problem.devices[i].name for i in np.flatnonzero(~np.isfinite(A).any(axis=1))]
        raise ReplanError(f"no allowed split for {', '.join(bad)} (memory or fixed split)")
    n = problem.n_devices

    def total(t: float) -> float:
        return float(needed_shares(t, A, S).min(axis=1).sum())

    lo = float(np.nanmin(A, axis=1).max())
    hi = float(np.min(A + n * S, axis=1).max()) * (1 + 4 * _REL_TOL)
    T = _bisect(lambda t: total(t) <= 1.0, lo, hi)
    need = needed_shares(T, A, S)
    best = need.min(axis=1, keepdims=True)
    chosen = np.argmin(np.where(need == best, A, np.inf), axis=1)
    return _with_splits(problem, "lscra-fixed", [tuple(int(x) for x in splits[c]) for c in chosen])


def _costs(problem: PlanningProblem, chosen: Sequence[Split]) -> tuple[np.ndarray, np.ndarray]:
    splits, A, S = cost_tensor(problem)
    index = {tuple(int(x) for x in s): p for p, s in enumerate(splits)}
    cols = [index.get(tuple(s), -1) for s in chosen]
    rows = np.arange(problem.n_devices)
    Ac = np.where(np.array(cols) >= 0, A[rows, cols], np.inf)
    Sc = np.where(np.array(cols) >= 0, S[rows, cols], 0.0)
    return Ac, Sc


def _with_splits(problem: PlanningProblem, method: str, chosen: Sequence[Split]) -> Plan:
    """Evaluate fixed splits with the shares that equalise them (leftover share handed out)."""
    A, S = _costs(problem, chosen)
    if not np.isfinite(A).all():
        return evaluate_plan(problem, method, list(chosen), [0.0] * len(chosen))
    _, f = equalize_shares(A, S)
    s = math.fsum(f)
    if 0 < s < 1:
        f = f / s
        while math.fsum(f) > 1.0:
            f = f * (1 - 2.0**-50)
    return evaluate_plan(problem, method, list(chosen), f)


def _keep_current(problem: PlanningProblem, fresh: Plan, current: Mapping[str, Split], common: bool,
                  slack: float) -> Plan:
    """Revert devices to their current split where the round time stays within ``slack`` of ``fresh``."""
    target = fresh.round_s * (1 + slack + _REL_TOL)
    chosen = [(d.a, d.b) for d in fresh.devices]
    names = [d.name for d in problem.devices]
    if common:
        olds = {current[n] for n in names if n in current}
        if len(olds) == 1 and all(n in current for n in names) and chosen[0] not in olds:
            kept = _with_splits(problem, fresh.method, [next(iter(olds))] * len(names))
            if kept.round_s <= target:
                return kept
        return fresh
    A_new, S_new = _costs(problem, chosen)
    old = [current.get(n, c) for n, c in zip(names, chosen, strict=True)]
    A_old, S_old = _costs(problem, old)
    need_new = needed_shares(target, A_new, S_new)
    need_old = needed_shares(target, A_old, S_old)
    extra = need_old - need_new
    movers = [i for i in range(len(names)) if old[i] != chosen[i]]
    budget = 1.0 - float(need_new.sum())
    for i in sorted(movers, key=lambda i: extra[i]):
        if math.isfinite(extra[i]) and extra[i] <= budget:
            chosen[i] = old[i]
            budget -= max(float(extra[i]), 0.0)
    if chosen == [(d.a, d.b) for d in fresh.devices]:
        return fresh
    kept = _with_splits(problem, fresh.method, chosen)
    return kept if kept.round_s <= target else fresh


# ---------------------------------------------------------------------------------------------
# The decision


class Replanner:
    """Holds the plan in force and the hysteresis state; :meth:`evaluate` is called with each new problem.

    ``fixed``: device name -> split that no plan may move (the experiment pins it). ``algorithm``: ``lscra``, or a
    baseline of :data:`BASELINE_PLANNERS` that then makes every fresh plan (no pinned splits, no keep-slack: a
    baseline's plan is what it is), so a run can measure the planner against it.
    """

    def __init__(self, policy: ReplanPolicy | None = None, plan: Plan | None = None, *,
                 fixed: Mapping[str, Split] | None = None, now: float | None = None,
                 algorithm: str = "lscra") -> None:
        if algorithm != "lscra" and algorithm not in BASELINE_PLANNERS:
            raise ReplanError(f"unknown algorithm {algorithm!r}: lscra or one of {', '.join(BASELINE_PLANNERS)}")
        if algorithm != "lscra" and fixed:
            raise ReplanError(f"the {algorithm} baseline cannot honour pinned splits")
        self.algorithm = algorithm
        self.policy = policy or ReplanPolicy()
        self.fixed = dict(fixed or {})
        self._plan = plan
        self._last_change = now if plan is not None else None
        self._streak = 0

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def streak(self) -> int:
        return self._streak

    def adopt(self, plan: Plan, now: float) -> None:
        """Put a plan in force from outside (e.g. the experiment's initial one)."""
        self._plan, self._last_change, self._streak = plan, now, 0

    def evaluate(self, problem: PlanningProblem, now: float) -> Decision:
        """Compare the plan in force with a fresh one on ``problem`` (whose devices are the ones up now)."""
        now = _number("now", now, -math.inf)
        pol = self.policy
        common = pol.common if pol.common is not None else problem.mode == "training"
        baseline = BASELINE_PLANNERS.get(self.algorithm)
        fresh = baseline(problem) if baseline else plan_fresh(problem, common=common, fixed=self.fixed)
        names = [d.name for d in problem.devices]
        cur = self._plan
        current_splits = {d.device: (d.a, d.b) for d in cur.devices} if cur else {}
        if cur is not None and current_splits and baseline is None:
            fresh = _keep_current(problem, fresh, current_splits, common, pol.keep_slack)
        if cur is None:
            return self._change(fresh, fresh, math.inf, now, "initial plan")
        old_names = [d.device for d in cur.devices]
        gone = [n for n in old_names if n not in names]
        new = [n for n in names if n not in old_names]
        if gone or new:
            why = "; ".join(x for x in (gone and f"down: {', '.join(gone)}", new and f"up: {', '.join(new)}") if x)
            return self._change(fresh, fresh, math.inf, now, f"membership changed ({why})")
        shares = {d.device: d.share for d in cur.devices}
        current = evaluate_plan(problem, cur.method, [current_splits[n] for n in names], [shares[n] for n in names])
        if not current.feasible and fresh.feasible:
            return self._change(fresh, fresh, current.round_s, now, "current plan infeasible")
        worse = current.round_s > fresh.round_s * (1 + pol.margin)
        self._streak = self._streak + 1 if worse else 0
        since = math.inf if self._last_change is None else now - self._last_change
        ratio = current.round_s / fresh.round_s if fresh.round_s > 0 else math.inf
        if not worse:
            reason = f"current within margin ({ratio:.3f}x of fresh, margin {pol.margin:g})"
        elif self._streak < pol.consecutive:
            reason = f"worse by {ratio:.3f}x, {self._streak}/{pol.consecutive} in a row"
        elif since < pol.min_interval_s:
            reason = f"worse by {ratio:.3f}x but only {since:.3g} s since the last change (< {pol.min_interval_s:g})"
        else:
            return self._change(fresh, fresh, current.round_s, now,
                                f"current {ratio:.3f}x the fresh plan for {self._streak} evaluations")
        return Decision(False, reason, current.round_s, fresh.round_s, cur, fresh, (), self._streak)

    def _change(self, plan: Plan, fresh: Plan, current_round_s: float, now: float, reason: str) -> Decision:
        before = {d.device: (d.a, d.b) for d in self._plan.devices} if self._plan else {}
        changed = tuple(d.device for d in plan.devices if before.get(d.device) != (d.a, d.b))
        streak = self._streak
        self.adopt(plan, now)
        return Decision(True, reason, current_round_s, fresh.round_s, plan, fresh, changed, streak)
