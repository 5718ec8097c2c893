"""Baselines by hand, the exhaustive solver on tiny cases, and the `testbed plan` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from testbed.cli.errors import friendly_errors
from testbed.cli.plan import plan as plan_command
from testbed.planning.baselines import (
    all_baselines,
    device_only,
    edge_only,
    fixed_middle,
    neurosurgeon,
)
from testbed.planning.exhaustive import solve_exhaustive
from testbed.planning.instances import problem_to_dict, random_problem
from testbed.planning.lscra import plan_per_device
from testbed.planning.model import (
    DeviceProfile,
    ModelProfile,
    PlanningProblem,
    device_time,
    split_costs,
    split_violations,
)

MODEL = ModelProfile(
    name="six",
    fwd_s=(0.01, 0.02, 0.03, 0.04, 0.05, 0.06),
    bwd_s=(0.0,) * 6,
    edge_fwd_s=(0.001, 0.002, 0.003, 0.004, 0.005, 0.006),
    edge_bwd_s=(0.0,) * 6,
    act_bytes=(1000, 800, 600, 400, 200, 100, 10),
    param_bytes=(10, 20, 30, 40, 50, 60),
)


def devices(n: int, memory: int | None = None) -> tuple[DeviceProfile, ...]:
    return tuple(DeviceProfile(name=f"d{i}", speed=1.0 + i, uplink_bps=1e7, downlink_bps=1e8, delay_s=0.002,
                               memory_bytes=memory) for i in range(n))


def test_fixed_middle_splits_at_thirds_with_equal_shares() -> None:
    prob = PlanningProblem(MODEL, devices(3))
    plan = fixed_middle(prob)
    assert {(d.a, d.b) for d in plan.devices} == {(2, 4)}
    assert [d.share for d in plan.devices] == pytest.approx([1 / 3] * 3)
    assert plan.round_s == max(device_time(prob, i, 2, 4, 1 / 3)[0] for i in range(3))
    # Clamped by the depth constraints; with 2 blocks the only U-shaped split is device-only.
    assert {(d.a, d.b) for d in fixed_middle(PlanningProblem(MODEL, devices(1), min_head=3)).devices} == {(3, 4)}
    two = ModelProfile("two", (1.0, 1.0), (0.0, 0.0), (0.1, 0.1), (0.0, 0.0), (1, 1, 1), (1, 1))
    p2 = fixed_middle(PlanningProblem(two, devices(2)))
    assert [(d.a, d.b, d.share) for d in p2.devices] == [(1, 1, 0.0), (1, 1, 0.0)]


def test_neurosurgeon_ignores_contention_when_choosing() -> None:
    prob = PlanningProblem(MODEL, devices(3))
    for rule in ("equal", "proportional"):
        plan = neurosurgeon(prob, rule)
        for i, d in enumerate(plan.devices):
            A, S = split_costs(prob, i)
            assert (A + S)[d.a, d.b] == pytest.approx(np.min(A + S))  # best with the whole edge
        users = [d for d in plan.devices if d.a < d.b]
        assert users and math.fsum(d.share for d in users) == pytest.approx(1.0)
        if rule == "proportional":
            work = [split_costs(prob, i)[1][d.a, d.b] for i, d in enumerate(plan.devices) if d.a < d.b]
            assert [d.share for d in users] == pytest.approx([w / sum(work) for w in work])
    # The planner accounts for contention and so is no worse.
    assert plan_per_device(prob).round_s <= neurosurgeon(prob).round_s * (1 + 1e-9)


def test_device_only_runs_the_whole_model_on_the_device() -> None:
    prob = PlanningProblem(MODEL, devices(2))
    plan = device_only(prob)
    for i, d in enumerate(plan.devices):
        assert d.a == d.b and d.share == 0
        assert d.total_s == pytest.approx(sum(MODEL.fwd_s) / prob.devices[i].speed)
    assert plan.round_s == pytest.approx(sum(MODEL.fwd_s))


def test_device_only_infeasible_when_the_model_does_not_fit() -> None:
    prob = PlanningProblem(MODEL, devices(2, memory=150))  # the whole model needs 210 bytes
    plan = device_only(prob)
    assert math.isinf(plan.round_s) and "memory" in plan.note
    assert plan_per_device(prob).feasible  # splitting off a body makes it fit


def test_edge_only_is_a_reference_that_breaks_the_u_shape() -> None:
    prob = PlanningProblem(MODEL, devices(2))
    plan = edge_only(prob)
    assert {(d.a, d.b) for d in plan.devices} == {(0, 6)}
    assert "not U-shaped" in plan.note
    assert split_violations(prob, 0, 0, 6)  # min_head / min_tail
    assert plan.total_share == pytest.approx(1.0)
    assert plan.devices[0].total_s == pytest.approx(plan.devices[1].total_s)  # equalised shares
    st = plan.devices[0].stages
    assert st["head_fwd"] == st["tail_fwd"] == 0
    assert st["uplink_act"] == pytest.approx(1000 * 8 / 1e7 + 0.002)


def test_all_baselines_names() -> None:
    prob = random_problem(0, 4, 8, "training")
    names = list(all_baselines(prob))
    assert names == ["fixed-middle", "neurosurgeon-equal", "neurosurgeon-proportional", "device-only", "edge-only"]


def test_exhaustive_one_device_is_best_split_with_whole_edge() -> None:
    prob = PlanningProblem(MODEL, devices(1))
    A, S = split_costs(prob, 0)
    ex = solve_exhaustive(prob, grid=4)
    assert ex.round_s == pytest.approx(np.min(A + S))
    assert ex.devices[0].share in (0.0, 1.0)


def test_exhaustive_two_identical_devices_split_the_edge_in_half() -> None:
    devs = tuple(DeviceProfile(name=f"d{i}", uplink_bps=1e9, downlink_bps=1e9) for i in range(2))
    prob = PlanningProblem(MODEL, devs)
    ex = solve_exhaustive(prob, grid=10, common=True)
    a, b = ex.devices[0].a, ex.devices[0].b
    if a < b:
        assert [d.share for d in ex.devices] == [0.5, 0.5]
    assert ex.round_s == pytest.approx(plan_per_device(prob).round_s, rel=1e-9)  # 1/2 is on the grid


# ---------------------------------------------------------------------------------------------- the CLI

def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Keeps `plan` a sub-command."""

    app.command("plan")(friendly_errors(plan_command))
    return app


def write_instance(tmp_path, mode: str = "inference"):
    data = problem_to_dict(random_problem(11, 3, 6, mode, memory=True))
    path = tmp_path / "instance.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args: str):
    return CliRunner().invoke(cli(), ["plan", *args], env={"COLUMNS": "200"})


def test_cli_prints_plan_and_baselines(tmp_path) -> None:
    path = write_instance(tmp_path)
    out = tmp_path / "out" / "plan.json"
    result = run("--input", str(path), "--json", str(out))
    assert result.exit_code == 0, result.output
    for text in ("lscra", "dev0", "dev2", "round time", "neurosurgeon-equal", "device-only", "edge-only", "uplink"):
        assert text in result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "inference" and report["plan"]["method"] == "lscra"
    assert len(report["plan"]["devices"]) == 3
    assert report["plan"]["round_s"] <= report["compare"]["fixed-middle"]["round_s"] or \
        report["compare"]["fixed-middle"]["round_s"] is None
    assert report["plan"]["total_share"] <= 1 + 1e-9


def test_cli_training_mode_uses_a_common_split(tmp_path) -> None:
    path = write_instance(tmp_path, "training")
    out = tmp_path / "plan.json"
    result = run("--input", str(path), "--mode", "training", "--json", str(out), "--stages")
    assert result.exit_code == 0, result.output
    assert "head_bwd" in result.output
    report = json.loads(out.read_text())
    assert report["plan"]["method"] == "lscra-common"
    assert len({(d["a"], d["b"]) for d in report["plan"]["devices"]}) == 1
    assert "downlink_grad" in report["plan"]["devices"][0]["stages"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model: [unclosed\n", "not valid YAML"),
        ("model: {}\ndevices: []\n", "fwd"),
        (None, "does not exist"),
    ],
)
def test_cli_bad_input_is_a_clean_error(tmp_path, content: str | None, message: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    result = run("--input", str(path))
    assert result.exit_code == 2
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert message in err and "Traceback" not in result.output + err


def test_cli_bad_mode(tmp_path) -> None:
    result = run("--input", str(write_instance(tmp_path)), "--mode", "serving")
    assert result.exit_code == 2
    assert "--mode" in (result.stderr if hasattr(result, "stderr") else result.output)
