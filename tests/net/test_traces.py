"""Traces: Mahimahi import at a known rate, looping, files, the shipped conversions, and timed replay."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.net.link import MIN_RATE_BPS, DirectionSpec, LinkSpec
from testbed.net.traces import (
    TRACES_DIR,
    LinkTrace,
    TraceError,
    TracePoint,
    TraceReplayer,
    from_mahimahi,
    load_trace,
    mean_rates_bps,
    read_mahimahi,
    save_trace,
    spec_at,
)

MAHIMAHI = Path("/work/shared/traces/mahimahi")
# Mean rates from the traces' README (Mbit/s, up, down)
README_MEANS = {
    "verizon-lte-short": (6.0, 5.0, "Verizon-LTE-short"),
    "tmobile-lte-short": (13.3, 16.7, "TMobile-LTE-short"),
}


def _mm(tmp_path: Path, name: str, stamps: list[int]) -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{s}\n" for s in stamps))
    return path


# ----------------------------------------------------------------------------- Mahimahi


def test_a_file_holding_just_1_is_a_fixed_12mbit_link(tmp_path: Path) -> None:
    one = _mm(tmp_path, "one", [1])
    trace = from_mahimahi(one, one, delay_us=5000, name="fixed")
    assert trace.points == (TracePoint(0, 12_000_000, 12_000_000, 5000),)
    assert trace.period_ms == 1


def test_known_rates_per_window(tmp_path: Path) -> None:
    # The last stamp is the length and coincides with the next loop's ms 0 (so "1" alone is 1 packet/ms).
    # up: 2 packets every ms = 24 Mbit/s; down: 1 packet per ms in the first second, none in the second
    # (an outage), 3 per ms in the third
    up = _mm(tmp_path, "up", [t for t in range(1, 3001) for _ in range(2)])
    down = _mm(tmp_path, "down", [*range(1, 1000), *[t for t in range(2000, 3000) for _ in range(3)], 3000])
    trace = from_mahimahi(up, down, window_ms=1000, delay_us=10_000, name="synthetic")
    assert trace.period_ms == 3000
    assert [(p.t_ms, p.uplink_bps, p.downlink_bps) for p in trace.points] == [
        (0, 24_000_000, 12_000_000),
        (1000, 24_000_000, 0),
        (2000, 24_000_000, 36_000_000),
    ]
    assert "delay" in trace.source and trace.name == "synthetic"
    assert mean_rates_bps(trace) == (24_000_000, 16_000_000)


def test_shorter_direction_loops_and_last_window_is_partial(tmp_path: Path) -> None:
    up = _mm(tmp_path, "up", [500])  # one packet per 500 ms = 24 kbit/s
    down = _mm(tmp_path, "down", list(range(1, 1251)))  # 12 Mbit/s for 1250 ms
    trace = from_mahimahi(up, down, window_ms=1000, delay_us=0, name="mixed")
    assert trace.period_ms == 1250
    assert [p.t_ms for p in trace.points] == [0, 1000]
    assert trace.points[0].uplink_bps == 24_000  # opportunities at 0 (wrapped 500), 500
    assert trace.points[1].downlink_bps == 12_000_000  # 250 packets in a 250-ms window
    assert trace.points[1].uplink_bps == 48_000  # 1000 (=2×500) in a 250-ms window: 1 packet / 250 ms


@pytest.mark.parametrize(
    ("text", "message"),
    [("1\nx\n", r":2: expected a millisecond timestamp"), ("5\n3\n", "must not decrease"), ("0\n", "> 0"),
     ("", "> 0"), ("-1\n", "expected a millisecond")],
)
def test_bad_mahimahi_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_mahimahi(path)


def test_missing_mahimahi_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_mahimahi(tmp_path / "absent")


@pytest.mark.parametrize("name", sorted(README_MEANS))
def test_shipped_conversions_match_the_published_means(name: str) -> None:
    up_mbit, down_mbit, _ = README_MEANS[name]
    trace = load_trace(name)
    up, down = mean_rates_bps(trace)
    assert up / 1e6 == pytest.approx(up_mbit, rel=0.02)
    assert down / 1e6 == pytest.approx(down_mbit, rel=0.02)
    assert trace.period_ms == 140_000 and len(trace.points) == 140
    assert "Mahimahi" in trace.source


@pytest.mark.skipif(not MAHIMAHI.is_dir(), reason="the raw Mahimahi traces are not on this machine")
@pytest.mark.parametrize("name", sorted(README_MEANS))
def test_shipped_conversions_are_reproducible(name: str) -> None:
    shipped = load_trace(name)
    raw = README_MEANS[name][2]
    again = from_mahimahi(MAHIMAHI / f"{raw}.up", MAHIMAHI / f"{raw}.down", window_ms=1000,
                          delay_us=shipped.points[0].delay_us, name=name, source=shipped.source)
    assert again == shipped


def test_every_shipped_trace_loads() -> None:
    names = sorted(p.stem for p in TRACES_DIR.glob("*.csv"))
    assert len(names) >= 2
    for name in names:
        assert load_trace(name).name == name


# ----------------------------------------------------------------------------- the trace as a step function

TRACE = LinkTrace(
    name="steps",
    source="test",
    points=(TracePoint(0, 1_000_000, 2_000_000, 10_000), TracePoint(1000, 0, 4_000_000, 20_000),
            TracePoint(2500, 3_000_000, 6_000_000, 5_000)),
    period_ms=4000,
)
BASE = LinkSpec(uplink=DirectionSpec(rate_bps=10**9, jitter_us=300, loss_ppm=7), downlink=DirectionSpec())


def test_spec_at_steps_and_loops() -> None:
    at0 = spec_at(TRACE, 0, BASE)
    assert at0.uplink == DirectionSpec(rate_bps=1_000_000, delay_us=10_000, jitter_us=300, loss_ppm=7)
    assert at0.downlink == DirectionSpec(rate_bps=2_000_000, delay_us=10_000)
    assert spec_at(TRACE, 999, BASE) == at0
    assert spec_at(TRACE, 1000, BASE).uplink.rate_bps == MIN_RATE_BPS  # outage: slowest shapeable rate
    assert spec_at(TRACE, 2500, BASE).downlink.rate_bps == 6_000_000
    assert spec_at(TRACE, 3999, BASE).downlink.rate_bps == 6_000_000
    assert spec_at(TRACE, 4000, BASE) == at0
    assert spec_at(TRACE, 4000 * 1000 + 1500, BASE) == spec_at(TRACE, 1500, BASE)
    with pytest.raises(ValueError, match=">= 0"):
        spec_at(TRACE, -1, BASE)


def test_next_change() -> None:
    assert [TRACE.next_change_ms(t) for t in (0, 999, 1000, 2499, 2500, 3999, 4000, 9000)] == [
        1000, 1000, 2500, 2500, 4000, 4000, 5000, 10_500,
    ]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9))
def test_spec_at_is_periodic(t: int) -> None:
    assert spec_at(TRACE, t, BASE) == spec_at(TRACE, t % TRACE.period_ms, BASE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"points": ()}, "has no points"),
        ({"points": (TracePoint(5, 1, 1, 0),)}, "must start at t_ms = 0"),
        ({"points": (TracePoint(0, 1, 1, 0), TracePoint(0, 1, 1, 0))}, "increase strictly"),
        ({"points": (TracePoint(0, 1, 1, 0), TracePoint(10, 1, 1, 0)), "period_ms": 10}, "must exceed"),
        ({"name": ""}, "needs a name"),
    ],
)
def test_invalid_traces(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "t", "source": "s", "points": (TracePoint(0, 1, 1, 0),)} | kwargs
    with pytest.raises(TraceError, match=message):
        LinkTrace(**args)  # type: ignore[arg-type]


def test_default_period_and_point_validation() -> None:
    assert LinkTrace("t", "s", (TracePoint(0, 1, 1, 0), TracePoint(300, 1, 1, 0))).period_ms == 600
    assert LinkTrace("t", "s", (TracePoint(0, 1, 1, 0),)).period_ms == 1000
    with pytest.raises(TraceError, match="uplink_bps"):
        TracePoint(0, -1, 1, 0)
    with pytest.raises(TraceError, match="delay_us must be an int"):
        TracePoint(0, 1, 1, 1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".csv", ".yaml"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"steps{suffix}"
    save_trace(TRACE, path)
    assert load_trace(path) == TRACE
    assert load_trace(str(path)) == TRACE


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "t_ms,up,down,delay\n0,1,1,0\n", "first row must be"),
        ("a.csv", "# name: a\n# source: s\nt_ms,uplink_bps,downlink_bps,delay_us\n0,1,x,0\n", "row 2"),
        ("a.csv", "# name: a\n# colour: s\nt_ms,uplink_bps,downlink_bps,delay_us\n0,1,1,0\n", "bad header line"),
        ("a.csv", "# name: a\nt_ms,uplink_bps,downlink_bps,delay_us\n0,1,1,0\n", "non-empty name and source"),
        ("a.csv", "# name: a\n# source: s\nt_ms,uplink_bps,downlink_bps,delay_us\n0,1,1\n", "point 1"),
        ("a.csv", "# name: a\n# source: s\nt_ms,uplink_bps,downlink_bps,delay_us\n10,1,1,0\n", "start at t_ms"),
        ("a.yaml", "name: a\nsource: s\npoints: [[0, 1, 1, 0]]\nextra: 1\n", r"unknown key\(s\) \['extra'\]"),
        ("a.yaml", "name: a\nsource: s\npoints: 5\n", "'points' must be a list"),
        ("a.yaml", "name: a\nsource: s\npoints: [[0, 1.5, 1, 0]]\n", "uplink_bps must be an int"),
        ("a.yaml", "[unclosed\n", "not valid YAML"),
        ("a.txt", "whatever", "ends in .csv"),
    ],
)
def test_bad_trace_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_unknown_trace_name_lists_known() -> None:
    with pytest.raises(TraceError, match=r"unknown trace 'nope'.*verizon-lte-short"):
        load_trace("nope")


# ----------------------------------------------------------------------------- replay


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0  # seconds; any origin
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_replayer_applies_at_each_change_on_a_fake_clock() -> None:
    clock = FakeClock()
    applied: list[tuple[float, LinkSpec]] = []
    replayer = TraceReplayer(TRACE, BASE, lambda spec: applied.append((clock.now, spec)),
                             clock=clock, sleep=clock.sleep)
    log = replayer.run(9.0)
    assert [t for t, _ in log] == [0, 1000, 2500, 4000, 5000, 6500, 8000]
    assert [round((t - 100.0) * 1000) for t, _ in applied] == [0, 1000, 2500, 4000, 5000, 6500, 8000]
    assert [spec for _, spec in applied] == [spec_at(TRACE, t, BASE) for t, _ in log]
    assert clock.now == pytest.approx(109.0)


def test_replayer_skips_unchanged_specs() -> None:
    same = LinkTrace("same", "s", (TracePoint(0, 8000, 8000, 0), TracePoint(10, 8000, 8000, 0)), period_ms=20)
    clock = FakeClock()
    calls: list[LinkSpec] = []
    TraceReplayer(same, LinkSpec.unlimited(), calls.append, clock=clock, sleep=clock.sleep).run(1.0)
    assert len(calls) == 1


def test_replayer_stops_on_the_event() -> None:
    clock = FakeClock()
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == 2:
            stop.set()

    log = TraceReplayer(TRACE, BASE, lambda spec: None, clock=clock, sleep=sleep).run(60.0, stop)
    assert [t for t, _ in log] == [0, 1000]


def test_replayer_is_bounded_even_if_the_clock_stands_still() -> None:
    calls: list[LinkSpec] = []
    replayer = TraceReplayer(TRACE, BASE, calls.append, clock=lambda: 5.0, sleep=lambda s: None)
    assert len(replayer.run(10.0)) == 1
    assert len(calls) == 1


def test_replayer_rejects_negative_durations() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="duration_s"):
            TraceReplayer(TRACE, BASE, lambda spec: None).run(bad)


def test_replayer_real_clock_short_run() -> None:
    """Real time on a shared machine: never early, in order, on time unless the scheduler says otherwise."""
    fast = LinkTrace("fast", "s", (TracePoint(0, 8000, 8000, 0), TracePoint(100, 16_000, 16_000, 0)), period_ms=200)
    stamps: list[float] = []
    start = time.monotonic()
    log = TraceReplayer(fast, BASE, lambda spec: stamps.append(time.monotonic() - start)).run(0.45)
    elapsed = time.monotonic() - start
    times = [t for t, _ in log]
    assert times[0] == 0 and len(times) >= 3  # planned: 0, 100, 200, 300, 400
    steps = [t // 100 for t in times]
    assert steps == sorted(set(steps)) and steps[-1] <= 4
    for t, actual in zip(times, stamps, strict=True):
        assert actual >= t / 1000 - 0.002, "a change is never applied early"
    lateness = sorted(t - t // 100 * 100 for t in times)
    assert lateness[len(lateness) // 2] < 60, f"applied soon after its boundary (one stall allowed): {times}"
    assert [spec for _, spec in log] == [spec_at(fast, t, BASE) for t in times]
    assert 0.45 <= elapsed <= 1.5


def test_replayer_stop_interrupts_a_real_sleep() -> None:
    slow = LinkTrace("slow", "s", (TracePoint(0, 8000, 8000, 0),), period_ms=60_000)
    replayer = TraceReplayer(slow, BASE, lambda spec: None)
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    start = time.monotonic()
    timer.start()
    try:
        replayer.run(60.0, stop)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 1.0
