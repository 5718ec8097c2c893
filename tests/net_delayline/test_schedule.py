"""The delay line's pure core: release times, jitter without reordering, seeded loss, queue limits, control."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.net.delayline import parse_args
from testbed.net.delayqueue import (
    PPM,
    ControlHandler,
    Direction,
    Impairment,
    schedule,
)

MS = 1_000_000  # ns


def arrivals(n: int, gap_ns: int, start: int = 10**9) -> list[int]:
    return [start + i * gap_ns for i in range(n)]


# -- Impairment --------------------------------------------------------------------------------------------------


def test_impairment_from_dict_merges_and_validates() -> None:
    base = Impairment(delay_us=10_000, jitter_us=500, loss_ppm=1000)
    assert Impairment.from_dict({"delay_us": 2000}, base) == Impairment(2000, 500, 1000)
    assert Impairment.from_dict({}, base) == base
    assert Impairment.from_dict({"loss_ppm": 2.0}) == Impairment(0, 0, 2)  # integral floats are fine
    assert Impairment.from_dict({"delay_us": 1.6}).delay_us == 2  # µs granularity: rounded
    assert base.to_dict() == {"delay_us": 10_000, "jitter_us": 500, "loss_ppm": 1000}


@pytest.mark.parametrize(
    "bad",
    [
        {"delay_us": -1},
        {"loss_ppm": PPM + 1},
        {"delay_us": 61_000_000},
        {"delay_us": True},
        {"delay_us": "10ms"},
        {"delay_us": None},
        {"delay_us": math.nan},
        {"jitter_us": math.inf},
        {"rate_bps": 1000},
        [1, 2],
        "delay",
    ],
)
def test_impairment_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        Impairment.from_dict(bad)


def test_impairment_constructor_rejects_floats_and_negatives() -> None:
    with pytest.raises(ValueError):
        Impairment(delay_us=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Impairment(loss_ppm=-3)


# -- schedule: delay ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=50 * MS), min_size=1, max_size=200),
    delay_us=st.integers(min_value=0, max_value=200_000),
)
def test_fixed_delay_adds_exactly_the_delay(gaps: list[int], delay_us: int) -> None:
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    out = schedule(times, Impairment(delay_us=delay_us))
    assert out == [t + delay_us * 1000 for t in times]


@settings(max_examples=100, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=5 * MS), min_size=2, max_size=300),
    delay_us=st.integers(min_value=0, max_value=20_000),
    jitter_us=st.integers(min_value=0, max_value=30_000),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_jitter_keeps_order_and_never_releases_early(gaps: list[int], delay_us: int, jitter_us: int, seed: int) -> None:
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    out = schedule(times, Impairment(delay_us=delay_us, jitter_us=jitter_us), seed)
    assert all(r is not None for r in out)
    rel = [r for r in out if r is not None]
    assert rel == sorted(rel), "order-keeping mode reordered packets"
    for t, r in zip(times, rel, strict=True):
        assert r >= t, "released before it arrived (jitter larger than the delay must clamp at zero)"
        assert r >= t + (delay_us - jitter_us) * 1000
    # each release is its own draw or the previous release (the max() that keeps order)
    hi = [t + (delay_us + jitter_us) * 1000 for t in times]
    for i, r in enumerate(rel):
        assert r <= hi[i] or (i > 0 and r == rel[i - 1])


def test_sparse_jitter_is_uniform_around_the_delay() -> None:
    # 20 ms apart with ±2 ms jitter: order-keeping never binds, so the draws show through unchanged
    times = arrivals(20_000, 20 * MS)
    out = schedule(times, Impairment(delay_us=10_000, jitter_us=2_000), seed=7)
    d = [(r - t) / MS for t, r in zip(times, out, strict=True) if r is not None]
    assert min(d) >= 8.0 and max(d) <= 12.0
    assert abs(sum(d) / len(d) - 10.0) < 0.05
    assert min(d) < 8.05 and max(d) > 11.95  # spans the whole interval
    quarter = sum(1 for x in d if x < 9.0) / len(d)
    assert 0.23 < quarter < 0.27  # uniform: a quarter of the mass below delay − jitter/2


def test_dense_jitter_keeps_order_at_the_cost_of_extra_delay() -> None:
    times = arrivals(5_000, 100_000)  # 0.1 ms apart, ±2 ms jitter
    fifo = schedule(times, Impairment(delay_us=10_000, jitter_us=2_000), seed=3)
    reorder = schedule(times, Impairment(delay_us=10_000, jitter_us=2_000), seed=3, reorder=True)
    rel_f = [r for r in fifo if r is not None]
    rel_r = [r for r in reorder if r is not None]
    assert rel_f == sorted(rel_f)
    assert rel_r != sorted(rel_r), "with --allow-reorder dense jitter does reorder"
    mean_f = sum(r - t for t, r in zip(times, rel_f, strict=True)) / len(times) / MS
    mean_r = sum(r - t for t, r in zip(times, rel_r, strict=True)) / len(times) / MS
    assert abs(mean_r - 10.0) < 0.1
    assert 11.0 < mean_f < 12.0  # the documented bias of order keeping: delays pile up towards delay + jitter


def test_reorder_mode_pops_in_release_order() -> None:
    d = Direction("uplink", Impairment(delay_us=10_000, jitter_us=5_000), seed=1, reorder=True)
    for i in range(200):
        d.push(i * 10_000, i.to_bytes(2, "big"))
    released = d.pop_due(10**12)
    assert len(released) == 200 and d.queue_packets == 0
    order = [int.from_bytes(p, "big") for p, _ in released]
    assert sorted(order) == list(range(200)) and order != list(range(200))


# -- schedule: loss ----------------------------------------------------------------------------------------------


def test_loss_is_seeded_and_close_to_the_rate() -> None:
    times = arrivals(100_000, 10_000)
    imp = Impairment(loss_ppm=100_000)
    a, b, c = schedule(times, imp, seed=1), schedule(times, imp, seed=1), schedule(times, imp, seed=2)
    assert a == b, "same seed, same drops"
    assert a != c, "another seed, other drops"
    lost = sum(r is None for r in a)
    assert abs(lost - 10_000) < 400  # 4 standard deviations of Binomial(1e5, 0.1)


def test_loss_extremes_and_direction_streams() -> None:
    times = arrivals(1000, 1000)
    assert all(r is not None for r in schedule(times, Impairment(loss_ppm=0)))
    assert all(r is None for r in schedule(times, Impairment(loss_ppm=PPM)))
    up = schedule(times, Impairment(loss_ppm=200_000), seed=5, name="uplink")
    down = schedule(times, Impairment(loss_ppm=200_000), seed=5, name="downlink")
    assert up != down, "the two directions draw from different streams"


def test_jitter_does_not_change_which_packets_are_lost() -> None:
    times = arrivals(5000, 50_000)
    plain = schedule(times, Impairment(delay_us=1000, loss_ppm=50_000), seed=9)
    jittered = schedule(times, Impairment(delay_us=1000, jitter_us=800, loss_ppm=50_000), seed=9)
    assert [r is None for r in plain] == [r is None for r in jittered]


# -- queue limits, runtime changes, counters ----------------------------------------------------------------------


def test_queue_limit_in_packets_and_bytes() -> None:
    times = arrivals(10, 1000)  # all arrive within the 10 ms delay
    out = schedule(times, Impairment(delay_us=10_000), limit_packets=4)
    assert [r is None for r in out] == [False] * 4 + [True] * 6
    out = schedule(times, Impairment(delay_us=10_000), sizes=[1000] * 10, limit_bytes=2500)
    assert [r is None for r in out] == [False] * 2 + [True] * 8
    # once the queue drains, packets are admitted again
    later = [*times, times[-1] + 20 * MS]
    assert schedule(later, Impairment(delay_us=10_000), limit_packets=4)[-1] is not None


def test_runtime_change_applies_to_later_packets_and_keeps_order() -> None:
    d = Direction("downlink", Impairment(delay_us=50_000))
    first = d.push(0, b"a")
    d.impairment = Impairment(delay_us=1_000)
    second = d.push(1 * MS, b"b")
    assert first == 50 * MS
    assert second == 50 * MS, "a shorter delay does not let a later packet overtake a queued one"
    third = d.push(60 * MS, b"c")
    assert third == 61 * MS
    assert [p for p, _ in d.pop_due(50 * MS)] == [b"a", b"b"]
    assert d.next_release_ns() == 61 * MS


def test_counters_and_pop_due() -> None:
    d = Direction("uplink", Impairment(delay_us=5_000), limit_packets=2)
    assert d.push(0, b"x" * 100) == 5 * MS
    assert d.push(1, b"y" * 200) is not None
    assert d.push(2, b"z" * 300) is None  # queue full
    assert d.pop_due(5 * MS - 1) == []
    assert d.stats()["queue_packets"] == 2 and d.stats()["queue_bytes"] == 300
    out = d.pop_due(6 * MS)
    assert [n for _, n in out] == [100, 200]
    for _, n in out:
        d.sent(n)
    s = d.stats()
    assert (s["packets_in"], s["bytes_in"], s["packets_out"], s["bytes_out"]) == (3, 600, 2, 300)
    assert (s["drops_queue"], s["drops_loss"], s["queue_packets"], s["queue_bytes"]) == (1, 0, 0, 0)
    assert s["queue_peak_packets"] == 2
    assert s["release_late_us_max"] == 1000.0
    with pytest.raises(ValueError):
        Direction("uplink", Impairment(), limit_packets=0)


# -- control protocol (no socket) --------------------------------------------------------------------------------


def handler() -> ControlHandler:
    return ControlHandler(Direction("uplink", Impairment(10_000)), Direction("downlink", Impairment(10_000)))


def test_control_set_get_stats() -> None:
    h = handler()
    reply = h.handle({"uplink": {"loss_ppm": 100_000}, "downlink": {"delay_us": 5000, "jitter_us": 100}})
    assert reply == {
        "ok": True,
        "uplink": {"delay_us": 10_000, "jitter_us": 0, "loss_ppm": 100_000},
        "downlink": {"delay_us": 5000, "jitter_us": 100, "loss_ppm": 0},
    }
    assert h.handle({"cmd": "get"})["downlink"]["delay_us"] == 5000
    h.directions["uplink"].push(0, b"abc")
    stats = h.handle({"cmd": "stats"})
    assert stats["ok"] and stats["uplink"]["packets_in"] == 1 and stats["uplink"]["queue_packets"] == 1
    assert stats["uplink"]["loss_ppm"] == 100_000 and "uptime_s" in stats


@pytest.mark.parametrize(
    "request_",
    [
        [],
        "stats",
        {"cmd": "reboot"},
        {"cmd": "stats", "extra": 1},
        {"uplink": {"delay_us": -5}},
        {"uplink": 5},
        {"cmd": "set", "sideways": {}},
        {},
    ],
)
def test_control_rejects_bad_requests(request_: object) -> None:
    reply = handler().handle(request_)
    assert reply["ok"] is False and reply["error"]


def test_control_set_is_all_or_nothing() -> None:
    h = handler()
    reply = h.handle({"uplink": {"delay_us": 1}, "downlink": {"delay_us": -1}})
    assert not reply["ok"]
    assert h.directions["uplink"].impairment.delay_us == 10_000


# -- command line ------------------------------------------------------------------------------------------------

BASE = ["--inner-ns", "tb-dev1", "--outer-ns", "tb-lab", "--outer-tun", "tb1-dl", "--address", "10.254.77.11"]


def test_cli_defaults_and_validation() -> None:
    a = parse_args([*BASE, "--up-delay-us", "10000", "--down-loss-ppm", "5"])
    assert (a.inner_tun, a.mtu, a.up_delay_us, a.down_loss_ppm, a.seed, a.allow_reorder) == (
        "tun0", 65000, 10000, 5, 0, False
    )
    for bad in (["--address", "not-an-ip"], ["--mtu", "100"], ["--up-delay-us", "-1"], ["--wake-compensation", "2"]):
        with pytest.raises(SystemExit):
            parse_args([*BASE, *bad])
