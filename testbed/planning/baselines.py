"""Baselines the planner is compared with. Each returns a :class:`~testbed.planning.model.Plan` timed by the model.

* :func:`fixed_middle` — every device splits at the thirds of the model (body = the middle third), equal shares.
* :func:`neurosurgeon` — each device picks the split that is best for itself with the whole edge (``f = 1``),
  contention ignored, as Neurosurgeon does; the plan is then evaluated with the shares it really gets
  (equal among edge users, or proportional to their body work).
* :func:`device_only` — ``a == b`` for every device: no edge, no transfer.
* :func:`edge_only` — reference only, **not a U-shaped plan**: split ``(0, L)``, the raw input goes up and the
  logits come down, so inputs (and, in training, labels) leave the device. Shares are the optimal (equalising) ones.

A baseline whose split breaks a device's constraint (memory) is reported infeasible (``round_s = inf``, reason in
``note``) instead of raising.
"""

from __future__ import annotations

import math

import numpy as np

from testbed.planning.lscra import equalize_shares
from testbed.planning.model import (
    EDGE_STAGES,
    Plan,
    PlanningProblem,
    cost_tensor,
    device_time,
    evaluate_plan,
)

__all__ = ["BASELINES", "all_baselines", "device_only", "edge_only", "fixed_middle", "neurosurgeon"]

ShareRule = str  # "equal" | "proportional"


def _shares(problem: PlanningProblem, splits: list[tuple[int, int]], work: np.ndarray, rule: ShareRule) -> np.ndarray:
    users = np.array([a < b for a, b in splits])
    f = np.zeros(problem.n_devices)
    if not users.any():
        return f
    if rule == "equal":
        f[users] = 1.0 / users.sum()
    elif rule == "proportional":
        w = np.where(users, work, 0.0)
        f = w / w.sum() if w.sum() > 0 else np.where(users, 1.0 / users.sum(), 0.0)
    else:
        raise ValueError(f"unknown share rule {rule!r}")
    return f


def fixed_middle(problem: PlanningProblem) -> Plan:
    """Split at ``round(L/3)`` and ``round(2L/3)`` (clamped to min_head/min_tail), equal shares among edge users."""
    L = problem.model.n_blocks
    a = min(max(round(L / 3), problem.min_head), L - problem.min_tail)
    b = min(max(round(2 * L / 3), a), L - problem.min_tail)
    splits = [(a, b)] * problem.n_devices
    return evaluate_plan(problem, "fixed-middle", splits, _shares(problem, splits, np.ones(problem.n_devices), "equal"))


def neurosurgeon(problem: PlanningProblem, shares: ShareRule = "equal") -> Plan:
    """Each device's own best split with the whole edge; then the shares it really gets (``equal``/``proportional``)."""
    cand, A, S = cost_tensor(problem)
    T1 = A + S
    splits: list[tuple[int, int]] = []
    work = np.zeros(problem.n_devices)
    infeasible = []
    for i in range(problem.n_devices):
        if not np.isfinite(T1[i]).any():
            infeasible.append(problem.devices[i].name)
            splits.append((problem.min_head, problem.model.n_blocks - problem.min_tail))
            continue
        p = int(np.argmin(T1[i]))
        splits.append((int(cand[p, 0]), int(cand[p, 1])))
        work[i] = S[i, p]
    f = _shares(problem, splits, work, shares)
    plan = evaluate_plan(problem, f"neurosurgeon-{shares}", splits, f)
    if infeasible:
        return Plan(plan.method, plan.devices, math.inf, f"no allowed split for {', '.join(infeasible)}")
    return plan


def device_only(problem: PlanningProblem) -> Plan:
    """Everything on the device (``a == b``); the best allowed ``a`` per device (memory permitting)."""
    cand, A, _ = cost_tensor(problem)
    diag = cand[:, 0] == cand[:, 1]
    splits = []
    for i in range(problem.n_devices):
        Ai = np.where(diag, A[i], np.inf)
        p = int(np.argmin(Ai))  # if none is allowed, evaluate_plan reports the memory violation
        splits.append((int(cand[p, 0]), int(cand[p, 1])))
    return evaluate_plan(problem, "device-only", splits, np.zeros(problem.n_devices))


def edge_only(problem: PlanningProblem) -> Plan:
    """Reference, not U-shaped: all blocks on the edge (split ``(0, L)``), equalising shares."""
    L = problem.model.n_blocks
    A = np.zeros(problem.n_devices)
    S = np.zeros(problem.n_devices)
    for i in range(problem.n_devices):
        total, stages = device_time(problem, i, 0, L, 1.0)
        S[i] = sum(stages.get(name, 0.0) for name in EDGE_STAGES)
        A[i] = total - S[i]
    _, f = equalize_shares(A, S)
    return evaluate_plan(problem, "edge-only", [(0, L)] * problem.n_devices, f, check=False,
                         note="reference only: raw inputs leave the device (not U-shaped)")


BASELINES = {
    "fixed-middle": fixed_middle,
    "neurosurgeon-equal": lambda p: neurosurgeon(p, "equal"),
    "neurosurgeon-proportional": lambda p: neurosurgeon(p, "proportional"),
    "device-only": device_only,
    "edge-only": edge_only,
}


def all_baselines(problem: PlanningProblem) -> dict[str, Plan]:
    """Every baseline, by name (``edge-only`` last: it is a reference, not a valid U-shaped plan)."""
    return {name: fn(problem) for name, fn in BASELINES.items()}
