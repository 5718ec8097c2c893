"""Re-planning: live estimates into the problem, hysteresis, membership, which splits move."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.controller.estimates import ComputeEstimate, LinkEstimate
from testbed.controller.replan import (
    BASELINE_PLANNERS,
    Decision,
    ReplanError,
    Replanner,
    ReplanPolicy,
    plan_fresh,
    problem_with_estimates,
    rename_devices,
)
from testbed.planning.lscra import plan_lscra
from testbed.planning.model import DeviceProfile, ModelProfile, PlanningProblem, evaluate_plan
from testbed.profiling.problem import build_problem, link_rates, resolve_link

# Four blocks whose activations shrink with depth: a shallow head sends 200 kB up, a deeper one 20 kB for
# 10 ms more of device work. Block 2 is heavy on the device, so device-only never pays.
MODEL = ModelProfile(
    "shrinking", fwd_s=(0.002, 0.010, 0.100, 0.002), bwd_s=(0, 0, 0, 0),
    edge_fwd_s=(0.0002, 0.001, 0.005, 0.0002), edge_bwd_s=(0, 0, 0, 0),
    act_bytes=(100_000, 200_000, 20_000, 10_000, 40), param_bytes=(1, 1, 1, 1),
)
SIXG = link_rates(resolve_link("6g-imt2030"))
LTE = link_rates(resolve_link("lte"))


def _problem(links: list[tuple[float, float, float]], model: ModelProfile = MODEL) -> PlanningProblem:
    return PlanningProblem(model, tuple(
        DeviceProfile(name=f"dev{i}", uplink_bps=up, downlink_bps=down, delay_s=d)
        for i, (up, down, d) in enumerate(links)))


def _link(name: str, up: float | None, down: float | None, delay: float | None, age: float = 0.0) -> LinkEstimate:
    return LinkEstimate(name, up, down, delay, "rtt", 10, 3, age)


def _splits(plan) -> dict[str, tuple[int, int]]:
    return {d.device: (d.a, d.b) for d in plan.devices}


# ---------------------------------------------------------------------------------------------
# problem_with_estimates


def test_estimates_replace_the_profiled_links_and_speeds() -> None:
    base = _problem([SIXG, SIXG, SIXG])
    est = {"dev0": _link("dev0", *LTE), "dev1": _link("dev1", None, 1e6, None),
           "dev2": _link("dev2", 1.0, 1.0, 1.0, age=100.0)}  # stale
    speeds = {"dev0": ComputeEstimate("dev0", 0.5, 10, 0.0), "dev1": 2.0,
              "dev2": ComputeEstimate("dev2", None, 0, None)}
    p = problem_with_estimates(base, est, speeds, edge_speed=ComputeEstimate("edge", 2.0, 5, 0.0), max_age_s=10.0)
    d0, d1, d2 = p.devices
    assert (d0.uplink_bps, d0.downlink_bps, d0.delay_s, d0.speed) == (*LTE, 0.5)
    assert (d1.uplink_bps, d1.downlink_bps, d1.delay_s, d1.speed) == (SIXG[0], 1e6, SIXG[2], 2.0)
    assert d2 == base.devices[2]  # stale link estimate and unmeasured speed: profiled values kept
    assert p.model.edge_fwd_s == pytest.approx([t / 2 for t in MODEL.edge_fwd_s])
    assert p.model.fwd_s == MODEL.fwd_s and base.model.edge_fwd_s == MODEL.edge_fwd_s  # input untouched


def test_devices_selects_and_orders_the_devices_up() -> None:
    base = _problem([SIXG, LTE, SIXG])
    p = problem_with_estimates(base, {}, {}, devices=["dev2", "dev0"])
    assert [d.name for d in p.devices] == ["dev2", "dev0"]
    with pytest.raises(ReplanError, match=r"unknown device.*ghost"):
        problem_with_estimates(base, {}, {}, devices=["dev0", "ghost"])
    with pytest.raises(ReplanError, match="no device"):
        problem_with_estimates(base, {}, {}, devices=[])
    with pytest.raises(ReplanError, match="speed of dev0"):
        problem_with_estimates(base, {}, {"dev0": -1.0})
    with pytest.raises(ReplanError, match="unusable"):
        problem_with_estimates(base, {"dev0": _link("dev0", 0.0, 1.0, 0.0)}, {})


# ---------------------------------------------------------------------------------------------
# Which splits move


def test_a_drop_to_lte_moves_that_devices_split_deeper_and_no_other() -> None:
    rp = Replanner(ReplanPolicy(margin=0.1, consecutive=2, min_interval_s=5.0))
    first = rp.evaluate(_problem([SIXG, SIXG, SIXG]), now=0.0)
    assert first.replan and first.reason == "initial plan" and set(first.changed) == {"dev0", "dev1", "dev2"}
    before = _splits(first.plan)
    assert len(set(before.values())) == 1  # identical devices, identical splits
    dropped = _problem([LTE, SIXG, SIXG])
    decisions = [rp.evaluate(dropped, now=t) for t in (6.0, 7.0)]
    assert [d.replan for d in decisions] == [False, True]  # the second evaluation in a row
    after = _splits(decisions[1].plan)
    assert decisions[1].changed == ("dev0",)
    assert after["dev1"] == before["dev1"] and after["dev2"] == before["dev2"]
    a0, a1 = after["dev0"][0], before["dev0"][0]
    assert a0 > a1 and MODEL.act_bytes[a0] < MODEL.act_bytes[a1]  # deeper head, smaller uplink activation
    d = decisions[1]
    assert d.current_round_s > d.fresh_round_s * 1.1
    # Keeping dev1 and dev2 where they are costs at most keep_slack against the unconstrained optimum.
    assert d.fresh_round_s <= plan_lscra(dropped).round_s * (1 + rp.policy.keep_slack) + 1e-12


def test_a_drop_on_measured_profiles_moves_only_that_device() -> None:
    """The repository's measured CNN profiles, three Raspberry Pi 4 on the 6G vision link; dev 0 drops to LTE."""
    base = build_problem("profiles/measured/vm-cnn-onnxruntime.yaml", ["6g-vision"], devices=3,
                         device_classes=["raspberry-pi-4"], edge_profile="profiles/measured/vm-cnn-torch.yaml",
                         edge_class="edge-gpu", batch_size=8)
    base = rename_devices(base, ["dev1", "dev2", "dev3"])
    with pytest.raises(ReplanError, match="device names must be unique"):
        rename_devices(base, ["a", "a", "b"])
    with pytest.raises(ReplanError, match="2 names for 3 devices"):
        rename_devices(base, ["a", "b"])
    rp = Replanner(ReplanPolicy(consecutive=1, min_interval_s=0.0))
    before = _splits(rp.evaluate(base, 0.0).plan)
    name0 = "dev1"
    est = {name0: _link(name0, *LTE)}
    d = rp.evaluate(problem_with_estimates(base, est, {}), 1.0)
    assert d.replan and d.changed == (name0,)
    after = _splits(d.plan)
    assert after[name0] != before[name0]
    assert all(after[n] == before[n] for n in before if n != name0)


def test_only_shares_move_when_the_splits_stay_optimal() -> None:
    rp = Replanner(ReplanPolicy(margin=0.0, consecutive=1, min_interval_s=0.0))
    old = rp.evaluate(_problem([SIXG, SIXG, SIXG]), 0.0).plan
    faster = dataclasses.replace(MODEL, edge_fwd_s=tuple(t * 0.3 for t in MODEL.edge_fwd_s))
    slow_dev = _problem([SIXG, SIXG, SIXG], faster)
    slow_dev = dataclasses.replace(slow_dev, devices=(dataclasses.replace(slow_dev.devices[0], speed=0.9),
                                                      *slow_dev.devices[1:]))
    d = rp.evaluate(slow_dev, 1.0)
    assert d.replan and d.changed == ()
    assert _splits(d.plan) == _splits(old)
    assert d.plan.devices[0].share > old.devices[0].share  # the slower device gets more of the edge


# ---------------------------------------------------------------------------------------------
# Hysteresis


def _flapping_trace(seed: int, n: int) -> list[float]:
    """dev0's uplink hovering around the rate at which its best split changes (about 195 Mbit/s here)."""
    rng = random.Random(seed)
    return [195e6 * math.exp(rng.uniform(-0.3, 0.3)) for _ in range(n)]


def _run(policy: ReplanPolicy, trace: list[float], dt: float = 1.0) -> list[Decision]:
    rp = Replanner(policy)
    rp.evaluate(_problem([SIXG, SIXG, SIXG]), now=-100.0)
    return [rp.evaluate(_problem([(r, SIXG[1], SIXG[2]), SIXG, SIXG]), now=k * dt) for k, r in enumerate(trace)]


def test_no_oscillation_on_a_link_flapping_around_the_threshold() -> None:
    trace = _flapping_trace(0, 120)
    naive = _run(ReplanPolicy(margin=0.0, consecutive=1, min_interval_s=0.0, keep_slack=0.0), trace)
    naive_moves = sum(1 for d in naive if d.replan and d.changed)
    assert naive_moves >= 20  # the trace really does cross the threshold, again and again
    damped = _run(ReplanPolicy(margin=0.1, consecutive=3, min_interval_s=10.0), trace)
    moves = [k for k, d in enumerate(damped) if d.replan]
    assert len(moves) <= 1, moves
    # Every decision not to move says why.
    assert all(d.reason for d in damped)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    margin=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    consecutive=st.integers(1, 4),
    min_interval_s=st.sampled_from([0.0, 2.5, 10.0]),
    steps=st.lists(st.floats(0.1, 3.0), min_size=5, max_size=25),
)
def test_margin_consecutive_and_interval_are_respected(seed: int, margin: float, consecutive: int,
                                                       min_interval_s: float, steps: list[float]) -> None:
    """Replay a random link trace; an independent bookkeeping of the rules must agree with every decision."""
    rng = random.Random(seed)
    policy = ReplanPolicy(margin=margin, consecutive=consecutive, min_interval_s=min_interval_s)
    rp = Replanner(policy)
    now = 0.0
    assert rp.evaluate(_problem([SIXG, SIXG]), now).replan
    last_change, streak = now, 0
    for dt in steps:
        now += dt
        rate = 10 ** rng.uniform(6.5, 9)
        problem = _problem([(rate, SIXG[1], SIXG[2]), (10 ** rng.uniform(6.5, 9), SIXG[1], SIXG[2])])
        current = evaluate_plan(problem, "cur", [(d.a, d.b) for d in rp.plan.devices],
                                [d.share for d in rp.plan.devices])
        d = rp.evaluate(problem, now)
        worse = d.current_round_s > d.fresh_round_s * (1 + margin)
        assert d.current_round_s == pytest.approx(current.round_s, rel=1e-12)
        streak = streak + 1 if worse else 0
        should = worse and streak >= consecutive and now - last_change >= min_interval_s
        assert d.replan == should, (d, streak, now - last_change)
        if d.replan:
            assert d.plan is d.fresh and rp.plan is d.plan
            last_change, streak = now, 0
        else:
            assert d.changed == ()
        assert d.streak == (d.streak if d.replan else streak)


def test_membership_change_replans_at_once() -> None:
    rp = Replanner(ReplanPolicy(margin=0.5, consecutive=5, min_interval_s=1000.0))
    rp.evaluate(_problem([SIXG, SIXG, SIXG]), 0.0)
    three = _problem([SIXG, SIXG, SIXG])
    two = problem_with_estimates(three, {}, {}, devices=["dev0", "dev2"])
    down = rp.evaluate(two, 1.0)
    assert down.replan and "down: dev1" in down.reason
    assert [d.device for d in down.plan.devices] == ["dev0", "dev2"]
    assert down.plan.total_share <= 1 + 1e-9
    same = rp.evaluate(two, 2.0)
    assert not same.replan and same.plan is down.plan
    back = rp.evaluate(three, 3.0)
    assert back.replan and "up: dev1" in back.reason and "dev1" in back.changed


def test_an_infeasible_current_plan_is_replaced_at_once() -> None:
    rp = Replanner(ReplanPolicy(consecutive=3, min_interval_s=100.0))
    rp.evaluate(_problem([SIXG, SIXG]), 0.0)
    tight = dataclasses.replace(_problem([SIXG, SIXG]), min_head=3)  # the current splits (a < 3) are now illegal
    d = rp.evaluate(tight, 1.0)
    assert d.replan and d.reason == "current plan infeasible" and math.isinf(d.current_round_s)


def test_adopt_and_initial_plan() -> None:
    p = _problem([SIXG, SIXG])
    plan = plan_lscra(p)
    rp = Replanner(ReplanPolicy(consecutive=1, min_interval_s=10.0), plan, now=0.0)
    assert rp.plan is plan
    d = rp.evaluate(_problem([LTE, SIXG]), 5.0)  # much worse, but too soon after the given plan
    assert not d.replan and "since the last change" in d.reason
    assert rp.evaluate(_problem([LTE, SIXG]), 10.0).replan


# ---------------------------------------------------------------------------------------------
# Fixed splits


def test_fixed_splits_are_honoured_and_the_rest_optimised() -> None:
    p = _problem([SIXG, LTE, SIXG])
    free = plan_lscra(p)
    assert plan_fresh(p).round_s == free.round_s
    same = plan_fresh(p, fixed=_splits(free))
    assert same.round_s == pytest.approx(free.round_s, rel=1e-9)
    pinned = plan_fresh(p, fixed={"dev1": (1, 3)})  # the LTE device kept on its shallow split
    assert _splits(pinned)["dev1"] == (1, 3)
    assert pinned.round_s >= free.round_s * (1 - 1e-12)
    # No other choice of the free devices' splits does better with dev1 pinned.
    for s0 in [(1, 3), (2, 3), (1, 2), (2, 2)]:
        for s2 in [(1, 3), (2, 3)]:
            other = plan_fresh(p, fixed={"dev0": s0, "dev1": (1, 3), "dev2": s2})
            assert pinned.round_s <= other.round_s * (1 + 1e-9)
    rp = Replanner(ReplanPolicy(consecutive=1, min_interval_s=0.0), fixed={"dev1": (1, 3)})
    assert _splits(rp.evaluate(p, 0.0).plan)["dev1"] == (1, 3)


def test_fixed_split_errors() -> None:
    p = _problem([SIXG, SIXG])
    with pytest.raises(ReplanError, match="not allowed"):
        plan_fresh(p, fixed={"dev0": (0, 3)})
    with pytest.raises(ReplanError, match="common split"):
        plan_fresh(p, common=True, fixed={"dev0": (1, 3), "dev1": (2, 3)})
    common = plan_fresh(p, common=True, fixed={"dev0": (2, 3)})
    assert set(_splits(common).values()) == {(2, 3)}


@pytest.mark.parametrize("algorithm", ["fixed-middle", "neurosurgeon", "device-only"])
def test_a_baseline_algorithm_makes_every_plan(algorithm: str) -> None:
    """A run may plan with a baseline instead of LSCRA (to measure the planner against it): the plan is the
    baseline's, on the initial problem and after a membership change, and LSCRA's round is never worse."""
    p = _problem([SIXG, LTE, SIXG])
    rp = Replanner(ReplanPolicy(consecutive=1, min_interval_s=0.0), algorithm=algorithm)
    first = rp.evaluate(p, 0.0).plan
    expected = BASELINE_PLANNERS[algorithm](p)
    assert first.method == expected.method and _splits(first) == _splits(expected)
    assert [d.share for d in first.devices] == pytest.approx([d.share for d in expected.devices])
    assert plan_lscra(p).round_s <= first.round_s * (1 + 1e-9)
    if algorithm == "device-only":
        assert all(d.a == d.b and d.share == 0 for d in first.devices)
    assert not rp.evaluate(p, 1.0).replan  # the same problem: the baseline's plan stands
    fewer = _problem([SIXG, LTE])
    d = rp.evaluate(fewer, 2.0)
    assert d.replan and _splits(d.plan) == _splits(BASELINE_PLANNERS[algorithm](fewer))


def test_baseline_errors() -> None:
    with pytest.raises(ReplanError, match="unknown algorithm 'greedy'"):
        Replanner(algorithm="greedy")
    with pytest.raises(ReplanError, match="pinned splits"):
        Replanner(algorithm="device-only", fixed={"dev0": (1, 3)})


@pytest.mark.parametrize("kwargs", [
    {"margin": -0.1}, {"margin": math.nan}, {"consecutive": 0}, {"consecutive": 1.5}, {"min_interval_s": -1},
    {"keep_slack": -0.01}, {"common": "yes"},
])
def test_bad_policy_is_refused(kwargs: dict) -> None:
    with pytest.raises(ReplanError):
        ReplanPolicy(**kwargs)


def test_training_mode_keeps_one_common_split() -> None:
    model = dataclasses.replace(MODEL, bwd_s=tuple(2 * t for t in MODEL.fwd_s),
                                edge_bwd_s=tuple(2 * t for t in MODEL.edge_fwd_s))
    p = dataclasses.replace(_problem([SIXG, SIXG, SIXG], model), mode="training")
    rp = Replanner(ReplanPolicy(consecutive=1, min_interval_s=0.0))
    rp.evaluate(p, 0.0)
    d = rp.evaluate(dataclasses.replace(p, devices=(dataclasses.replace(p.devices[0], uplink_bps=LTE[0],
                                                                        downlink_bps=LTE[1], delay_s=LTE[2]),
                                                    *p.devices[1:])), 1.0)
    assert len(set(_splits(d.plan).values())) == 1
