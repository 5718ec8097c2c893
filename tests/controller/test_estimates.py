"""Live link and compute estimates: convergence, step tracking, outliers, garbage."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.controller.estimates import (
    EstimateError,
    EstimatorConfig,
    LiveEstimator,
    RequestTiming,
    theil_sen,
)
from testbed.errors import TestbedError
from testbed.planning.model import ModelProfile

DELAY_S = 0.005
RATE_BPS = 50e6
LTE = (5.7e6, 29e6, 0.0165)  # uplink, downlink, one-way delay (profiles/links/lte.yaml)
SIXG = (300e6, 500e6, 0.001)  # profiles/links/6g-imt2030.yaml


def _noisy(rng: random.Random, seconds: float, outliers: float = 0.05) -> float:
    """3 % Gaussian noise, and now and then a request that waited behind something (x 5)."""
    t = seconds * (1 + rng.gauss(0, 0.03))
    if rng.random() < outliers:
        t *= 5
    return max(t, 0.0)


def _timing(rng: random.Random, up: float, down: float, delay: float, bytes_up: int, bytes_down: int
            ) -> RequestTiming:
    return RequestTiming(bytes_up=bytes_up, uplink_s=_noisy(rng, delay + 8 * bytes_up / up),
                         bytes_down=bytes_down, downlink_s=_noisy(rng, delay + 8 * bytes_down / down))


def _close(x: float | None, want: float, rel: float) -> bool:
    return x is not None and abs(x - want) <= rel * want


def test_fit_converges_to_a_known_link_when_sizes_vary() -> None:
    """No RTT probe at all: the delay and the rate come from the straight-line fit over varying sizes."""
    rng = random.Random(1)
    est = LiveEstimator(EstimatorConfig(time_constant_s=1.0))
    sizes = [2_000, 20_000, 80_000, 200_000]
    for k in range(300):
        est.observe("dev1", _timing(rng, RATE_BPS, RATE_BPS, DELAY_S, rng.choice(sizes), rng.choice(sizes)),
                    now=k * 0.05)
    link = est.link("dev1", now=15.0)
    assert link.delay_source == "fit"
    assert _close(link.delay_s, DELAY_S, 0.05), link
    assert _close(link.uplink_bps, RATE_BPS, 0.05), link
    assert _close(link.downlink_bps, RATE_BPS, 0.05), link
    assert link.samples == 300 and link.rtt_samples == 0
    assert link.age_s == pytest.approx(15.0 - 299 * 0.05)
    assert link.rtt_s == pytest.approx(2 * link.delay_s)


def test_rtt_gives_the_delay_when_every_request_has_the_same_size() -> None:
    rng = random.Random(2)
    est = LiveEstimator(EstimatorConfig(time_constant_s=1.0))
    for k in range(300):
        now = k * 0.05
        est.observe("dev1", _timing(rng, RATE_BPS, RATE_BPS, DELAY_S, 50_000, 4_000), now)
        if k % 5 == 0:
            est.observe_rtt("dev1", _noisy(rng, 2 * DELAY_S), now)
    link = est.link("dev1", now=15.0)
    assert link.delay_source == "rtt"
    assert _close(link.delay_s, DELAY_S, 0.05), link
    assert _close(link.uplink_bps, RATE_BPS, 0.05), link
    # 4 kB down: the transfer is 0.64 ms beside a 5 ms delay, so 3 % noise on the total is ~25 % on the rate.
    assert _close(link.downlink_bps, RATE_BPS, 0.35), link


def test_without_any_delay_information_the_rate_absorbs_the_delay() -> None:
    """Same size, no RTT: delay unknown (None); the model still predicts the measured transfer time."""
    est = LiveEstimator()
    for k in range(20):
        est.observe("dev1", RequestTiming(100_000, DELAY_S + 8e5 / RATE_BPS, 0, 0.0), now=k * 0.1)
    link = est.link("dev1", now=2.0)
    assert link.delay_s is None and link.delay_source == "none"
    assert link.downlink_bps is None  # nothing came down
    assert 8e5 / link.uplink_bps == pytest.approx(DELAY_S + 8e5 / RATE_BPS)


def test_tracks_a_drop_from_6g_to_lte_within_a_bounded_number_of_samples() -> None:
    rng = random.Random(3)
    est = LiveEstimator(EstimatorConfig(time_constant_s=1.0, window=9))
    now = 0.0
    for k in range(200):
        now = k * 0.1
        est.observe("dev1", _timing(rng, *SIXG, 25_088, 2_048), now)
        if k % 5 == 0:
            est.observe_rtt("dev1", _noisy(rng, 2 * SIXG[2], 0.0), now)
    assert _close(est.link("dev1", now).uplink_bps, SIXG[0], 0.1)
    bound = 80  # window // 2 + 1 samples to move the medians, then ~ln(10)/alpha of EWMA, alpha ~ 0.095
    after = None
    for k in range(200):
        now += 0.1
        est.observe("dev1", _timing(rng, *LTE, 25_088, 2_048), now)
        if k % 5 == 0:
            est.observe_rtt("dev1", _noisy(rng, 2 * LTE[2], 0.0), now)
        link = est.link("dev1", now)
        # The downlink's 2 kB take 0.6 ms beside 16.5 ms of delay: its rate is barely observable (and barely
        # matters); what must be right is the time the model predicts for it.
        predicted_down = None if link.downlink_bps is None else link.delay_s + 8 * 2_048 / link.downlink_bps
        ok = (_close(link.uplink_bps, LTE[0], 0.1) and _close(link.delay_s, LTE[2], 0.1)
              and _close(predicted_down, LTE[2] + 8 * 2_048 / LTE[1], 0.1))
        if ok and after is None:
            after = k + 1
        if not ok:
            after = None  # must stay converged
    assert after is not None and after <= bound, after


def test_one_wild_sample_does_not_move_the_estimate() -> None:
    est = LiveEstimator(EstimatorConfig(window=9, min_alpha=1.0))  # no smoothing: only the median protects
    t = DELAY_S + 8e5 / RATE_BPS
    for k in range(9):
        est.observe("dev1", RequestTiming(100_000, t, 0, 0.0), now=k)
    before = est.link("dev1", 9).uplink_bps
    est.observe("dev1", RequestTiming(100_000, 1000 * t, 0, 0.0), now=9)
    assert est.link("dev1", 10).uplink_bps == before


@pytest.mark.parametrize("bad", [
    {"uplink_s": -0.001}, {"uplink_s": math.nan}, {"downlink_s": math.inf}, {"head_s": -1.0},
    {"bytes_up": -5}, {"bytes_up": 1.5}, {"body_s": "1ms"}, {"a": 3}, {"a": 5, "b": 2},
])
def test_garbage_samples_are_refused_with_a_clear_error(bad: dict) -> None:
    fields = {"bytes_up": 1000, "uplink_s": 0.001, "bytes_down": 100, "downlink_s": 0.001, **bad}
    with pytest.raises(EstimateError) as info:
        RequestTiming(**fields)
    assert isinstance(info.value, TestbedError)
    assert len(str(info.value).splitlines()) == 1


def test_refused_samples_leave_the_state_untouched() -> None:
    est = LiveEstimator(model=_model())
    good = RequestTiming(100_000, 0.02, 1_000, 0.006, head_s=0.002, body_s=0.001, tail_s=0.001, a=1, b=3)
    est.observe("dev1", good, now=0.0)
    est.observe_rtt("dev1", 0.01, now=0.0)
    snap = (est.link("dev1", 1.0), est.device_speed("dev1", 1.0), est.edge_speed(1.0))
    for call in (
        lambda: est.observe("dev1", good, now=math.nan),
        lambda: est.observe_rtt("dev1", -0.01, now=1.0),
        lambda: est.observe_rtt("dev1", math.inf, now=1.0),
        lambda: est.observe("dev1", RequestTiming(1, 0.0, 1, 0.0, a=1, b=9), now=1.0),  # beyond the model
        lambda: est.observe("", good, now=1.0),
        lambda: est.observe("dev1", {"bytes_up": 1}, now=1.0),  # type: ignore[arg-type]
    ):
        with pytest.raises(EstimateError):
            call()
    assert (est.link("dev1", 1.0), est.device_speed("dev1", 1.0), est.edge_speed(1.0)) == snap
    assert est.devices == ("dev1",)


def _model() -> ModelProfile:
    return ModelProfile("m", fwd_s=(0.001, 0.002, 0.003, 0.004), bwd_s=(0, 0, 0, 0),
                        edge_fwd_s=(0.0001, 0.0002, 0.0003, 0.0004), edge_bwd_s=(0, 0, 0, 0),
                        act_bytes=(100, 80, 60, 40, 10), param_bytes=(1, 1, 1, 1))


def test_compute_speeds_against_the_profile() -> None:
    """A device half as fast as the profile's reference and an edge twice as fast as profiled."""
    est = LiveEstimator(model=_model())
    rng = random.Random(4)
    for k in range(100):
        a, b = rng.choice([(1, 2), (1, 3), (2, 3)])
        prof = _model()
        device_s = sum(prof.fwd_s[:a]) + sum(prof.fwd_s[b:])
        body_s = sum(prof.edge_fwd_s[a:b])
        est.observe("dev1", RequestTiming(1000, 0.001, 100, 0.001, head_s=device_s, tail_s=device_s,
                                          body_s=body_s / 2, a=a, b=b), now=k * 0.1)
    dev = est.device_speed("dev1", 10.0)
    edge = est.edge_speed(10.0)
    assert dev.speed == pytest.approx(0.5) and dev.samples == 100
    assert edge.speed == pytest.approx(2.0) and edge.name == "edge"
    assert est.speeds(10.0)["dev1"] == dev
    assert est.device_speed("nobody", 10.0).speed is None


def test_compute_speeds_count_the_runtimes_fixed_costs_per_call() -> None:
    """A device and an edge exactly as profiled, whose measured times include the tail session's fixed cost and
    the body's wake-up: speed 1 at every split (without the fixed costs in the profiled times a one-block head
    would read as 0.71 of its profile, and the re-planner would charge the fixed cost twice)."""
    model = dataclasses.replace(_model(), tail_call_s=0.002, body_call_s=0.0005)
    for a, b in [(1, 3), (1, 2), (2, 3), (1, 4), (0, 3)]:
        est = LiveEstimator(model=model)
        head_s = sum(model.fwd_s[:a])
        tail_s = sum(model.fwd_s[b:]) + (model.tail_call_s if b < 4 else 0.0)
        body_s = sum(model.edge_fwd_s[a:b]) + model.body_call_s
        for k in range(20):
            est.observe("dev1", RequestTiming(1000, 0.001, 100, 0.001, head_s=head_s, tail_s=tail_s, body_s=body_s,
                                              a=a, b=b), now=k * 0.1)
        assert est.device_speed("dev1", 2.0).speed == pytest.approx(1.0), (a, b)
        assert est.edge_speed(2.0).speed == pytest.approx(1.0), (a, b)


def test_unknown_devices_and_forgetting() -> None:
    est = LiveEstimator()
    assert est.link("x", 0.0).uplink_bps is None and est.link("x", 0.0).age_s is None
    est.observe("x", RequestTiming(100, 0.001, 100, 0.001), 0.0)
    assert set(est.links(1.0)) == {"x"}
    est.forget("x")
    assert est.links(1.0) == {}


@pytest.mark.parametrize("kwargs", [
    {"time_constant_s": 0}, {"window": 0}, {"window": 1.5}, {"min_alpha": 2}, {"size_ratio": 1.0},
    {"max_rate_bps": math.nan}, {"min_fit_pairs": 0},
])
def test_bad_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(EstimateError):
        EstimatorConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    delay=st.floats(1e-5, 0.1), rate=st.floats(1e5, 1e10),
    sizes=st.lists(st.integers(100, 10**7), min_size=4, max_size=12),
)
def test_theil_sen_recovers_an_exact_line(delay: float, rate: float, sizes: list[int]) -> None:
    pts = [(float(n), delay + 8 * n / rate) for n in sizes]
    fit = theil_sen(pts, ratio=1.5)
    if max(sizes) < 1.5 * min(sizes):
        assert fit is None
        return
    assert fit is not None
    intercept, slope = fit
    assert slope == pytest.approx(8 / rate, rel=1e-6)
    assert intercept == pytest.approx(delay, rel=1e-6, abs=1e-12 * max(sizes))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.floats(0, 10), st.integers(0, 10**6), st.floats(0, 10),
                          st.booleans()), min_size=1, max_size=40))
def test_any_valid_stream_gives_usable_estimates(samples: list) -> None:
    """Whatever valid timings arrive, the estimates are positive, finite, and usable by the latency model."""
    est = LiveEstimator()
    for k, (up, up_s, down, down_s, probe) in enumerate(samples):
        est.observe("d", RequestTiming(up, up_s, down, down_s), now=float(k))
        if probe:
            est.observe_rtt("d", up_s, now=float(k))
    link = est.link("d", float(len(samples)))
    for v in (link.uplink_bps, link.downlink_bps):
        assert v is None or (math.isfinite(v) and 0 < v <= EstimatorConfig().max_rate_bps)
    assert link.delay_s is None or (math.isfinite(link.delay_s) and link.delay_s >= 0)
