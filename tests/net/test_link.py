"""Link specs and the shipped profiles: every profile loads, carries its source, and matches its figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import TestbedError
from testbed.net.link import (
    MAX_DELAY_US,
    MIN_RATE_BPS,
    PROFILES_DIR,
    DirectionSpec,
    LinkError,
    LinkSpec,
    direction_from_mapping,
    direction_to_mapping,
    list_link_profiles,
    load_link_profile,
)

LINKS = PROFILES_DIR / "links"

# name -> (uplink rate, downlink rate, one-way delay, jitter), from the sources' figures
EXPECTED = {
    "lte": (5_700_000, 29_000_000, 16_500, 0),
    "lte-2021": (35_500_000, 176_000_000, 9_000, 0),
    "5g-lowband": (75_000_000, 199_000_000, 6_000, 0),
    "5g-sub6": (14_600_000, 266_000_000, 23_500, 0),
    "5g-mmwave": (214_000_000, 2_906_000_000, 3_000, 0),
    "wifi6": (900_000_000, 900_000_000, 4_500, 500),
    "imt2020-embb": (50_000_000, 100_000_000, 4_000, 0),
    "6g-imt2030": (300_000_000, 500_000_000, 1_000, 0),
    "6g-vision": (1_000_000_000, 1_000_000_000, 100, 0),
}


def test_link_error_is_a_testbed_error() -> None:
    assert issubclass(LinkError, TestbedError)


def test_direction_defaults_and_needs() -> None:
    assert DirectionSpec() == DirectionSpec(rate_bps=None, delay_us=0, jitter_us=0, loss_ppm=0)
    assert not DirectionSpec(rate_bps=10**8).needs_delay_line_or_netem()
    assert DirectionSpec(delay_us=1).needs_delay_line_or_netem()
    assert DirectionSpec(jitter_us=1).needs_delay_line_or_netem()
    assert DirectionSpec(loss_ppm=1).needs_delay_line_or_netem()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_bps": 0}, "rate_bps = 0 is out of range"),
        ({"rate_bps": MIN_RATE_BPS - 1}, "out of range"),
        ({"rate_bps": 1.5e9}, "must be an int"),
        ({"rate_bps": True}, "must be an int"),
        ({"delay_us": -1}, "delay_us = -1"),
        ({"delay_us": "5ms"}, "must be an int"),
        ({"jitter_us": MAX_DELAY_US + 1}, "jitter_us"),
        ({"loss_ppm": 1_000_001}, "loss_ppm"),
        ({"delay_us": MAX_DELAY_US, "jitter_us": 1}, "delay \\+ jitter"),
    ],
)
def test_direction_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LinkError, match=message):
        DirectionSpec(**kwargs)  # type: ignore[arg-type]


def test_describe_and_rtt() -> None:
    spec = DirectionSpec(rate_bps=100_000_000, delay_us=5000, jitter_us=1000, loss_ppm=1000)
    assert spec.describe() == "100mbit, delay 5ms ± 1ms, loss 0.1%"
    assert DirectionSpec().describe() == "unlimited"
    link = LinkSpec(uplink=spec, downlink=DirectionSpec(delay_us=7000))
    assert link.rtt_us() == 12_000
    assert LinkSpec.unlimited() == LinkSpec.symmetric(DirectionSpec())


directions = st.builds(
    DirectionSpec,
    rate_bps=st.none() | st.integers(MIN_RATE_BPS, 10**13),
    delay_us=st.integers(0, MAX_DELAY_US // 2),
    jitter_us=st.integers(0, MAX_DELAY_US // 2),
    loss_ppm=st.integers(0, 1_000_000),
)


@settings(max_examples=200, deadline=None)
@given(directions)
def test_direction_mapping_round_trip(spec: DirectionSpec) -> None:
    assert direction_from_mapping(direction_to_mapping(spec), "test") == spec


def test_direction_mapping_errors() -> None:
    with pytest.raises(LinkError, match=r"here.rate: rate '100' has no unit"):
        direction_from_mapping({"rate": "100"}, "here")
    with pytest.raises(LinkError, match=r"unknown key\(s\) \['bandwidth'\]"):
        direction_from_mapping({"bandwidth": "1mbit"}, "here")
    with pytest.raises(LinkError, match="expected a mapping"):
        direction_from_mapping(["1mbit"], "here")
    with pytest.raises(LinkError, match="here: rate_bps = 100 is out of range"):
        direction_from_mapping({"rate": "100bit"}, "here")
    assert direction_from_mapping(None, "here") == DirectionSpec()
    assert direction_from_mapping({"delay": "5ms"}, "here") == DirectionSpec(delay_us=5000)


def test_shipped_profiles_all_load_with_sources() -> None:
    profiles = list_link_profiles()
    names = [p.name for p in profiles]
    assert len(profiles) >= 6
    assert set(EXPECTED) <= set(names)
    assert names == sorted(names)
    for profile in profiles:
        assert profile.description and profile.source, profile.name
        assert profile.spec.uplink.loss_ppm == 0 and profile.spec.downlink.loss_ppm == 0, profile.name
        assert profile == load_link_profile(profile.name)
        if profile.name != "unshaped":
            assert "loss" in profile.source.lower(), f"{profile.name}: say why loss is 0"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_figures_match_sources(name: str) -> None:
    up, down, delay, jitter = EXPECTED[name]
    spec = load_link_profile(name).spec
    assert (spec.uplink.rate_bps, spec.downlink.rate_bps) == (up, down)
    assert spec.uplink.delay_us == spec.downlink.delay_us == delay
    assert spec.uplink.jitter_us == spec.downlink.jitter_us == jitter


def test_unshaped_profile_is_unlimited() -> None:
    assert load_link_profile("unshaped").spec == LinkSpec.unlimited()


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(LinkError, match=r"unknown link profile 'lte-9000'.*5g-mmwave.*lte"):
        load_link_profile("lte-9000")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = """\
description: test link
source: made up for a test
uplink: {rate: 10mbit, delay: 5ms, jitter: 1ms, loss: 0.1%}
downlink: {rate: 20mbit, delay: 5ms}
"""


def test_profile_by_path_and_dir(tmp_path: Path) -> None:
    path = _write(tmp_path, "mine", GOOD)
    by_path = load_link_profile(str(path))
    by_name = load_link_profile("mine", profiles_dir=tmp_path)
    assert by_path == by_name
    assert by_path.spec.uplink == DirectionSpec(10_000_000, 5000, 1000, 1000)
    assert by_path.spec.downlink == DirectionSpec(20_000_000, 5000, 0, 0)
    assert [p.name for p in list_link_profiles(tmp_path)] == ["mine"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "colour: blue\n", r"unknown key\(s\) \['colour'\]"),
        (GOOD.replace("10mbit", "10mbps"), r"bad.yaml: uplink.rate: .*ambiguous"),
        (GOOD.replace("5ms, jitter", "5, jitter"), r"uplink.delay: duration 5 has no unit"),
        (GOOD.replace("0.1%", "2"), r"uplink.loss: .*fraction"),
        (GOOD.replace("source: made up for a test\n", ""), "'source' must be a non-empty string"),
        (GOOD.replace("downlink", "down"), r"unknown key\(s\) \['down'\]"),
        (GOOD.replace("downlink: {rate: 20mbit, delay: 5ms}\n", ""), "missing 'downlink'"),
        ("name: other\n" + GOOD, "does not match the file name"),
        ("description: [unclosed\n", "not valid YAML"),
        ("- a list\n", "is a mapping"),
        (GOOD.replace("jitter: 1ms", "jitter: 1ms, latency: 3ms"), r"uplink: unknown key\(s\) \['latency'\]"),
    ],
)
def test_bad_profiles_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "bad", text)
    with pytest.raises(LinkError, match=message):
        load_link_profile(str(path))


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(LinkError, match="does not exist"):
        load_link_profile(str(tmp_path / "nope.yaml"))
