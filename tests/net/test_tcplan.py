"""tc plans for every combination of rate / delay-jitter-loss / netem, at ordinary and very high rates."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.net.link import MAX_DELAY_US, MIN_RATE_BPS, DirectionSpec
from testbed.net.tcplan import (
    DEFAULT_ASSUMED_RATE_BPS,
    HTB_CLASS,
    HTB_ROOT,
    NETEM_LEAF,
    TC_H_ROOT,
    TcOp,
    describe,
    format_handle,
    kernel_rate_bps,
    make_handle,
    plan_direction,
)

TICKS_PER_US = 15.625  # Linux: PSCHED_SHIFT 6, 64-ns ticks


def kinds(ops: list[TcOp]) -> list[str]:
    return [op.kind for op in ops]


def test_nothing_to_do_gives_an_empty_plan() -> None:
    assert plan_direction(DirectionSpec(), netem=True) == []
    assert plan_direction(DirectionSpec(), netem=False) == []


@pytest.mark.parametrize(
    "spec", [DirectionSpec(delay_us=5000), DirectionSpec(jitter_us=100), DirectionSpec(loss_ppm=10)]
)
def test_delay_jitter_loss_without_netem_is_left_to_the_delay_line(spec: DirectionSpec) -> None:
    assert plan_direction(spec, netem=False) == []


def test_rate_only() -> None:
    for netem in (True, False):
        ops = plan_direction(DirectionSpec(rate_bps=100_000_000), netem=netem)
        assert kinds(ops) == ["htb", "htb-class"]
        root, cls = ops
        assert (root.handle, root.parent, root["default_class"]) == (HTB_ROOT, TC_H_ROOT, 1)
        assert (cls.handle, cls.parent) == (HTB_CLASS, HTB_ROOT)
        assert cls["rate_bps"] == cls["ceil_bps"] == 100_000_000
        assert cls["burst_bytes"] == cls["cburst_bytes"] == 3000  # 100 µs is 1250 B: two packets is the floor
        assert cls["quantum_bytes"] == 200_000


def test_delay_only_with_netem_is_a_root_netem() -> None:
    ops = plan_direction(DirectionSpec(delay_us=10_000, jitter_us=2000, loss_ppm=1000), netem=True)
    assert kinds(ops) == ["netem"]
    (netem,) = ops
    assert (netem.handle, netem.parent) == (HTB_ROOT, TC_H_ROOT)
    assert (netem["delay_us"], netem["jitter_us"], netem["loss_ppm"]) == (10_000, 2000, 1000)
    # no rate: the queue is sized for the assumed veth rate, 2 × 10 Gbit/s × 12 ms / 1500 B
    assert netem["limit_packets"] == math.ceil(2 * DEFAULT_ASSUMED_RATE_BPS / 8 * 0.012 / 1500)


def test_rate_and_delay_with_netem_nests_netem_under_the_class() -> None:
    ops = plan_direction(DirectionSpec(rate_bps=50_000_000, delay_us=20_000, loss_ppm=5), netem=True)
    assert kinds(ops) == ["htb", "htb-class", "netem"]
    netem = ops[-1]
    assert (netem.handle, netem.parent) == (NETEM_LEAF, HTB_CLASS)
    assert netem["limit_packets"] == 1000  # BDP is 83 packets: the default limit already covers it twice
    assert netem["loss_ppm"] == 5 and netem["jitter_us"] == 0


def test_rate_and_delay_without_netem_keeps_only_the_rate() -> None:
    spec = DirectionSpec(rate_bps=50_000_000, delay_us=20_000, jitter_us=1000, loss_ppm=5)
    assert plan_direction(spec, netem=False) == plan_direction(DirectionSpec(rate_bps=50_000_000), netem=True)


@pytest.mark.parametrize("rate", [10_000_000_000, 40_000_000_000, 100_000_000_000, 10**12, 10**13])
def test_very_high_rates(rate: int) -> None:
    ops = plan_direction(DirectionSpec(rate_bps=rate, delay_us=1000), netem=True)
    cls = ops[1]
    assert cls["rate_bps"] == rate
    assert cls["burst_bytes"] == rate // 8 // 10_000  # 100 µs of the rate
    assert cls["quantum_bytes"] == 200_000
    ticks = cls["burst_bytes"] / (rate / 8) * 1e6 * TICKS_PER_US
    assert ticks < 2**32
    assert ops[2]["limit_packets"] * 1500 >= rate / 8 * 0.001


def test_slowest_rate_fits_htbs_tick_counter() -> None:
    cls = plan_direction(DirectionSpec(rate_bps=MIN_RATE_BPS), netem=False)[1]
    assert cls["burst_bytes"] == 3000
    assert cls["burst_bytes"] / (MIN_RATE_BPS / 8) * 1e6 * TICKS_PER_US < 2**32


def test_rates_are_rounded_to_whole_bytes() -> None:
    assert kernel_rate_bps(100_000_003) == 100_000_000
    assert kernel_rate_bps(100_000_004) == 100_000_008
    assert kernel_rate_bps(1) == 8
    cls = plan_direction(DirectionSpec(rate_bps=5_700_001), netem=False)[1]
    assert cls["rate_bps"] == 5_700_000


def test_tunables() -> None:
    spec = DirectionSpec(rate_bps=1_000_000_000)
    assert plan_direction(spec, netem=False, burst_us=1000)[1]["burst_bytes"] == 125_000
    assert plan_direction(spec, netem=False, mtu=9000)[1]["burst_bytes"] == 18_000
    with pytest.raises(ValueError, match="mtu"):
        plan_direction(spec, netem=False, mtu=100)
    with pytest.raises(ValueError, match="burst_us"):
        plan_direction(spec, netem=False, burst_us=0)
    netem = plan_direction(DirectionSpec(delay_us=100_000), netem=True, assumed_rate_bps=1_000_000_000)[0]
    assert netem["limit_packets"] == math.ceil(2 * 125_000_000 * 0.1 / 1500)


def test_describe_reads_like_tc() -> None:
    ops = plan_direction(DirectionSpec(rate_bps=100_000_000, delay_us=5000, jitter_us=1000, loss_ppm=1000),
                         netem=True)
    assert describe(ops) == [
        "qdisc htb 1: root default 1",
        "class htb 1:1 parent 1: rate 100mbit ceil 100mbit burst 3000b cburst 3000b quantum 200000",
        "qdisc netem 10: parent 1:1 limit 1000 delay 5ms 1ms loss 0.1%",
    ]
    assert describe(plan_direction(DirectionSpec(loss_ppm=10), netem=True)) == [
        "qdisc netem 1: root limit 1000 loss 0.001%"
    ]
    assert str(ops[0]) == "qdisc htb 1: root default 1"
    other = TcOp("tbf", HTB_ROOT, TC_H_ROOT, (("rate_bps", 8000),))
    assert describe([other]) == ["qdisc tbf 1: root rate_bps 8000"]


def test_tcop_accessors() -> None:
    op = TcOp("htb-class", HTB_CLASS, HTB_ROOT, (("rate_bps", 8000),))
    assert op.is_class and op.get("rate_bps") == 8000 and op.get("nope") is None
    assert op.as_dict() == {"kind": "htb-class", "handle": HTB_CLASS, "parent": HTB_ROOT, "rate_bps": 8000}
    with pytest.raises(KeyError, match="no parameter 'ceil_bps'"):
        op["ceil_bps"]
    assert hash(op) == hash(TcOp("htb-class", HTB_CLASS, HTB_ROOT, (("rate_bps", 8000),)))


def test_handles() -> None:
    assert make_handle(1) == 0x10000 and make_handle(1, 1) == 0x10001 and make_handle(0x10) == 0x100000
    assert format_handle(TC_H_ROOT) == "root"
    assert format_handle(0x10000) == "1:" and format_handle(0x10001) == "1:1" and format_handle(0xFFFF0000) == "ffff:"
    with pytest.raises(ValueError):
        make_handle(0x10000)


specs = st.builds(
    DirectionSpec,
    rate_bps=st.none() | st.integers(MIN_RATE_BPS, 10**13),
    delay_us=st.integers(0, MAX_DELAY_US // 2),
    jitter_us=st.integers(0, MAX_DELAY_US // 2),
    loss_ppm=st.integers(0, 1_000_000),
)


@settings(max_examples=300, deadline=None)
@given(specs, st.booleans(), st.sampled_from([1500, 9000]))
def test_plan_invariants(spec: DirectionSpec, netem: bool, mtu: int) -> None:
    ops = plan_direction(spec, netem=netem, mtu=mtu)
    handles = [op.handle for op in ops]
    assert len(set(handles)) == len(handles)
    created = {TC_H_ROOT}
    for op in ops:
        assert op.parent in created, "every parent exists before its child"
        created.add(op.handle)
        assert all(isinstance(v, int) and v >= 0 for _, v in op.params)
    assert ("htb-class" in kinds(ops)) == (spec.rate_bps is not None)
    assert ("netem" in kinds(ops)) == (netem and spec.needs_delay_line_or_netem())
    for op in ops:
        if op.kind == "htb-class":
            assert op["rate_bps"] == kernel_rate_bps(spec.rate_bps or 0) and op["rate_bps"] % 8 == 0
            assert op["burst_bytes"] >= 2 * mtu
            assert op["burst_bytes"] / (op["rate_bps"] / 8) * 1e6 * TICKS_PER_US < 2**32
        if op.kind == "netem":
            rate = spec.rate_bps or DEFAULT_ASSUMED_RATE_BPS
            bdp_packets = rate / 8 * (spec.delay_us + spec.jitter_us) / 1e6 / mtu
            assert max(1000, bdp_packets) <= op["limit_packets"] or op["limit_packets"] == 2**32 - 1
            assert op["limit_packets"] < 2**32
            assert (op["delay_us"], op["jitter_us"], op["loss_ppm"]) == (spec.delay_us, spec.jitter_us, spec.loss_ppm)
    assert len(describe(ops)) == len(ops)
