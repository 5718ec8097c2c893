"""From the stored cnn profiles to a planning problem, solved end to end with LSCRA."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from testbed.lab.devices import load_device_class
from testbed.net.link import load_link_profile
from testbed.planning.lscra import plan_lscra
from testbed.planning.model import device_time, evaluate_plan, split_violations
from testbed.profiling.problem import build_problem, device_speed, link_rates, link_request_s, resolve_link
from testbed.profiling.records import LinkMeasurement, ProfileError, Stat
from testbed.profiling.store import MEASURED_DIR, load_block_profile, save_profile

ORT = MEASURED_DIR / "vm-cnn-onnxruntime.yaml"
TORCH = MEASURED_DIR / "vm-cnn-torch.yaml"
TRAIN = MEASURED_DIR / "vm-cnn-torch-training.yaml"


def measured_link(downlink: float | None = 5e8) -> LinkMeasurement:
    return LinkMeasurement(
        endpoint="tcp://10.1.0.1:5555", rtt=Stat(0.004, 0.0035, 0.005, 10), sizes=(1000, 100000),
        uplink_rtt=(Stat(0.0041, 0.004, 0.0045, 10), Stat(0.006, 0.0055, 0.007, 10)), uplink_bps=4e8,
        downlink_bps=downlink, downlink_method="none" if downlink is None else "empty-body",
    )


def test_stored_profiles_exist() -> None:
    for path in (ORT, TORCH, TRAIN):
        assert path.is_file(), f"{path} is the measured fixture (make it with `testbed profile`)"


def test_inference_problem_from_the_stored_profile_solves() -> None:
    dev = load_block_profile(ORT)
    problem = build_problem(ORT, ["5g-sub6", "wifi6"], devices=5, device_classes=["raspberry-pi-4", "raspberry-pi-5"],
                            edge_profile=TORCH, batch_size=1)
    assert problem.n_devices == 5 and problem.mode == "inference" and problem.model.n_blocks == 10
    names = [d.name for d in problem.devices]
    assert len(set(names)) == 5 and names[0] == "raspberry-pi-4-5g-sub6-0" and names[3] == "raspberry-pi-5-wifi6-3"
    # Speeds: class speed over the speed of the machine that measured the profile.
    pi4, pi5 = load_device_class("raspberry-pi-4"), load_device_class("raspberry-pi-5")
    assert problem.devices[0].speed == pytest.approx(pi4.speed_vs_pi4 / dev.speed_vs_pi4)
    assert problem.devices[1].speed == pytest.approx(pi5.speed_vs_pi4 / dev.speed_vs_pi4)
    assert problem.devices[2].speed == problem.devices[0].speed  # classes cycle
    # Links cycle too; rates and the mean one-way delay come from the link profile.
    sub6 = load_link_profile("5g-sub6").spec
    d0 = problem.devices[0]
    assert (d0.uplink_bps, d0.downlink_bps) == (sub6.uplink.rate_bps, sub6.downlink.rate_bps)
    assert d0.delay_s == pytest.approx((sub6.uplink.delay_us + sub6.downlink.delay_us) / 2e6)
    assert d0.memory_bytes == pi4.memory_mb * 2**20
    # The model: device times from the onnxruntime profile, edge times from the torch one, bytes per batch.
    assert problem.model.fwd_s == dev.batch(1).fwd_s
    assert problem.model.edge_fwd_s == load_block_profile(TORCH).batch(1).fwd_s
    assert problem.model.act_bytes == dev.act_bytes(1)

    plan = plan_lscra(problem)
    assert plan.feasible and math.isfinite(plan.round_s) and plan.total_share <= 1 + 1e-9
    for i, d in enumerate(plan.devices):
        assert not split_violations(problem, i, d.a, d.b)
    assert evaluate_plan(problem, "check", [(d.a, d.b) for d in plan.devices],
                         [d.share for d in plan.devices]).round_s == pytest.approx(plan.round_s, rel=1e-6)


def test_training_problem_solves_with_a_common_split() -> None:
    problem = build_problem(TRAIN, ["lte"], devices=3, mode="training", device_classes=["jetson-orin-nano"],
                            edge_class="edge-gpu", batch_size=8)
    train = load_block_profile(TRAIN)
    scale = load_device_class("edge-gpu").speed_vs_pi4 / train.speed_vs_pi4
    assert problem.model.bwd_s == train.batch(8).bwd_s
    assert problem.model.edge_bwd_s == pytest.approx(tuple(t / scale for t in train.batch(8).bwd_s))
    plan = plan_lscra(problem)
    assert plan.feasible and len({(d.a, d.b) for d in plan.devices}) == 1


def test_training_needs_backward_times() -> None:
    with pytest.raises(ProfileError, match="measured for inference"):
        build_problem(ORT, ["lte"], mode="training", batch_size=1)
    with pytest.raises(ProfileError, match="edge profile"):
        build_problem(TRAIN, ["lte"], mode="training", edge_profile=TORCH, batch_size=1)


def test_without_classes_every_device_is_the_measuring_machine() -> None:
    problem = build_problem(ORT, "wifi6", devices=2, batch_size=8)
    assert [d.speed for d in problem.devices] == [1.0, 1.0] and problem.devices[0].memory_bytes is None
    assert problem.model.edge_fwd_s == problem.model.fwd_s
    assert problem.model.act_bytes[0] == 8 * 28 * 28 * 4
    assert plan_lscra(problem).feasible


def test_measured_links(tmp_path: Path) -> None:
    link = measured_link()
    assert link_rates(link) == (4e8, 5e8, 0.002)
    path = save_profile(link, tmp_path / "link.yaml")
    assert isinstance(resolve_link(path), LinkMeasurement)
    assert isinstance(resolve_link(str(path)), LinkMeasurement)
    problem = build_problem(ORT, [path, "5g-mmwave"], devices=2, batch_size=1)
    assert problem.devices[0].uplink_bps == 4e8 and problem.devices[0].delay_s == pytest.approx(0.002)
    assert problem.devices[0].name.startswith("device-measured:10.1.0.1")
    assert problem.devices[1].name == "device-5g-mmwave-1"
    with pytest.raises(ProfileError, match="no downlink rate"):
        build_problem(ORT, [measured_link(None)], batch_size=1)


def test_measured_edge_request_handling_reaches_the_devices() -> None:
    """A measured link's edge_request_s goes to its devices; a link profile (or an older measurement) gives 0."""
    link = dataclasses.replace(measured_link(), edge_request_s=0.0007)
    assert link_request_s(link) == 0.0007 and link_request_s(measured_link()) == 0.0
    problem = build_problem(ORT, [link, "5g-mmwave"], devices=2, batch_size=1)
    assert [d.edge_request_s for d in problem.devices] == [0.0007, 0.0]
    _, st = device_time(problem, 0, 2, 5, 1.0)
    assert st["edge_request"] == pytest.approx(0.0007)


def test_stored_loopback_link_plans() -> None:
    """The link measured on loopback against a real edge (profiles/measured/) feeds a plan."""
    stored = MEASURED_DIR / "vm-link-loopback.yaml"
    link = resolve_link(stored)
    assert isinstance(link, LinkMeasurement) and link.downlink_bps is not None
    problem = build_problem(ORT, [stored], devices=2, device_classes=["raspberry-pi-4"], edge_profile=TORCH,
                            batch_size=8)
    assert problem.devices[0].uplink_bps == link.uplink_bps and problem.devices[0].delay_s == link.delay_s
    assert plan_lscra(problem).feasible


def test_unlimited_links_need_a_rate() -> None:
    with pytest.raises(ProfileError, match="unlimited"):
        build_problem(ORT, ["unshaped"], batch_size=1)
    problem = build_problem(ORT, ["unshaped"], batch_size=1, unlimited_rate_bps=1e9)
    assert problem.devices[0].uplink_bps == 1e9 and problem.devices[0].delay_s == 0.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"links": []}, "at least one link"),
    ({"links": ["no-such-link"]}, "unknown link profile"),
    ({"device_classes": ["toaster"]}, "unknown device class"),
    ({"devices": 0}, "devices"),
    ({"mode": "magic"}, "mode"),
    ({"batch_size": 3}, "no batch size 3"),
    ({"batch_size": None}, "choose a batch size"),
    ({"edge_profile": TRAIN}, None),  # an inference problem may take a training profile's forward times
    ({"min_head": 6, "min_tail": 5}, "exceeds"),
    ({"unlimited_rate_bps": -1}, "unlimited_rate_bps"),
])
def test_bad_inputs(kwargs: dict, message: str | None) -> None:
    args = {"links": ["lte"], "batch_size": 1, **kwargs}
    links = args.pop("links")
    if message is None:
        assert build_problem(ORT, links, **args).n_devices == 1
        return
    with pytest.raises(ProfileError, match=message):
        build_problem(ORT, links, **args)


def test_device_speed_is_a_ratio_of_class_speeds() -> None:
    prof = load_block_profile(ORT)
    assert device_speed(prof, None) == 1.0
    host_like = load_device_class("host")
    if prof.speed_vs_pi4 == host_like.speed_vs_pi4:
        assert device_speed(prof, host_like) == 1.0
