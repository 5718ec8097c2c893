"""Planning: the latency model (pure), the LSCRA planner, its baselines and an exhaustive solver.

See docs/planner.md for the formulas, the algorithm and its complexity.
"""

from __future__ import annotations

from testbed.planning.baselines import all_baselines, device_only, edge_only, fixed_middle, neurosurgeon
from testbed.planning.exhaustive import round_shares, solve_exhaustive
from testbed.planning.instances import load_problem, problem_from_dict, problem_to_dict, random_problem
from testbed.planning.lscra import equalize_shares, needed_shares, plan_common_split, plan_lscra, plan_per_device
from testbed.planning.model import (
    DevicePlan,
    DeviceProfile,
    ModelProfile,
    Plan,
    PlanningError,
    PlanningProblem,
    cost_tensor,
    device_time,
    evaluate_plan,
    plan_to_dict,
    split_costs,
    split_violations,
    valid_splits,
)

__all__ = [
    "DevicePlan",
    "DeviceProfile",
    "ModelProfile",
    "Plan",
    "PlanningError",
    "PlanningProblem",
    "all_baselines",
    "cost_tensor",
    "device_only",
    "device_time",
    "edge_only",
    "equalize_shares",
    "evaluate_plan",
    "fixed_middle",
    "load_problem",
    "needed_shares",
    "neurosurgeon",
    "plan_common_split",
    "plan_lscra",
    "plan_per_device",
    "plan_to_dict",
    "problem_from_dict",
    "problem_to_dict",
    "random_problem",
    "round_shares",
    "solve_exhaustive",
    "split_costs",
    "split_violations",
    "valid_splits",
]
