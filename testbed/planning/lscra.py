"""LSCRA (reconstructed): choose split points and edge shares that minimise the largest device delay.

With ``T_i = A_i(a_i, b_i) + S_i(a_i, b_i) / f_i`` (see :mod:`testbed.planning.model`) and ``sum f_i <= 1``:

* :func:`equalize_shares` — fixed splits. The share device ``i`` needs to finish within ``T`` is
  ``S_i / (T - A_i)``; it decreases in ``T``, so the least feasible ``T`` solves ``sum_i S_i / (T - A_i) = 1``
  (bisection), and every device that does edge work finishes at exactly that ``T``.
* :func:`plan_common_split` — one ``(a, b)`` for every device (training with one shared body): the above for each
  candidate split, vectorised over candidates, after discarding candidates whose lower bound exceeds another's
  upper bound.
* :func:`plan_per_device` — a split per device (inference with a shared body): bisection on ``T``; at a given ``T``
  each device independently takes the split that needs the least share, and ``T`` is feasible iff those least
  shares sum to at most 1. This is the exact optimum (bisection to full float precision). Only each device's Pareto
  front of ``(A, S)`` pairs can ever need the least share, so the bisection runs on those fronts.

Leftover capacity (shares summing to less than 1, e.g. when a device-only device sets the round time) is handed to
the edge users in proportion to their shares when ``fill_leftover`` is true (default): it never raises a delay.
"""

from __future__ import annotations

import math

import numpy as np

from testbed.planning.model import Plan, PlanningError, PlanningProblem, cost_tensor, evaluate_plan

__all__ = [
    "equalize_shares",
    "needed_shares",
    "plan_common_split",
    "plan_lscra",
    "plan_per_device",
]

#: Relative slack added to analytic upper bounds against rounding.
REL_TOL = 1e-12
_MAX_ITER = 2100  # bisection between two doubles ends after at most ~2100 halvings (usually ~60)


def needed_shares(T: np.ndarray | float, A: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Least share that lets a device with costs ``A``, ``S`` finish within ``T`` (broadcasting).

    ``S / (T - A)`` when ``T > A``; ``0`` when there is no edge work and ``T >= A``; ``inf`` otherwise.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        slack = T - A
        need = np.where(slack > 0, S / np.where(slack > 0, slack, 1.0), np.inf)
    return np.where(S == 0, np.where(slack >= 0, 0.0, np.inf), need)


def _bisect(total_need, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Least ``T`` in ``[lo, hi]`` with ``total_need(T) <= 1``, elementwise; ``hi`` must be feasible."""
    lo = lo.astype(float).copy()
    hi = hi.astype(float).copy()
    for _ in range(64):  # rounding can leave an analytic upper bound a hair infeasible
        bad = ~(total_need(hi) <= 1.0)
        if not bad.any():
            break
        hi[bad] = hi[bad] * (1 + 1e-9) + 1e-300
    done = total_need(lo) <= 1.0
    hi[done] = lo[done]
    for _ in range(_MAX_ITER):
        # To full float precision: S / (T - A) magnifies any error in T when T - A is small.
        mid = lo + 0.5 * (hi - lo)
        open_ = (mid > lo) & (mid < hi)
        if not open_.any():
            break
        ok = total_need(mid) <= 1.0
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid, lo)
    return hi


def _upper_bound(A: np.ndarray, S: np.ndarray, axis: int = 0) -> np.ndarray:
    """A feasible round time: ``max A + sum S`` (shares ``S_i / sum S``), nudged up against rounding."""
    ub = A.max(axis=axis) + S.sum(axis=axis)
    return ub * (1 + 4 * REL_TOL) + 1e-300


def equalize_shares(A: np.ndarray, S: np.ndarray) -> tuple[float, np.ndarray]:
    """Optimal round time and shares for fixed splits: ``min max_i A_i + S_i / f_i`` s.t. ``sum f <= 1``.

    Returns ``(T, f)`` with ``f_i = S_i / (T - A_i)`` (0 for devices without edge work) and ``sum f <= 1``.
    """
    A = np.asarray(A, dtype=float)
    S = np.asarray(S, dtype=float)
    if not np.isfinite(A).all():
        raise PlanningError("equalize_shares: every device needs a finite A")
    lo = max(A.max(), A.min() + S.sum())
    if needed_shares(lo, A, S).sum() <= 1.0:  # not binding: the slowest device sets the round, not the edge
        return lo, needed_shares(lo, A, S)
    T = float(_bisect(lambda t: needed_shares(t[:, None], A[None, :], S[None, :]).sum(axis=1),
                      np.array([lo]), _upper_bound(A[:, None], S[:, None]))[0])
    # Binding: the shares sum to 1. Normalising removes the bisection's error, which S / (T - A) magnifies when
    # T - A is small, and moves every edge user's delay by less than that error.
    f = needed_shares(T, A, S)
    return T, _cap(f / math.fsum(f))


def _cap(f: np.ndarray) -> np.ndarray:
    """Make sure ``sum f <= 1`` despite rounding."""
    s = math.fsum(f)
    if s > 1.0:
        f = f / s
        while math.fsum(f) > 1.0:
            f = f * (1 - 2.0**-50)
    return f


def _fill(f: np.ndarray) -> np.ndarray:
    """Hand the unused share to the devices that have one, in proportion to their shares."""
    s = math.fsum(f)
    if 0 < s < 1:
        f = _cap(f / s)
    return f


def _infeasible_devices(problem: PlanningProblem, A: np.ndarray) -> list[str]:
    return [problem.devices[i].name for i in np.flatnonzero(~np.isfinite(A).any(axis=1))]


def plan_common_split(problem: PlanningProblem, *, fill_leftover: bool = True) -> Plan:
    """Best single ``(a, b)`` for all devices, with the shares that equalise their delays."""
    splits, A, S = cost_tensor(problem)
    ok = np.isfinite(A).all(axis=0)
    if not ok.any():
        raise PlanningError("no split fits every device's memory with the min_head/min_tail constraints; "
                            f"devices without any allowed split: {', '.join(_infeasible_devices(problem, A)) or '-'}")
    splits, A, S = splits[ok], A[:, ok], S[:, ok]
    # T(p) lies in [max(max A, min A + sum S), max A + sum S]; skip candidates that cannot beat the best bound.
    lo = np.maximum(A.max(axis=0), A.min(axis=0) + S.sum(axis=0))
    hi = _upper_bound(A, S)
    keep = lo <= hi.min()
    A, S, splits, lo, hi = A[:, keep], S[:, keep], splits[keep], lo[keep], hi[keep]
    T = _bisect(lambda t: needed_shares(t[None, :], A, S).sum(axis=0), lo, hi)
    p = int(np.argmin(T))
    _, f = equalize_shares(A[:, p], S[:, p])
    if fill_leftover:
        f = _fill(f)
    a, b = (int(x) for x in splits[p])
    return evaluate_plan(problem, "lscra-common", [(a, b)] * problem.n_devices, f)


def _pareto_fronts(A: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per device, the splits not dominated in (A, S), padded to a common width: ``(index, A, S)`` of shape (N, K).

    A split needs the least share at some ``T`` only if no other split has both a smaller ``A`` and a smaller ``S``.
    Padding has ``A = inf`` so it never needs a finite share.
    """
    n, p = A.shape
    # By A (ties between distinct splits are rare and harmless: a dominated split may survive, never the reverse).
    order = np.argsort(A, axis=1, kind="stable")
    flat = (order + (np.arange(n) * p)[:, None]).ravel()
    As = A.ravel()[flat].reshape(n, p)
    Ss = S.ravel()[flat].reshape(n, p)
    keep = np.isfinite(As)
    keep[:, 1:] &= Ss[:, 1:] < np.minimum.accumulate(Ss, axis=1)[:, :-1]
    rows, cols = np.nonzero(keep)
    slot = (np.cumsum(keep, axis=1) - 1)[rows, cols]
    K = max(int(slot.max()) + 1 if slot.size else 1, 1)
    idx = np.zeros((n, K), dtype=np.int64)
    Af = np.full((n, K), np.inf)
    Sf = np.zeros((n, K))
    idx[rows, slot] = order[rows, cols]
    Af[rows, slot] = As[rows, cols]
    Sf[rows, slot] = Ss[rows, cols]
    return idx, Af, Sf


def plan_per_device(problem: PlanningProblem, *, fill_leftover: bool = True, prune: bool = True) -> Plan:
    """Exact minimum round time with a split per device (bisection on ``T``, least-share split per device).

    ``prune=False`` bisects over every split instead of each device's Pareto front (same result, slower; for the
    benchmark and the tests).
    """
    splits, A, S = cost_tensor(problem)
    bad = _infeasible_devices(problem, A)
    if bad:
        raise PlanningError(f"no allowed split for device(s) {', '.join(bad)}: the head + tail parameters exceed "
                            "their memory for every split (lower min_head/min_tail or give them more memory)")
    if prune:
        idx, Af, Sf = _pareto_fronts(A, S)
    else:
        idx, Af, Sf = np.broadcast_to(np.arange(A.shape[1]), A.shape), A, S
    n = problem.n_devices
    lo = np.array([Af.min(axis=1).max()])
    hi = np.array([(Af + n * Sf).min(axis=1).max()])  # equal shares 1/n, each device's best split
    hi = hi * (1 + 4 * REL_TOL)

    def total_need(t: np.ndarray) -> np.ndarray:
        return np.array([needed_shares(x, Af, Sf).min(axis=1).sum() for x in t])

    T = float(_bisect(total_need, lo, hi)[0])
    need = needed_shares(T, Af, Sf)
    best = need.min(axis=1, keepdims=True)
    # Among the splits needing the least share, the one with the smallest A (fastest device-side work).
    k = np.argmin(np.where(need == best, Af, np.inf), axis=1)
    rows = np.arange(n)
    chosen = idx[rows, k]
    _, f = equalize_shares(A[rows, chosen], S[rows, chosen])
    if fill_leftover:
        f = _fill(f)
    return evaluate_plan(problem, "lscra", [tuple(int(x) for x in splits[c]) for c in chosen], f)


def plan_lscra(problem: PlanningProblem, *, common: bool | None = None, fill_leftover: bool = True) -> Plan:
    """The planner the CLI uses: a common split for training (one shared body), per-device splits for inference."""
    if common is None:
        common = problem.mode == "training"
    if common:
        return plan_common_split(problem, fill_leftover=fill_leftover)
    return plan_per_device(problem, fill_leftover=fill_leftover)
