"""Exhaustive solver for small instances: ground truth for the planner's tests.

Shares are restricted to a grid (multiples of ``1/grid``, summing to at most 1); every allowed split of every device
is timed with :func:`~testbed.planning.model.device_time` (not with the vectorised costs the planner uses).

For a fixed share vector the devices do not interact, so the best combination of splits is each device's best split
at its share: enumerating every combination of splits gives the same minimum as taking, per share, the best split of
each device. The min-max over share vectors on the grid is then an exact dynamic programme over the devices
(``best[k][u]`` = least largest delay of the first ``k`` devices using ``u`` grid units), O(N·grid²).
With ``common=True`` every device uses the same split and the programme runs per split.

The grid makes this an upper bound on the continuous optimum: the planner's round time must be ``<=`` the
exhaustive one, and the exhaustive one ``<=`` the planner's plan re-evaluated with its shares rounded onto the grid
(:func:`round_shares`), since that is one of the points enumerated.
"""

from __future__ import annotations

import math

import numpy as np

from testbed.planning.model import (
    EDGE_STAGES,
    Plan,
    PlanningError,
    PlanningProblem,
    device_time,
    evaluate_plan,
    valid_splits,
)

__all__ = ["round_shares", "solve_exhaustive"]


def _times(problem: PlanningProblem, i: int, splits: list[tuple[int, int]], grid: int) -> np.ndarray:
    """``T[s, g]``: device ``i``'s delay with split ``splits[s]`` and share ``g / grid``."""
    g = np.arange(grid + 1) / grid
    out = np.empty((len(splits), grid + 1))
    for s, (a, b) in enumerate(splits):
        total, stages = device_time(problem, i, a, b, 1.0)
        work = sum(stages.get(n, 0.0) for n in EDGE_STAGES)
        base = total - work
        with np.errstate(divide="ignore"):
            out[s] = base + (work / g if work > 0 else 0.0)
    return out


def _minmax(best: np.ndarray, grid: int) -> tuple[float, list[int]]:
    """Least ``max_i best[i, u_i]`` with ``sum u_i <= grid``; returns it and the units ``u_i``."""
    n = best.shape[0]
    dp = np.full(grid + 1, -math.inf)  # no device yet: the max over nobody
    choice = np.zeros((n, grid + 1), dtype=np.int64)
    for i in range(n):
        new = np.full(grid + 1, math.inf)
        for u in range(grid + 1):
            cand = np.maximum(dp[u::-1][: u + 1], best[i, : u + 1])  # give device i g units, the others u - g
            g = int(np.argmin(cand))
            new[u], choice[i, u] = cand[g], g
        dp = new
    units = [0] * n
    u = grid
    for i in range(n - 1, -1, -1):
        units[i] = int(choice[i, u])
        u -= units[i]
    return float(dp[grid]), units


def solve_exhaustive(problem: PlanningProblem, grid: int = 20, *, common: bool = False) -> Plan:
    """Best plan with shares on the ``1/grid`` grid, over every allowed split (per device, or one common split)."""
    if grid < 1:
        raise PlanningError(f"grid must be >= 1, got {grid}")
    n = problem.n_devices
    per_dev = [valid_splits(problem, i) for i in range(n)]
    if common:
        shared = sorted(set.intersection(*(set(s) for s in per_dev)))
        if not shared:
            raise PlanningError("no split is allowed for every device")
        times = [_times(problem, i, shared, grid) for i in range(n)]
        best_val, best = math.inf, None
        for s, split in enumerate(shared):
            val, units = _minmax(np.stack([t[s] for t in times]), grid)
            if val < best_val:
                best_val, best = val, ([split] * n, units)
        assert best is not None
        splits, units = best
    else:
        if any(not s for s in per_dev):
            raise PlanningError("some device has no allowed split")
        times = [_times(problem, i, per_dev[i], grid) for i in range(n)]
        best_t = np.stack([t.min(axis=0) for t in times])
        _, units = _minmax(best_t, grid)
        splits = [per_dev[i][int(np.argmin(times[i][:, units[i]]))] for i in range(n)]
    shares = [u / grid for u in units]
    return evaluate_plan(problem, f"exhaustive-{'common' if common else 'per-device'}-grid{grid}", splits, shares)


def round_shares(shares: list[float] | np.ndarray, grid: int) -> np.ndarray:
    """Shares rounded onto the ``1/grid`` grid by largest remainder, never above ``sum(shares)`` rounded up to a unit.

    Each share becomes ``floor(f * grid)`` units; the units left (``grid - sum floors``, at most one per device and
    only while ``sum f`` allows it) go to the largest fractional parts. The result sums to at most 1.
    """
    f = np.asarray(shares, dtype=float) * grid
    units = np.floor(f + 1e-9)
    spare = int(min(grid - units.sum(), math.floor(f.sum() + 1e-9) - units.sum()))
    if spare > 0:
        order = np.argsort(-(f - units), kind="stable")
        units[order[:spare]] += 1
    return units / grid
