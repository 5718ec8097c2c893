"""The `testbed run` experiment file: the shipped examples parse, and every kind of mistake gets a clear line."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.controller.replan import ReplanPolicy
from testbed.controller.runspec import (
    CACHED_WEIGHTS,
    PlacementSpec,
    RunSpecError,
    load_runspec,
    parse_runspec,
)
from testbed.errors import TestbedError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "experiments").glob("run-*.yaml"))

BASE: dict[str, Any] = {
    "name": "t",
    "model": {"name": "cnn"},
    "placement": {"kind": "lab"},
    "devices": [
        {"id": "dev1", "class": "raspberry-pi-4", "link": "6g-vision"},
        {"id": "dev2", "class": "raspberry-pi-5", "link": "lte", "split": [3, 7]},
    ],
    "workload": {"batch_size": 8, "duration": "60s"},
    "link_changes": [{"at": "30s", "device": "dev1", "link": "lte"}],
}


def _parse(**changes: Any) -> Any:
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return parse_runspec(doc, source="t.yaml", base_dir=ROOT)


_DROP = object()


def _problems(**changes: Any) -> list[str]:
    with pytest.raises(RunSpecError) as info:
        _parse(**changes)
    assert isinstance(info.value, TestbedError)
    lines = str(info.value).splitlines()
    assert lines[0] == "t.yaml is not a valid run experiment:"
    return [line.strip() for line in lines[1:]]


def _one(**changes: Any) -> str:
    problems = _problems(**changes)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------------------------
# Valid files


def test_there_are_run_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"run-lab-resplit.yaml", "run-loopback.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_run_experiment_parses(path: Path) -> None:
    spec = load_runspec(path, base_dir=ROOT)
    assert spec.name == path.stem
    assert spec.devices and spec.model.num_blocks >= 2
    ids = [d.id for d in spec.devices]
    assert len(set(ids)) == len(ids)
    assert all(c.device in ids for c in spec.link_changes)


def test_the_resplit_example_drops_one_device_from_6g_to_lte() -> None:
    spec = load_runspec(ROOT / "experiments" / "run-lab-resplit.yaml", base_dir=ROOT)
    assert spec.placement.kind == "lab" and len(spec.devices) >= 2
    change = spec.link_changes[0]  # the first change: one device falls from 6G to LTE (later ones may restore it)
    before = next(d.link for d in spec.devices if d.id == change.device)
    assert before.name.startswith("6g") and change.link.name == "lte"
    assert spec.workload is not None and spec.workload.duration_s is not None
    assert all(0 < c.at_s < spec.workload.duration_s for c in spec.link_changes)


def test_values_are_parsed_resolved_and_defaulted() -> None:
    spec = _parse()
    assert spec.mode == "inference" and spec.weights == CACHED_WEIGHTS and spec.training is None
    assert spec.model.num_blocks == 10 and spec.model.kwargs() == {}
    d1, _ = spec.devices
    assert d1.device_class is not None and d1.device_class.name == "raspberry-pi-4"
    assert d1.link.spec.uplink.rate_bps == 1_000_000_000 and d1.data == "shard" and d1.split is None
    assert spec.fixed_splits == {"dev2": (3, 7)}
    assert spec.workload is not None and spec.workload.duration_s == 60.0 and spec.workload.requests is None
    assert spec.link_changes[0].at_s == 30.0 and spec.link_changes[0].link.name == "lte"
    assert spec.planner.splits == "per-device" and spec.planner.resplit
    assert spec.planner.policy() == ReplanPolicy(common=False)
    assert spec.planner.estimator().window == 9
    assert spec.placement.lab_prefix == "tb" and spec.edge.device == "auto"
    assert spec.metrics.enabled and not spec.metrics.prometheus and spec.metrics.scrape_interval_s == 1.0
    assert spec.output == ROOT / "runs" / "t"


def test_human_units_and_shorthands() -> None:
    spec = _parse(planner={"min_interval": "1500ms", "evaluate_every": "250ms", "margin": 0.2,
                           "estimator": {"time_constant": "3s", "window": 5}},
                  workload={"requests": 100, "rate": "25/s"}, link_changes=_DROP, metrics=False,
                  placement="loopback", model="cnn")
    assert spec.planner.min_interval_s == 1.5 and spec.planner.evaluate_every_s == 0.25
    assert spec.planner.policy().min_interval_s == 1.5 and spec.planner.policy().margin == 0.2
    assert spec.planner.estimator().time_constant_s == 3.0
    assert spec.workload is not None and spec.workload.rate_rps == 25.0 and spec.workload.requests == 100
    assert not spec.metrics.enabled and spec.placement.kind == "loopback"


def test_link_changes_are_sorted_by_time() -> None:
    spec = _parse(link_changes=[{"at": "40s", "device": "dev2", "link": "5g-sub6"},
                                {"at": "10s", "device": "dev1", "link": "lte"}])
    assert [c.at_s for c in spec.link_changes] == [10.0, 40.0]


def test_training_mode_references_a_training_experiment() -> None:
    devices = [{"id": f"d{i}", "link": "5g-sub6"} for i in range(4)]  # psl-iid has 4 devices
    spec = _parse(mode="training", training="experiments/psl-iid.yaml", devices=devices, workload=_DROP,
                  link_changes=_DROP, model=_DROP)
    assert spec.training == ROOT / "experiments" / "psl-iid.yaml" and spec.weights is None
    assert spec.model.name == "cnn" and spec.planner.splits == "common" and spec.workload is None


def test_inventory_placement(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yml"
    inv.write_text("all: {}\n")
    spec = _parse(placement={"kind": "inventory", "inventory": str(inv)})
    assert spec.placement.inventory == inv


def test_weights_file(tmp_path: Path) -> None:
    from testbed.models import build_model, save_weights

    path = tmp_path / "cnn.safetensors"
    save_weights(build_model("cnn"), path)
    assert _parse(weights=str(path)).weights == path


# ---------------------------------------------------------------------------------------------
# One clear line per mistake


def test_unknown_keys_suggest_the_intended_one() -> None:
    assert _one(worklaod={}) == "worklaod: unknown key (did you mean 'workload'?)"
    doc = copy.deepcopy(BASE["devices"])
    doc[0]["lnik"] = "lte"
    assert "devices[0].lnik: unknown key (did you mean 'link'?)" in _problems(devices=doc)
    assert _one(planner={"estimator": {"tau": "1s"}}).startswith("planner.estimator.tau: unknown key; known: ")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"workload": {"batch_size": "8", "duration": "60s"}}, "workload.batch_size: expected an integer, got a string"),
    ({"planner": {"margin": "10%"}}, "planner.margin: expected a finite number, got a string"),
    ({"planner": {"resplit": "yes"}}, "planner.resplit: expected true or false, got a string"),
    ({"devices": "dev1"}, "devices: expected a non-empty list"),
    ({"metrics": {"enabled": 1}}, "metrics.enabled: expected true or false, got an integer"),
    ({"edge": {"threads": 0}}, "edge.threads: must be between 1 and 256, got 0"),
    ({"mode": "serving"}, "mode: expected one of inference, training, got 'serving'"),
    ({"edge": {"device": "gpu"}}, "edge.device: expected one of auto, cpu, cuda, got 'gpu'"),
    ({"name": "a b"}, "name: expected a short name"),
])
def test_wrong_types_and_values(changes: dict, expected: str) -> None:
    assert _one(**changes).startswith(expected)


def test_the_planner_or_a_baseline_to_measure_it_against() -> None:
    devices = copy.deepcopy(BASE["devices"])
    del devices[1]["split"]
    for algorithm in ("lscra", "fixed-middle", "neurosurgeon", "device-only"):
        assert _parse(devices=devices, planner={"algorithm": algorithm}).planner.algorithm == algorithm
    assert _parse(devices=devices).planner.algorithm == "lscra"
    assert _one(devices=devices, planner={"algorithm": "neurosurgon"}) == (
        "planner.algorithm: expected one of lscra, fixed-middle, neurosurgeon, device-only, got 'neurosurgon' "
        "(did you mean 'neurosurgeon'?)")
    assert _one(planner={"algorithm": "device-only"}) == (
        "planner.algorithm: the device-only baseline chooses every split itself, but devices pin 3:7 "
        "(pinned splits need lscra)")


def test_durations_need_a_unit() -> None:
    assert _one(workload={"duration": 60}) == "workload.duration: duration 60 has no unit: write e.g. '60ms' or '60us'"
    assert "unknown unit 'min'" in _one(planner={"min_interval": "1min"})


@pytest.mark.parametrize("split", [[0, 5], [5, 3], [1, 10], [4, 12]])
def test_impossible_splits_name_the_valid_range(split: list[int]) -> None:
    devices = copy.deepcopy(BASE["devices"])
    devices[1]["split"] = split
    line = _one(devices=devices)
    assert line.startswith(f"devices[1].split: impossible split {split}".replace("[", "[", 1))
    assert "L=10 blocks: need 1 <= a <= b <= 9" in line


def test_a_split_that_is_not_a_pair() -> None:
    devices = copy.deepcopy(BASE["devices"])
    devices[1]["split"] = [3, "7"]
    assert _one(devices=devices) == "devices[1].split: expected [a, b] with integers, got [3, '7']"


def test_unknown_link_profiles_and_classes_list_the_known_ones() -> None:
    devices = copy.deepcopy(BASE["devices"])
    devices[0]["link"] = "7g"
    devices[1]["class"] = "raspberry-pi-9"
    one, two = _problems(devices=devices)
    assert one.startswith("devices[0].link: unknown link profile '7g'; known profiles in ")
    assert "lte" in one and "6g-vision" in one
    assert two.startswith("devices[1].class: unknown device class 'raspberry-pi-9'; known: ")
    assert "raspberry-pi-4" in two


def test_unknown_model_lists_the_zoo() -> None:
    line = _one(model={"name": "vgg"}, devices=[{"id": "dev1"}], link_changes=_DROP)
    assert line.startswith("model: unknown model 'vgg'; known models: cnn")


def test_bad_model_options() -> None:
    line = _one(model={"name": "cnn", "config": {"depth": 3}}, devices=[{"id": "dev1"}], link_changes=_DROP)
    assert line.startswith("model: model 'cnn' does not accept config key(s) depth")


def test_duplicate_and_bad_device_ids() -> None:
    devices = [{"id": "dev1"}, {"id": "dev2"}, {"id": "dev1"}, {"id": "edge"}, {"id": "9x"}]
    problems = _problems(devices=devices, link_changes=_DROP)
    assert "devices[2].id: duplicate device id 'dev1' (also devices[0])" in problems
    assert sum(p.startswith("devices[3].id: expected a name") for p in problems) == 1
    assert sum(p.startswith("devices[4].id: expected a name") for p in problems) == 1


def test_link_changes_must_name_known_devices_and_fall_within_the_run() -> None:
    problems = _problems(link_changes=[
        {"at": "30s", "device": "dev3", "link": "lte"},
        {"at": "60s", "device": "dev1", "link": "lte"},
        {"at": "10s", "device": "dev1", "link": "8g"},
        {"at": "10s", "device": "dev2"},
        {"at": "5s", "device": "dve1", "link": "lte"},
    ])
    assert problems[0].startswith("link_changes[0].device: unknown device 'dev3' (did you mean 'dev")
    assert problems[1] == ("link_changes[1].at: 60s is not before the end of the run (workload.duration 60 s)")
    assert problems[2].startswith("link_changes[2].link: unknown link profile '8g'")
    assert problems[3] == "link_changes[3]: missing link"
    assert problems[4] == "link_changes[4].device: unknown device 'dve1' (did you mean 'dev1'?)"
    assert len(problems) == 5


def test_link_changes_need_shaped_links_and_a_timed_run() -> None:
    assert _one(placement="loopback").startswith("link_changes: loopback has no shaped links to change")
    assert _one(workload={"requests": 10}).startswith("link_changes: link changes are timed")
    line = _one(link_changes=[{"at": "1s", "device": "dev1", "link": "lte"},
                              {"at": "1s", "device": "dev1", "link": "wifi6"}])
    assert line == "link_changes: two changes of 'dev1' at 1 s"


def test_workload_needs_exactly_one_of_requests_and_duration() -> None:
    assert _one(workload={"requests": 10, "duration": "5s"}, link_changes=_DROP).startswith(
        "workload: give exactly one of requests")
    assert _one(workload={}, link_changes=_DROP).startswith("workload: give exactly one of requests")
    assert _one(workload={"duration": "60s", "rate": "fast"}).startswith("workload.rate: expected requests per")


def test_placement_errors(tmp_path: Path) -> None:
    assert _one(placement="cloud").startswith("placement: expected one of loopback, lab, inventory, got 'cloud'")
    assert _one(placement="inventory").startswith("placement: give the inventory")
    assert _one(placement={"kind": "inventory", "inventory": "nowhere.yml"}).startswith(
        "placement.inventory: inventory ")
    assert _one(placement={"kind": "lab", "prefix": "Lab-1"}).startswith("placement.prefix: expected a lab prefix")
    assert _one(placement={"kind": "inventory"}) == (
        "placement.inventory: required for kind: inventory (an Ansible inventory file)")


def test_files_that_do_not_exist_or_are_the_wrong_kind() -> None:
    assert _one(weights="nowhere.safetensors").startswith("weights: weights file ")
    assert _one(planner={"device_profile": "profiles/measured/vm-link-loopback.yaml"}).endswith(
        "is a link measurement, not a block profile")
    assert _one(planner={"edge_profile": "missing.yaml"}).startswith("planner.edge_profile: block profile ")


def test_common_splits_cannot_honour_different_pinned_splits() -> None:
    devices = copy.deepcopy(BASE["devices"])
    devices[0]["split"] = [2, 8]
    assert _one(devices=devices, planner={"splits": "common"}).startswith(
        "planner.splits: common needs one split for all devices")


def test_training_mode_errors() -> None:
    two = [{"id": "dev1"}, {"id": "dev2"}]
    assert _one(mode="training", workload=_DROP, link_changes=_DROP, devices=two).startswith(
        "training: required in training")
    problems = _problems(mode="training", training="experiments/psl-iid.yaml", link_changes=_DROP)
    assert any(p.startswith("workload: only for inference") for p in problems)
    assert any(p.startswith("devices[1].split: only for inference") for p in problems)
    assert any(p.startswith("devices: 2 devices listed, the training experiment has 4") for p in problems)
    assert _one(training="experiments/psl-iid.yaml") == "training: only for mode: training"


def test_every_problem_is_listed_at_once() -> None:
    problems = _problems(worklaod={}, edge={"threads": -1}, placement="cloud", metrics={"prometheus": 3})
    assert len(problems) == 4


def test_file_level_errors(tmp_path: Path) -> None:
    bad = tmp_path / "dup.yaml"
    bad.write_text("name: a\nname: b\n")
    with pytest.raises(RunSpecError, match="duplicate key 'name'"):
        load_runspec(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RunSpecError, match="is empty"):
        load_runspec(empty)
    with pytest.raises(RunSpecError, match="cannot read"):
        load_runspec(tmp_path / "missing.yaml")
    with pytest.raises(RunSpecError, match="not valid YAML"):
        (tmp_path / "x.yaml").write_text("a: [1, 2\n")
        load_runspec(tmp_path / "x.yaml")
    with pytest.raises(RunSpecError, match="is a YAML mapping"):
        parse_runspec(["devices"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["30s", "lte", "dev1", "cnn", "lab", "loopback", "per-device"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "link", "at", "device", "kind", "name", "split", "duration", "requests", "x"]),
        inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["name", "mode", "model", "devices", "edge", "placement", "planner",
                                        "workload", "link_changes", "metrics", "output", "weights", "bogus"]),
                       _json, max_size=6))
def test_garbage_gets_a_runspec_error_never_a_traceback(doc: dict) -> None:
    try:
        parse_runspec(doc, base_dir=ROOT)
    except RunSpecError as exc:
        assert str(exc)


# ---------------------------------------------------------------------------------------------
# planner.profile_links and planner.probe_interval


def test_profile_links_defaults_by_placement_and_can_be_set() -> None:
    assert _parse().planner.profile_links is None and _parse().profile_links  # lab: measured links
    loop = _parse(placement="loopback", link_changes=_DROP)
    assert loop.profile_links is False  # loopback: the nominal 'unshaped' link is as good
    assert _parse(planner={"profile_links": False}).profile_links is False
    assert _parse(placement="loopback", link_changes=_DROP, planner={"profile_links": True}).profile_links is True
    inventory = dataclasses.replace(loop, placement=PlacementSpec("inventory", inventory=Path("hosts.yml")))
    assert inventory.profile_links  # `testbed run --inventory` replaces the placement after parsing


def test_probe_interval_is_a_duration_with_a_floor() -> None:
    assert _parse().planner.probe_interval_s == 1.0
    assert _parse(planner={"probe_interval": "250ms"}).planner.probe_interval_s == 0.25
    assert _parse(planner={"probe_interval": "0s"}).planner.probe_interval_s == 0.0  # no probes


@pytest.mark.parametrize(("planner", "expected"), [
    ({"profile_links": "yes"}, "planner.profile_links: expected true or false, got a string 'yes'"),
    ({"profile_links": 1}, "planner.profile_links: expected true or false, got an integer 1"),
    ({"probe_interval": 1}, "planner.probe_interval: duration 1 has no unit"),
    ({"probe_interval": "10ms"}, "planner.probe_interval: must be 0s (no probes) or between 50ms and 3600s, got "
                                 "'10ms'"),
    ({"probe_interval": "4000s"}, "planner.probe_interval: must be 0s (no probes) or between 50ms and 3600s"),
    ({"probe_intervall": "1s"}, "planner.probe_intervall: unknown key (did you mean 'probe_interval'?)"),
])
def test_profile_links_and_probe_interval_errors(planner: dict, expected: str) -> None:
    assert _one(planner=planner).startswith(expected)
