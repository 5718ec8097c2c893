"""The profile store: YAML round trips, validation with clear errors, conversion to the planner's ModelProfile."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import TestbedError
from testbed.planning.model import ModelProfile
from testbed.profiling.records import BatchTimings, BlockProfile, LinkMeasurement, ProfileError, Stat, to_model_profile
from testbed.profiling.store import (
    FORMAT,
    MEASURED_DIR,
    default_link_path,
    default_profile_path,
    load_block_profile,
    load_link_measurement,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    save_profile,
)

SHAPES = ((1, 4, 4), (2, 4, 4), (2, 2, 2), (5,))


def stat(ms: float, n: int = 10) -> Stat:
    s = ms * 1e-3
    return Stat(s, s * 0.9, s * 1.2, n)


def make_profile(*, training: bool = False, batches: tuple[int, ...] = (1, 4), runtime: str | None = None,
                 scale: float = 1.0, model: str = "toy", speed: float = 6.0) -> BlockProfile:
    runtime = runtime or ("torch" if training else "onnxruntime")
    out = []
    for b in batches:
        fwd = tuple(stat(scale * b * t) for t in (0.5, 1.0, 0.25))
        bwd = tuple(stat(scale * b * 2 * t) for t in (0.5, 1.0, 0.25)) if training else None
        out.append(BatchTimings(b, fwd, stat(scale * b * 1.7), bwd, stat(scale * b * 3.4) if training else None))
    return BlockProfile(
        model=model, config={"width": 2}, weights_hash="ab" * 32, runtime=runtime, device="cpu", threads=1,
        training=training, warmup=2, repeats=10, method="block" if runtime == "torch" else "prefix",
        act_shapes=SHAPES, param_bytes=(100, 2000, 30), batches=tuple(out), speed_vs_pi4=speed,
        speed_source="test", host={"hostname": "testhost", "cpu": "imaginary"}, created="2025-01-01T00:00:00Z",
    )


def make_link(downlink: float | None = 2e8) -> LinkMeasurement:
    return LinkMeasurement(
        endpoint="tcp://10.0.0.1:5555", rtt=Stat(0.002, 0.0018, 0.0025, 20), sizes=(1000, 100000),
        uplink_rtt=(Stat(0.0021, 0.002, 0.0023, 20), Stat(0.006, 0.005, 0.007, 20)), uplink_bps=1e8,
        downlink_bps=downlink, echo_rtt=None if downlink is None else (stat(2.2, 20), stat(10, 20)),
        downlink_method="none" if downlink is None else "empty-body", host={"hostname": "dev1"}, notes="n",
    )


def assert_stats_close(a: tuple[Stat, ...] | None, b: tuple[Stat, ...] | None) -> None:
    assert (a is None) == (b is None)
    for x, y in zip(a or (), b or (), strict=True):
        for f in ("median", "p10", "p90"):
            assert getattr(x, f) == pytest.approx(getattr(y, f), abs=1e-9)
        assert x.n == y.n


def test_stat_of_samples() -> None:
    s = Stat.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.median, s.n) == (3.0, 5)
    assert s.p10 == pytest.approx(1.4) and s.p90 == pytest.approx(4.6)
    assert s.spread == pytest.approx(3.2 / 3)
    with pytest.raises(ProfileError):
        Stat.of([])
    with pytest.raises(ProfileError):
        Stat.of([1.0, -1.0])
    with pytest.raises(ProfileError, match="p10 <= median"):
        Stat(1.0, 2.0, 3.0, 3)
    with pytest.raises(ProfileError):
        Stat(math.nan, 0.0, 1.0, 3)


@pytest.mark.parametrize("training", [False, True])
def test_block_profile_round_trip(tmp_path: Path, training: bool) -> None:
    prof = make_profile(training=training)
    path = save_profile(prof, tmp_path / "sub" / "p.yaml")
    back = load_block_profile(path)
    assert (back.model, back.config, back.runtime, back.training, back.method) == \
        (prof.model, prof.config, prof.runtime, prof.training, prof.method)
    assert back.act_shapes == prof.act_shapes and back.param_bytes == prof.param_bytes
    assert back.batch_sizes == (1, 4) and back.host == prof.host and back.speed_vs_pi4 == 6.0
    for a, b in zip(prof.batches, back.batches, strict=True):
        assert_stats_close(a.fwd, b.fwd)
        assert_stats_close(a.bwd, b.bwd)
        assert_stats_close((a.model_fwd,), (b.model_fwd,))
    text = path.read_text()
    assert "fwd_ms:" in text and f"format: {FORMAT}" in text
    assert isinstance(load_profile(path), BlockProfile)


def test_link_round_trip(tmp_path: Path) -> None:
    link = make_link()
    back = load_link_measurement(save_profile(link, tmp_path / "l.yaml"))
    assert back.uplink_bps == 1e8 and back.downlink_bps == 2e8 and back.downlink_method == "empty-body"
    assert back.delay_s == pytest.approx(0.001) and back.sizes == (1000, 100000)
    assert_stats_close(back.uplink_rtt, link.uplink_rtt)
    assert_stats_close(back.echo_rtt, link.echo_rtt)
    none = load_link_measurement(save_profile(make_link(None), tmp_path / "l2.yaml"))
    assert none.downlink_bps is None and none.echo_rtt is None


def test_idle_wait_round_trips_older_files_load_and_bad_values_are_refused(tmp_path: Path) -> None:
    served = dataclasses.replace(make_profile(), idle_s=0.02)
    assert load_block_profile(save_profile(served, tmp_path / "p.yaml")).idle_s == pytest.approx(0.02)
    old = profile_to_dict(make_profile())
    del old["measurement"]["idle_ms"]  # a file written before the idle wait existed
    assert profile_from_dict(old).idle_s == 0.0
    bad = profile_to_dict(served)
    bad["measurement"]["idle_ms"] = -5
    with pytest.raises(ProfileError, match="idle"):
        profile_from_dict(bad)
    with pytest.raises(ProfileError, match="idle"):
        dataclasses.replace(served, idle_s=float("nan"))


def test_the_body_wake_up_of_a_torch_edge_profile_reaches_the_model() -> None:
    device = make_profile()
    edge = make_profile(runtime="torch", scale=0.1)
    woken = dataclasses.replace(edge, batches=tuple(dataclasses.replace(b, call=stat(0.4)) for b in edge.batches))
    assert to_model_profile(device, woken, batch_size=4, edge_scale=2.0).body_call_s == pytest.approx(0.2e-3)
    assert to_model_profile(device, edge, batch_size=4).body_call_s == 0.0  # not measured
    # An onnxruntime profile standing in for the edge: its call is a tail's session call, not a wake-up.
    with_call = dataclasses.replace(device, batches=tuple(dataclasses.replace(b, call=stat(0.4))
                                                          for b in device.batches))
    assert to_model_profile(with_call, batch_size=4).body_call_s == 0.0


def test_fixed_costs_round_trip_and_older_files_load(tmp_path: Path) -> None:
    """The per-call cost (call_ms) and the edge's request handling (request_rtt_ms, edge_request_ms) are stored;
    files written before them load with the costs unmeasured."""
    prof = make_profile()
    with_call = dataclasses.replace(prof, batches=tuple(dataclasses.replace(b, call=stat(0.15 * b.batch_size))
                                                        for b in prof.batches))
    back = load_block_profile(save_profile(with_call, tmp_path / "p.yaml"))
    assert [b.call.median for b in back.batches] == pytest.approx([0.15e-3, 0.6e-3])
    assert to_model_profile(back, batch_size=4).tail_call_s == pytest.approx(0.6e-3)
    # No call measured (an older file): 0; a block-method profile sums single-block calls already: 0.
    old = profile_to_dict(prof)
    assert all("call_ms" not in b for b in old["batches"])
    assert to_model_profile(profile_from_dict(old), batch_size=1).tail_call_s == 0.0
    assert to_model_profile(dataclasses.replace(with_call, method="block"), batch_size=1).tail_call_s == 0.0
    link = dataclasses.replace(make_link(), request_bytes=4096, request_rtt=stat(3.0, 20),
                               request_echo_rtt=stat(2.1, 20), edge_request_s=0.0009)
    back_link = load_link_measurement(save_profile(link, tmp_path / "l.yaml"))
    assert back_link.edge_request_s == pytest.approx(0.0009) and back_link.request_bytes == 4096
    assert_stats_close((back_link.request_rtt, back_link.request_echo_rtt), (link.request_rtt, link.request_echo_rtt))
    assert back_link.request_residence is None and "request_residence_ms" not in profile_to_dict(link)
    # The edge-clock residences round-trip too, and an edge_request file without them (older) still loads.
    stamped = dataclasses.replace(link, request_residence=stat(0.95, 20), request_echo_residence=stat(0.05, 20))
    back_stamped = load_link_measurement(save_profile(stamped, tmp_path / "s.yaml"))
    assert_stats_close((back_stamped.request_residence, back_stamped.request_echo_residence),
                       (stamped.request_residence, stamped.request_echo_residence))
    with pytest.raises(ProfileError, match="request_residence"):
        dataclasses.replace(stamped, request_echo_residence=None)
    bursty = dataclasses.replace(make_link(), uplink_burst_bytes=36_000, downlink_burst_bytes=3000)
    back_bursty = load_link_measurement(save_profile(bursty, tmp_path / "b.yaml"))
    assert (back_bursty.uplink_burst_bytes, back_bursty.downlink_burst_bytes) == (36_000, 3000)
    with pytest.raises(ProfileError, match="uplink_burst_bytes"):
        dataclasses.replace(bursty, uplink_burst_bytes=-1)
    old_link = profile_to_dict(make_link())
    for key in ("uplink_burst_bytes", "downlink_burst_bytes"):
        del old_link[key]
    assert profile_from_dict(old_link).uplink_burst_bytes == 0
    old_link = profile_to_dict(make_link())
    for key in ("request_bytes", "request_rtt_ms", "request_echo_rtt_ms", "edge_request_ms"):
        del old_link[key]
    loaded = profile_from_dict(old_link)
    assert isinstance(loaded, LinkMeasurement) and loaded.edge_request_s is None and loaded.request_rtt is None
    bad = {**profile_to_dict(link), "edge_request_ms": -1.0}
    with pytest.raises(ProfileError, match="edge_request_s"):
        profile_from_dict(bad, "x.yaml")
    with pytest.raises(ProfileError, match="go together"):
        dataclasses.replace(link, request_echo_rtt=None)


def test_kind_mismatch_and_missing_file(tmp_path: Path) -> None:
    link_path = save_profile(make_link(), tmp_path / "l.yaml")
    block_path = save_profile(make_profile(), tmp_path / "b.yaml")
    with pytest.raises(ProfileError, match="is a link measurement"):
        load_block_profile(link_path)
    with pytest.raises(ProfileError, match="is a block profile"):
        load_link_measurement(block_path)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)


def _mutated(tmp_path: Path, change) -> Path:
    data = profile_to_dict(make_profile())
    change(data)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="testbed.profile/0"), "format"),
    (lambda d: d.update(kind="other"), "kind"),
    (lambda d: d.pop("batches"), "missing batches"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["batches"][0]["fwd_ms"]["median"].pop(), "one per block"),
    (lambda d: d["batches"][0]["fwd_ms"]["median"].__setitem__(1, -1.0), r"batches\[0\].fwd_ms\[1\]"),
    (lambda d: d["batches"][0]["fwd_ms"]["median"].__setitem__(1, "fast"), "finite number"),
    (lambda d: d["act_shapes"].pop(), "activation shapes"),
    (lambda d: d["measurement"].update(runtime="tvm"), "runtime"),
    (lambda d: d["measurement"].update(training=True), "trains with torch"),
    (lambda d: d["measurement"].update(training=True, runtime="torch", method="block"), "backward"),
    (lambda d: d["measurement"].update(method="magic"), "method"),
    (lambda d: d["model"].update(num_blocks=7), "num_blocks"),
    (lambda d: d.update(act_bytes_per_sample=[1, 2, 3, 4]), "act_bytes_per_sample"),
    (lambda d: d["reference"].update(speed_vs_pi4=0), "speed_vs_pi4"),
    (lambda d: d["batches"].append(dict(d["batches"][0])), "measured twice"),
])
def test_validation_names_file_and_field(tmp_path: Path, change, message: str) -> None:
    path = _mutated(tmp_path, change)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, TestbedError)


def test_profile_invariants() -> None:
    with pytest.raises(ProfileError, match="torch"):
        make_profile(training=True, runtime="onnxruntime")
    with pytest.raises(ProfileError, match="no batch size 3"):
        make_profile().batch(3)
    assert make_profile().act_bytes_per_sample == (64, 128, 32, 20)
    assert make_profile().act_bytes(4) == (256, 512, 128, 80)


def test_to_model_profile_inference() -> None:
    dev, edge = make_profile(), make_profile(runtime="torch", scale=0.1)
    m = to_model_profile(dev, edge, 4)
    assert isinstance(m, ModelProfile) and m.n_blocks == 3 and m.name == "toy@b4"
    assert m.fwd_s == pytest.approx((2e-3, 4e-3, 1e-3))
    assert m.edge_fwd_s == pytest.approx((2e-4, 4e-4, 1e-4))
    assert m.bwd_s == (0.0,) * 3 and m.edge_bwd_s == (0.0,) * 3
    assert m.act_bytes == (256, 512, 128, 80) and m.param_bytes == (100, 2000, 30)
    # The edge defaults to the device profile; edge_scale divides the edge times.
    same = to_model_profile(dev, batch_size=1, edge_scale=4.0)
    assert same.edge_fwd_s == pytest.approx(tuple(t / 4 for t in same.fwd_s))


def test_to_model_profile_training_and_errors() -> None:
    m = to_model_profile(make_profile(training=True), batch_size=1)
    assert m.bwd_s == pytest.approx((1e-3, 2e-3, 0.5e-3)) and m.edge_bwd_s == m.bwd_s
    with pytest.raises(ProfileError, match="choose a batch size"):
        to_model_profile(make_profile())
    assert to_model_profile(make_profile(batches=(8,))).act_bytes[0] == 512
    with pytest.raises(ProfileError, match="different models"):
        to_model_profile(make_profile(), make_profile(model="other"), 1)
    with pytest.raises(ProfileError, match="no batch size 4"):
        to_model_profile(make_profile(), make_profile(batches=(1,)), 4)
    with pytest.raises(ProfileError, match="edge_scale"):
        to_model_profile(make_profile(), batch_size=1, edge_scale=0)


def test_default_paths() -> None:
    assert default_profile_path(make_profile(), Path("/x")) == Path("/x/testhost-toy-onnxruntime.yaml")
    assert default_profile_path(make_profile(training=True)).name == "testhost-toy-torch-training.yaml"
    assert default_profile_path(make_profile()).parent == MEASURED_DIR
    assert default_link_path(make_link(), Path("/x")) == Path("/x/dev1-link-10.0.0.1-5555.yaml")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=5), min_size=3, max_size=3),
       st.integers(1, 512))
def test_round_trip_property(samples: list[list[float]], batch: int) -> None:
    fwd = tuple(Stat.of(s) for s in samples)
    prof = BlockProfile(
        model="toy", config={}, weights_hash="", runtime="torch", device="cuda:0", threads=2, training=False,
        warmup=0, repeats=5, method="block", act_shapes=SHAPES, param_bytes=(0, 1, 2),
        batches=(BatchTimings(batch, fwd, fwd[0]),), speed_vs_pi4=1.5, speed_source="x",
    )
    back = profile_from_dict(yaml.safe_load(yaml.safe_dump(profile_to_dict(prof))))
    assert isinstance(back, BlockProfile)
    assert_stats_close(back.batches[0].fwd, fwd)
    assert back.device == "cuda:0" and back.batch_sizes == (batch,)


def test_stored_measured_profiles_load() -> None:
    """The profiles measured on the development machine (profiles/measured/) are valid and sane."""
    paths = sorted(MEASURED_DIR.glob("*-cnn-*.yaml"))
    assert paths, "profiles/measured/ should hold the measured cnn profile"
    for path in paths:
        prof = load_block_profile(path)
        assert prof.model == "cnn" and prof.num_blocks == 10
        assert prof.act_bytes_per_sample[0] == 1 * 28 * 28 * 4
        for b in prof.batches:
            total = math.fsum(b.fwd_s)
            assert total > 0 and 0.5 < total / b.model_fwd.median < 2.0
