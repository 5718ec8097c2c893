"""Property tests of the planner against an exhaustive solver, closed forms and the baselines."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from testbed.planning.baselines import all_baselines
from testbed.planning.exhaustive import round_shares, solve_exhaustive
from testbed.planning.instances import random_problem
from testbed.planning.lscra import equalize_shares, plan_common_split, plan_lscra, plan_per_device
from testbed.planning.model import (
    EDGE_STAGES,
    DeviceProfile,
    ModelProfile,
    Plan,
    PlanningError,
    PlanningProblem,
    device_time,
    evaluate_plan,
    split_violations,
    valid_splits,
)

REL = 1e-9
GRID = 24
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Mostly positive block times, sometimes exactly zero (a free block, a body with no edge work).
times = st.one_of(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0), st.floats(1e-3, 1.0), st.just(0.0))


@st.composite
def raw_problems(draw, max_devices: int = 3, max_blocks: int = 6) -> PlanningProblem:
    """Instances straight from hypothesis: zeros, ties, extreme rates and memory limits."""
    L = draw(st.one_of(*[st.integers(3, max_blocks)] * 3, st.just(2)))  # L = 2 allows device-only only
    mode = draw(st.sampled_from(["inference", "training"]))
    vec = st.lists(times, min_size=L, max_size=L)
    jitter = st.lists(st.floats(0.5, 2.0), min_size=L, max_size=L)
    params = draw(st.lists(st.integers(0, 1000), min_size=L, max_size=L))
    fwd = draw(vec)
    bwd = draw(vec) if mode == "training" else [0.0] * L
    # The whole edge is 1-500x faster than a speed-1 device, so offloading is often (not always) worth it.
    speedup = math.exp(draw(st.floats(0.0, math.log(500.0))))
    edge_fwd = [x / speedup * j for x, j in zip(fwd, draw(jitter), strict=True)]
    edge_bwd = [x / speedup * j for x, j in zip(bwd, draw(jitter), strict=True)]
    model = ModelProfile(
        name="h",
        fwd_s=tuple(fwd),
        bwd_s=tuple(bwd),
        edge_fwd_s=tuple(edge_fwd),
        edge_bwd_s=tuple(edge_bwd),
        act_bytes=tuple(draw(st.lists(st.integers(0, 10**5), min_size=L + 1, max_size=L + 1))),
        param_bytes=tuple(params),
        tail_call_s=draw(st.one_of(st.just(0.0), st.floats(0, 0.01))),
        body_call_s=draw(st.one_of(st.just(0.0), st.floats(0, 0.005))),
    )
    min_head = draw(st.one_of(st.just(1), st.integers(1, L - 1)))
    min_tail = draw(st.one_of(st.just(1), st.integers(1, L - min_head)))
    n = draw(st.integers(1, max_devices))
    devices = []
    least = sum(params[:min_head]) + sum(params[L - min_tail :])  # head + tail of the deepest allowed body
    for i in range(n):
        memory = draw(st.one_of(st.none(), st.integers(least, sum(params))))
        devices.append(DeviceProfile(
            name=f"d{i}",
            speed=draw(st.floats(0.1, 4)),
            uplink_bps=draw(st.floats(1e7, 1e10)),
            downlink_bps=draw(st.floats(1e7, 1e10)),
            delay_s=draw(st.one_of(st.just(0.0), st.floats(0, 0.02))),
            memory_bytes=memory,
            edge_request_s=draw(st.one_of(st.just(0.0), st.floats(0, 0.01))),
            uplink_burst_bytes=draw(st.one_of(st.just(0), st.integers(0, 10**5))),
            downlink_burst_bytes=draw(st.one_of(st.just(0), st.integers(0, 10**5))),
        ))
    prob = PlanningProblem(model, tuple(devices), min_head=min_head, min_tail=min_tail, mode=mode,
                           batches_per_round=draw(st.integers(1, 3)))
    assume(all(valid_splits(prob, i) for i in range(n)))
    return prob


@st.composite
def seeded_problems(draw, max_devices: int = 3, max_blocks: int = 6) -> PlanningProblem:
    """Plausible instances from the generator the benchmark uses, with a busy or an idle edge."""
    L = draw(st.integers(2, max_blocks))
    min_head = draw(st.integers(1, max(1, L // 2)))
    prob = random_problem(
        draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, max_devices)), L,
        draw(st.sampled_from(["inference", "training"])), memory=draw(st.booleans()), min_head=min_head,
        min_tail=draw(st.integers(1, L - min_head)), batches_per_round=draw(st.integers(1, 3)),
        edge_speedup=draw(st.floats(2.0, 200.0)),
    )
    assume(all(valid_splits(prob, i) for i in range(prob.n_devices)))
    return prob


def problems(max_devices: int = 3, max_blocks: int = 6) -> st.SearchStrategy[PlanningProblem]:
    return st.one_of(raw_problems(max_devices, max_blocks), seeded_problems(max_devices, max_blocks))


def close_le(x: float, y: float) -> bool:
    """x <= y up to floating-point noise."""
    return x <= y * (1 + REL) + 1e-12


def check_constraints(prob: PlanningProblem, plan: Plan) -> None:
    L = prob.model.n_blocks
    assert plan.feasible
    assert math.fsum(d.share for d in plan.devices) <= 1 + 1e-9
    for i, d in enumerate(plan.devices):
        assert d.device == prob.devices[i].name
        assert prob.min_head <= d.a <= d.b <= L - prob.min_tail
        assert d.share >= 0
        if d.a == d.b:
            assert d.share == 0
        mem = prob.devices[i].memory_bytes
        if mem is not None:
            assert sum(prob.model.param_bytes[: d.a]) + sum(prob.model.param_bytes[d.b :]) <= mem
        assert not split_violations(prob, i, d.a, d.b)
        total, stages = device_time(prob, i, d.a, d.b, d.share)
        assert d.total_s == total and d.stages == stages
    assert plan.round_s == max(d.total_s for d in plan.devices)


def grid_bound(prob: PlanningProblem, plan: Plan, grid: int) -> float:
    """The planner's splits with its shares rounded onto the grid: a point the exhaustive solver enumerates."""
    shares = round_shares([d.share for d in plan.devices], grid)
    return evaluate_plan(prob, "rounded", [(d.a, d.b) for d in plan.devices], shares).round_s


@SETTINGS
@given(problems())
def test_per_device_matches_exhaustive(prob: PlanningProblem) -> None:
    plan = plan_per_device(prob)
    check_constraints(prob, plan)
    event(f"{sum(d.share > 0 for d in plan.devices)} of {prob.n_devices} devices on the edge")
    ex = solve_exhaustive(prob, GRID)
    check_constraints(prob, ex)
    assert close_le(plan.round_s, ex.round_s)  # the grid is a subset of the feasible shares
    bound = grid_bound(prob, plan, GRID)
    event(f"grid bound {'finite' if math.isfinite(bound) else 'infinite'}")
    assert close_le(ex.round_s, bound)  # the rounded plan is on the grid


@SETTINGS
@given(problems())
def test_common_split_matches_exhaustive(prob: PlanningProblem) -> None:
    assume(set.intersection(*(set(valid_splits(prob, i)) for i in range(prob.n_devices))))
    plan = plan_common_split(prob)
    check_constraints(prob, plan)
    assert len({(d.a, d.b) for d in plan.devices}) == 1
    ex = solve_exhaustive(prob, GRID, common=True)
    assert close_le(plan.round_s, ex.round_s)
    assert close_le(ex.round_s, grid_bound(prob, plan, GRID))
    # Per-device splits relax the common split.
    assert close_le(plan_per_device(prob).round_s, plan.round_s)


def stage_costs(prob: PlanningProblem, i: int, a: int, b: int) -> tuple[float, float]:
    """(A, S) of one split from device_time's stages (independent of the planner's vectorised costs)."""
    total, stages = device_time(prob, i, a, b, 1.0)
    S = sum(stages[s] for s in EDGE_STAGES if s in stages)
    return total - S, S


def two_device_optimum(A1: float, S1: float, A2: float, S2: float) -> float:
    if S1 == 0 and S2 == 0:
        return max(A1, A2)
    if S1 == 0:
        return max(A1, A2 + S2)
    if S2 == 0:
        return max(A2, A1 + S1)
    # S1/(T-A1) + S2/(T-A2) = 1, the root above max(A1, A2)
    p = A1 + A2 + S1 + S2
    q = A1 * A2 + S1 * A2 + S2 * A1
    return (p + math.sqrt(p * p - 4 * q)) / 2


@SETTINGS
@given(problems(max_devices=2, max_blocks=5))
def test_exact_optimum_by_closed_form(prob: PlanningProblem) -> None:
    """One device: min over splits of A + S. Two: every split pair, solved with the quadratic formula."""
    costs = [[stage_costs(prob, i, a, b) for a, b in valid_splits(prob, i)] for i in range(prob.n_devices)]
    if prob.n_devices == 1:
        best = min(A + S for A, S in costs[0])
    else:
        best = min(two_device_optimum(*c1, *c2) for c1, c2 in itertools.product(*costs))
    got = plan_per_device(prob).round_s
    assert got == pytest.approx(best, rel=1e-8, abs=1e-12)


@SETTINGS
@given(problems())
def test_never_worse_than_baselines(prob: PlanningProblem) -> None:
    per_device = plan_per_device(prob)
    base = all_baselines(prob)
    for name, plan in base.items():
        if name == "edge-only":  # not a U-shaped plan: no guarantee either way
            continue
        assert close_le(per_device.round_s, plan.round_s), name
        if plan.feasible:
            check_constraints(prob, plan)
    if set.intersection(*(set(valid_splits(prob, i)) for i in range(prob.n_devices))):
        common = plan_common_split(prob)
        for name in ("fixed-middle", "device-only"):  # the baselines that use one split for all
            assert close_le(common.round_s, base[name].round_s), name


@SETTINGS
@given(problems(), st.booleans())
def test_binding_shares_equalise_delays(prob: PlanningProblem, fill: bool) -> None:
    for plan in (plan_per_device(prob, fill_leftover=fill), plan_common_split(prob, fill_leftover=fill)
                 if set.intersection(*(set(valid_splits(prob, i)) for i in range(prob.n_devices))) else None):
        if plan is None:
            continue
        users = [d for d in plan.devices if d.share > 0]
        others = [d.total_s for d in plan.devices if d.share == 0]
        binding = bool(users) and plan.round_s > max(others, default=0.0) * (1 + 1e-6)
        event(f"{plan.method}: {len(users)} edge users, {'binding' if binding else 'not binding'}")
        if binding:
            # The edge users set the round time: their shares are binding and their delays are equal.
            assert math.fsum(d.share for d in users) == pytest.approx(1.0, rel=1e-9)
            for d in users:
                assert d.total_s == pytest.approx(plan.round_s, rel=1e-7)


@SETTINGS
@given(problems())
def test_pruning_does_not_change_the_optimum(prob: PlanningProblem) -> None:
    assert plan_per_device(prob, prune=False).round_s == pytest.approx(plan_per_device(prob).round_s, rel=1e-9)


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("seed", range(4))
def test_larger_random_instances(seed: int, mode: str) -> None:
    """30 devices x 12 blocks: constraints, baselines, and the exhaustive bound with a coarse grid."""
    prob = random_problem(seed, 30, 12, mode, memory=True, min_head=2)
    plan = plan_per_device(prob)
    check_constraints(prob, plan)
    for name, b in all_baselines(prob).items():
        if name != "edge-only":
            assert close_le(plan.round_s, b.round_s)
    common = plan_common_split(prob)
    check_constraints(prob, common)
    assert close_le(plan.round_s, common.round_s)
    assert plan_lscra(prob).method == ("lscra-common" if mode == "training" else "lscra")


def test_identical_devices_share_equally() -> None:
    base = random_problem(5, 1, 6)
    devs = tuple(DeviceProfile(name=f"d{i}", speed=1.0, uplink_bps=1e8, downlink_bps=1e8, delay_s=0.001)
                 for i in range(4))
    prob = PlanningProblem(base.model, devs)
    plan = plan_common_split(prob)
    d0 = plan.devices[0]
    if d0.a < d0.b:
        assert [d.share for d in plan.devices] == pytest.approx([0.25] * 4)
    t, _ = equalize_shares(np.full(4, 1.0), np.full(4, 0.5))
    assert t == pytest.approx(3.0)


def test_memory_rules_out_every_split() -> None:
    base = random_problem(1, 2, 5)
    devs = (base.devices[0], DeviceProfile(name="tiny", uplink_bps=1e6, downlink_bps=1e6, memory_bytes=0))
    prob = PlanningProblem(base.model, devs)
    with pytest.raises(PlanningError, match="tiny"):
        plan_per_device(prob)
    with pytest.raises(PlanningError, match="no split fits"):
        plan_common_split(prob)
    with pytest.raises(PlanningError):
        solve_exhaustive(prob)


def test_round_shares_stays_on_the_simplex() -> None:
    assert round_shares([0.5, 0.5], 4).tolist() == [0.5, 0.5]
    assert round_shares([0.34, 0.33, 0.33], 10).tolist() == pytest.approx([0.4, 0.3, 0.3])
    assert round_shares([0.2, 0.1], 4).sum() <= 0.5
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = rng.dirichlet(np.ones(3)) * rng.uniform(0.2, 1.0)
        r = round_shares(f, 7)
        assert r.sum() <= 1 + 1e-12 and (np.abs(r - f) < 1 / 7 + 1e-12).all()
