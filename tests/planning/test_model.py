"""The latency model against hand-computed numbers, and the planning-input loader."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from testbed.errors import TestbedError
from testbed.planning.instances import (
    load_problem,
    parse_bytes,
    parse_rate_bps,
    parse_seconds,
    problem_from_dict,
    problem_to_dict,
    random_problem,
)
from testbed.planning.lscra import equalize_shares, needed_shares
from testbed.planning.model import (
    INFERENCE_STAGES,
    TRAINING_STAGES,
    DeviceProfile,
    ModelProfile,
    PlanningError,
    PlanningProblem,
    cost_tensor,
    device_time,
    evaluate_plan,
    split_costs,
    split_violations,
    valid_splits,
)

MODEL = ModelProfile(
    name="toy",
    fwd_s=(0.01, 0.02, 0.03, 0.04),
    bwd_s=(0.02, 0.04, 0.06, 0.08),
    edge_fwd_s=(0.001, 0.002, 0.003, 0.004),
    edge_bwd_s=(0.002, 0.004, 0.006, 0.008),
    act_bytes=(1000, 2000, 500, 250, 10),
    param_bytes=(100, 200, 300, 400),
)
# Half as fast as the profile; 8 Mbit/s up (1 us per byte), 16 Mbit/s down; 5 ms one way.
DEV = DeviceProfile(name="pi", speed=0.5, uplink_bps=8e6, downlink_bps=16e6, delay_s=0.005)


def problem(mode: str = "inference", batches: int = 1, memory: int | None = None) -> PlanningProblem:
    dev = DeviceProfile(name="pi", speed=0.5, uplink_bps=8e6, downlink_bps=16e6, delay_s=0.005, memory_bytes=memory)
    return PlanningProblem(MODEL, (dev,), mode=mode, batches_per_round=batches)  # type: ignore[arg-type]


def test_inference_time_by_hand() -> None:
    total, st = device_time(problem(), 0, 1, 3, 0.5)
    assert tuple(st) == INFERENCE_STAGES
    expect = {
        "head_fwd": 0.01 / 0.5,
        "uplink_act": 2000 * 8 / 8e6 + 0.005,
        "edge_request": 0.0,
        "body_fwd": (0.002 + 0.003) / 0.5,
        "downlink_act": 250 * 8 / 16e6 + 0.005,
        "tail_call": 0.0,
        "tail_fwd": 0.04 / 0.5,
    }
    assert st == pytest.approx(expect)
    assert total == pytest.approx(0.122125)


def test_training_time_by_hand_two_batches() -> None:
    total, st = device_time(problem("training", batches=2), 0, 1, 3, 0.5)
    assert tuple(st) == TRAINING_STAGES
    per_batch = {
        "head_fwd": 0.02, "uplink_act": 0.007, "edge_request": 0.0, "body_fwd": 0.01, "downlink_act": 0.005125,
        "tail_call": 0.0, "tail_fwd": 0.08,
        "tail_bwd": 0.16, "uplink_grad": 250 * 8 / 8e6 + 0.005, "body_bwd": (0.004 + 0.006) / 0.5,
        "downlink_grad": 2000 * 8 / 16e6 + 0.005, "head_bwd": 0.04,
    }
    assert st == pytest.approx({k: 2 * v for k, v in per_batch.items()})
    assert total == pytest.approx(2 * 0.353375)


def fixed_cost_problem(mode: str = "inference", batches: int = 1) -> PlanningProblem:
    """The toy problem with both measured fixed costs: 2 ms per tail call (reference device), 3 ms per request."""
    model = dataclasses.replace(MODEL, tail_call_s=0.002)
    dev = dataclasses.replace(DEV, edge_request_s=0.003)
    return PlanningProblem(model, (dev,), mode=mode, batches_per_round=batches)  # type: ignore[arg-type]


def test_fixed_costs_by_hand() -> None:
    base_total, base = device_time(problem(), 0, 1, 3, 0.5)
    total, st = device_time(fixed_cost_problem(), 0, 1, 3, 0.5)
    assert tuple(st) == INFERENCE_STAGES
    # The tail call is device time (scaled by speed 0.5); the edge's request handling is latency (no share).
    assert st["tail_call"] == pytest.approx(0.002 / 0.5)
    assert st["edge_request"] == pytest.approx(0.003)
    assert {k: v for k, v in st.items() if k not in ("tail_call", "edge_request")} == pytest.approx(
        {k: v for k, v in base.items() if k not in ("tail_call", "edge_request")})
    assert total == pytest.approx(base_total + 0.004 + 0.003)
    # Device-only (the agent still calls head and tail separately): the tail call, no request.
    total, st = device_time(fixed_cost_problem(), 0, 2, 2, 0.0)
    assert st["edge_request"] == 0 and total == pytest.approx(0.1 / 0.5 + 0.004)
    # Edge-only (0, L): no tail, no tail call.
    _, st = device_time(fixed_cost_problem(), 0, 0, 4, 1.0)
    assert st["tail_call"] == 0 and st["edge_request"] == pytest.approx(0.003)
    # Training, 2 batches: forward and backward requests each pay the handling; the tail's call once a batch.
    total, st = device_time(fixed_cost_problem("training", batches=2), 0, 1, 3, 0.5)
    assert tuple(st) == TRAINING_STAGES
    assert st["edge_request"] == pytest.approx(2 * 2 * 0.003)
    assert st["tail_call"] == pytest.approx(2 * 0.004)
    _, st = device_time(fixed_cost_problem("training"), 0, 0, 4, 1.0)  # edge-only: one request, loss on the edge
    assert st["edge_request"] == pytest.approx(0.003) and st["tail_call"] == 0


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_cost_tensor_counts_fixed_costs_like_device_time(mode: str) -> None:
    rnd = random_problem(5, 3, 6, mode, batches_per_round=2)
    prob = dataclasses.replace(
        rnd, model=dataclasses.replace(rnd.model, tail_call_s=0.004),
        devices=tuple(dataclasses.replace(d, edge_request_s=0.001 * (i + 1)) for i, d in enumerate(rnd.devices)))
    splits, A, S = cost_tensor(prob)
    _, A0, S0 = cost_tensor(rnd)
    assert np.array_equal(S, S0)
    for i in range(prob.n_devices):
        for p, (a, b) in enumerate(splits):
            if not np.isfinite(A[i, p]):
                continue
            assert A[i, p] + S[i, p] / 0.4 == pytest.approx(device_time(prob, i, int(a), int(b), 0.4)[0], rel=1e-12)
            extra = 0.004 / prob.devices[i].speed
            if a < b:
                extra += (2 if mode == "training" else 1) * 0.001 * (i + 1)
            assert A[i, p] - A0[i, p] == pytest.approx(2 * extra, rel=1e-9)


def test_the_body_wake_up_is_paid_once_per_request_and_not_divided_by_the_share() -> None:
    """``body_call_s`` (the edge body's wake-up after idling) is latency of every request that reaches the edge,
    in the edge_request stage, whatever the share; device-only splits never pay it."""
    prob = fixed_cost_problem()
    woken = dataclasses.replace(prob, model=dataclasses.replace(prob.model, body_call_s=0.0005))
    for share in (0.25, 1.0):
        base_total, base = device_time(prob, 0, 1, 3, share)
        total, st = device_time(woken, 0, 1, 3, share)
        assert st["edge_request"] == pytest.approx(0.003 + 0.0005)
        assert total == pytest.approx(base_total + 0.0005)
        assert {k: v for k, v in st.items() if k != "edge_request"} == pytest.approx(
            {k: v for k, v in base.items() if k != "edge_request"})
    assert device_time(woken, 0, 2, 2, 0.0)[1]["edge_request"] == 0
    training = dataclasses.replace(woken, mode="training", batches_per_round=3)
    assert device_time(training, 0, 1, 3, 0.5)[1]["edge_request"] == pytest.approx(3 * 2 * (0.003 + 0.0005))
    # The vectorised costs agree (the planner and the exhaustive solver use them).
    for mode in ("inference", "training"):
        rnd = random_problem(6, 3, 6, mode, batches_per_round=2)
        prob = dataclasses.replace(rnd, model=dataclasses.replace(rnd.model, body_call_s=0.0007))
        splits, A, S = cost_tensor(prob)
        _, A0, S0 = cost_tensor(rnd)
        assert np.array_equal(S, S0)
        for i in range(prob.n_devices):
            for p, (a, b) in enumerate(splits):
                if np.isfinite(A[i, p]):
                    assert A[i, p] + S[i, p] / 0.3 == pytest.approx(
                        device_time(prob, i, int(a), int(b), 0.3)[0], rel=1e-12)
                    requests = (2 if mode == "training" else 1) if a < b else 0
                    assert A[i, p] - A0[i, p] == pytest.approx(2 * requests * 0.0007, abs=1e-12)


def test_a_token_bucket_burst_passes_the_first_bytes_of_every_message_at_no_cost() -> None:
    base = problem()
    dev = dataclasses.replace(base.devices[0], uplink_burst_bytes=1500, downlink_burst_bytes=10**9)
    bursty = dataclasses.replace(base, devices=(dev,))
    _, before = device_time(base, 0, 1, 3, 0.5)
    _, st = device_time(bursty, 0, 1, 3, 0.5)
    m = base.model
    assert st["uplink_act"] == pytest.approx(before["uplink_act"] - 1500 * 8 / dev.uplink_bps)
    assert st["downlink_act"] == pytest.approx(dev.delay_s)  # the whole message fits the bucket
    assert m.act_bytes[1] > 1500
    training = dataclasses.replace(bursty, mode="training")
    _, st = device_time(training, 0, 1, 3, 0.5)
    assert st["uplink_grad"] == pytest.approx(max(0, m.act_bytes[3] - 1500) * 8 / dev.uplink_bps + dev.delay_s)
    assert st["downlink_grad"] == pytest.approx(dev.delay_s)
    for mode in ("inference", "training"):
        rnd = random_problem(9, 3, 6, mode, batches_per_round=2)
        prob = dataclasses.replace(rnd, devices=tuple(
            dataclasses.replace(d, uplink_burst_bytes=500 * i, downlink_burst_bytes=20_000 * i)
            for i, d in enumerate(rnd.devices)))
        splits, A, S = cost_tensor(prob)
        for i in range(prob.n_devices):
            for p, (a, b) in enumerate(splits):
                if np.isfinite(A[i, p]):
                    assert A[i, p] + S[i, p] / 0.7 == pytest.approx(
                        device_time(prob, i, int(a), int(b), 0.7)[0], rel=1e-12)
    with pytest.raises(PlanningError, match="uplink_burst_bytes"):
        dataclasses.replace(DEV, uplink_burst_bytes=-1)


def test_fixed_costs_are_validated() -> None:
    with pytest.raises(PlanningError, match="body_call_s"):
        dataclasses.replace(MODEL, body_call_s=-1e-3)
    with pytest.raises(PlanningError, match="tail_call_s"):
        dataclasses.replace(MODEL, tail_call_s=-1e-3)
    with pytest.raises(PlanningError, match="edge_request_s"):
        dataclasses.replace(DEV, edge_request_s=math.inf)


def test_device_only_has_no_transfer_and_ignores_share() -> None:
    for share in (0.0, 0.3, 1.0):
        total, st = device_time(problem(), 0, 2, 2, share)
        assert total == pytest.approx(0.1 / 0.5)
        assert st["uplink_act"] == st["downlink_act"] == st["body_fwd"] == 0
    total, _ = device_time(problem("training"), 0, 3, 3, 0.0)
    assert total == pytest.approx((0.1 + 0.2) / 0.5)


def test_zero_share_with_body_work_is_infinite() -> None:
    total, st = device_time(problem(), 0, 1, 3, 0.0)
    assert math.isinf(total) and math.isinf(st["body_fwd"])


def test_edge_only_reference_split() -> None:
    # (0, L): input up, logits down; in training no gradient crosses (no head to update, loss on the edge).
    total, st = device_time(problem("training"), 0, 0, 4, 0.25)
    assert st["uplink_act"] == pytest.approx(1000 * 8 / 8e6 + 0.005)
    assert st["downlink_act"] == pytest.approx(10 * 8 / 16e6 + 0.005)
    assert st["uplink_grad"] == st["downlink_grad"] == st["head_fwd"] == st["tail_bwd"] == 0
    assert st["body_fwd"] == pytest.approx(0.01 / 0.25)
    assert st["body_bwd"] == pytest.approx(0.02 / 0.25)
    assert total == pytest.approx(sum(st.values()))


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_split_costs_reproduce_device_time(mode: str) -> None:
    prob = random_problem(3, 2, 7, mode, batches_per_round=3)
    L = prob.model.n_blocks
    for i in range(prob.n_devices):
        A, S = split_costs(prob, i)
        for a in range(L + 1):
            for b in range(L + 1):
                allowed = a <= b and not split_violations(prob, i, a, b)
                assert np.isfinite(A[a, b]) == allowed
                if allowed:
                    for f in (0.1, 0.7, 1.0):
                        assert A[a, b] + S[a, b] / f == pytest.approx(device_time(prob, i, a, b, f)[0], rel=1e-12)
                    assert (S[a, b] == 0) == (a == b or sum(prob.model.edge_fwd_s[a:b]) == 0)


def test_split_costs_hand_values_and_memory() -> None:
    A, S = split_costs(problem(), 0)
    assert S[1, 3] == pytest.approx(0.005)
    assert A[1, 3] == pytest.approx(0.122125 - 0.01)
    assert S[2, 2] == 0 and A[2, 2] == pytest.approx(0.2)
    assert np.isinf(A[3, 1]) and np.isinf(A[0, 3]) and np.isinf(A[1, 4])  # a > b, min_head, min_tail
    # 600 bytes: only (1, 3) keeps head + tail parameters (100 + 400) within memory.
    A, _ = split_costs(problem(memory=600), 0)
    assert [tuple(x) for x in np.argwhere(np.isfinite(A))] == [(1, 3)]
    assert valid_splits(problem(memory=600), 0) == [(1, 3)]
    assert "memory" in split_violations(problem(memory=600), 0, 2, 3)[0]


def test_cost_tensor_shapes() -> None:
    prob = random_problem(0, 5, 51)
    splits, A, S = cost_tensor(prob)
    assert splits.shape == (1275, 2) and A.shape == S.shape == (5, 1275)
    assert (S[:, splits[:, 0] == splits[:, 1]] == 0).all()


def test_evaluate_plan_flags_violations_and_zeroes_device_only_shares() -> None:
    plan = evaluate_plan(problem(memory=600), "x", [(2, 3)], [1.0])
    assert math.isinf(plan.round_s) and not plan.feasible and "memory" in plan.note
    plan = evaluate_plan(problem(), "x", [(2, 2)], [0.7])
    assert plan.devices[0].share == 0 and plan.round_s == pytest.approx(0.2)


def test_needed_shares_conventions() -> None:
    A = np.array([1.0, 1.0, 1.0, 2.0])
    S = np.array([1.0, 0.0, 0.0, 1.0])
    assert needed_shares(3.0, A, S).tolist() == [0.5, 0.0, 0.0, 1.0]
    assert needed_shares(0.5, A, S).tolist() == [math.inf] * 4
    assert needed_shares(1.0, A, S).tolist() == [math.inf, 0.0, 0.0, math.inf]


def test_equalize_shares_closed_form() -> None:
    # 1/(t-1) + 1/(t-2) = 1  =>  t^2 - 5T + 5 = 0  =>  t = (5 + sqrt 5) / 2
    t, f = equalize_shares(np.array([1.0, 2.0]), np.array([1.0, 1.0]))
    assert t == pytest.approx((5 + math.sqrt(5)) / 2, rel=1e-10)
    assert f == pytest.approx([1 / (t - 1), 1 / (t - 2)])
    assert f.sum() <= 1
    # N identical devices: T = A + N S, shares 1/N.
    t, f = equalize_shares(np.full(4, 0.5), np.full(4, 0.25))
    assert t == pytest.approx(1.5) and f == pytest.approx([0.25] * 4)
    # No edge work: T = max A, no share.
    t, f = equalize_shares(np.array([0.3, 0.7]), np.zeros(2))
    assert t == 0.7 and f.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(bwd_s=(0.1,) * 3), "bwd_s has 3 entries, expected 4"),
        (dict(edge_fwd_s=(0.1, -1.0, 0.1, 0.1)), "edge_fwd_s[1]"),
        (dict(act_bytes=(1, 2, 3, 4)), "act_bytes has 4 entries"),
        (dict(fwd_s=(0.1,), bwd_s=(0.0,), edge_fwd_s=(0.0,), edge_bwd_s=(0.0,), act_bytes=(1, 1), param_bytes=(1,)),
         "at least 2 blocks"),
    ],
)
def test_model_profile_validation(change: dict, message: str) -> None:
    fields = {k: getattr(MODEL, k) for k in MODEL.__dataclass_fields__}
    with pytest.raises(PlanningError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelProfile(**{**fields, **change})


def test_problem_validation() -> None:
    assert issubclass(PlanningError, TestbedError)
    with pytest.raises(PlanningError, match="unique"):
        PlanningProblem(MODEL, (DEV, DEV))
    with pytest.raises(PlanningError, match="exceeds"):
        PlanningProblem(MODEL, (DEV,), min_head=2, min_tail=3)
    with pytest.raises(PlanningError, match=">= 1"):
        PlanningProblem(MODEL, (DEV,), min_head=0)
    with pytest.raises(PlanningError, match="mode"):
        PlanningProblem(MODEL, (DEV,), mode="serving")  # type: ignore[arg-type]
    with pytest.raises(PlanningError, match="uplink_bps"):
        DeviceProfile(name="x", uplink_bps=0, downlink_bps=1)
    with pytest.raises(PlanningError, match="outside"):
        device_time(problem(), 0, 3, 2, 1.0)


def test_unit_parsers() -> None:
    assert parse_rate_bps("100mbit") == 1e8 and parse_rate_bps("1.5 Gbps") == 1.5e9 and parse_rate_bps(2e7) == 2e7
    assert parse_seconds("5ms") == pytest.approx(0.005) and parse_seconds("250us") == pytest.approx(2.5e-4)
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(1000) == 1000
    for bad in ("fast", "10 furlongs", True):
        with pytest.raises(PlanningError):
            parse_rate_bps(bad)


YAML = """
mode: inference
model:
  name: toy
  fwd_ms: [10, 20, 30, 40]
  edge_fwd_ms: [1, 2, 3, 4]
  act_bytes: [1000, 2000, 500, 250, 10]
  param_bytes: [100, 200, 300, 400]
devices:
  - name: pi
    count: 2
    speed: 0.5
    uplink: 8mbit
    downlink: 16mbit
    rtt: 10ms
    memory: 1KiB
  - name: orin
    speed: 2
    uplink_bps: 1.0e8
    downlink_bps: 2.0e8
    delay_s: 0.001
"""


def test_load_yaml(tmp_path) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(YAML)
    prob = load_problem(path)
    assert [d.name for d in prob.devices] == ["pi-0", "pi-1", "orin"]
    pi = prob.devices[0]
    assert (pi.speed, pi.uplink_bps, pi.downlink_bps, pi.delay_s, pi.memory_bytes) == (0.5, 8e6, 16e6, 0.005, 1024)
    assert prob.model.fwd_s == pytest.approx((0.01, 0.02, 0.03, 0.04))
    assert prob.model.bwd_s == (0.0,) * 4
    assert device_time(prob, 0, 1, 3, 0.5)[0] == pytest.approx(0.122125)
    assert load_problem(path, "training").mode == "training"


def test_json_round_trip(tmp_path) -> None:
    prob = random_problem(7, 3, 5, "training", memory=True, batches_per_round=4)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(problem_to_dict(prob)))
    assert load_problem(path) == prob


def test_fixed_costs_in_the_planning_input(tmp_path) -> None:
    import dataclasses

    prob = random_problem(8, 2, 5, "inference")
    prob = dataclasses.replace(prob, model=dataclasses.replace(prob.model, tail_call_s=0.00015, body_call_s=0.0004),
                               devices=(dataclasses.replace(prob.devices[0], edge_request_s=0.0008),
                                        *prob.devices[1:]))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(problem_to_dict(prob)))
    assert load_problem(path) == prob
    text = YAML.replace("count: 2", "count: 2\n    edge_request: 0.8ms\n    uplink_burst: 36KiB").replace(
        "act_bytes: [1000", "tail_call_ms: 0.15\n  body_call_ms: 0.4\n  act_bytes: [1000")
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(text)
    loaded = load_problem(yaml_path)
    assert loaded.model.tail_call_s == pytest.approx(0.00015) and loaded.model.body_call_s == pytest.approx(0.0004)
    assert [d.edge_request_s for d in loaded.devices] == pytest.approx([0.0008, 0.0008, 0.0])  # pi x2, orin
    assert [d.uplink_burst_bytes for d in loaded.devices] == [36 * 1024, 36 * 1024, 0]
    assert load_problem(_dump(tmp_path, loaded)) == loaded  # bursts survive the JSON form


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("model: {name: x, fwd_s: [1, 1]}\ndevices: []\n", "edge_fwd"),
        (YAML.replace("count: 2", "cuont: 2"), "unknown key"),
        (YAML.replace("uplink: 8mbit", "uplink: fast"), "cannot parse"),
        (YAML.replace("mode: inference", "mode: serving"), "mode"),
        (YAML.replace("act_bytes: [1000, 2000, 500, 250, 10]", "act_bytes: [1, 2]"), "act_bytes"),
    ],
)
def test_load_errors_are_planning_errors(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PlanningError, match=message):
        load_problem(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(PlanningError, match="does not exist"):
        load_problem(tmp_path / "nope.yaml")


def test_problem_from_dict_needs_devices() -> None:
    with pytest.raises(PlanningError, match="devices"):
        problem_from_dict({"model": problem_to_dict(problem())["model"]})


def _dump(tmp_path, prob: PlanningProblem):
    path = tmp_path / "dumped.json"
    path.write_text(json.dumps(problem_to_dict(prob)))
    return path
