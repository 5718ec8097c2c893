"""Unit strings: exact round trips, strict refusals with messages that say what to write instead."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.net.units import (
    MAX_DURATION_US,
    MAX_RATE_BPS,
    PPM,
    format_ppm,
    format_rate,
    format_us,
    parse_duration_us,
    parse_loss_ppm,
    parse_rate,
)

PROPS = settings(max_examples=300, deadline=None)


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100mbit", 100_000_000),
        ("1.5gbit", 1_500_000_000),
        ("20Mbit/s", 20_000_000),
        ("800kbit", 800_000),
        ("10gbit", 10_000_000_000),
        ("1tbit", 10**12),
        (" 5.7 mbit ", 5_700_000),
        ("2kibit", 2048),
        ("1mibit/s", 2**20),
        ("1e3kbit", 1_000_000),
        ("12bit", 12),
        (10_000_000_000, 10_000_000_000),
    ],
)
def test_parse_rate_examples(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100", "has no unit"),
        ("100mbps", "ambiguous"),
        ("12.5MBps", "ambiguous"),
        ("100kb", "ambiguous"),
        ("1.5bit", "finer than the resolution"),
        ("fast", "not a number"),
        ("-5mbit", "not a number"),
        ("5 furlongs", "unknown unit"),
        ("0mbit", "between 1 bit/s"),
        (0, "between 1 bit/s"),
        (-1, "between 1 bit/s"),
        ("1e30tbit", "out of range"),
        ("9" * 80 + "mbit", "too long"),
        (True, "must be a string"),
        (1.5, "must be a string"),
    ],
)
def test_parse_rate_refuses(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "us"),
    [("5ms", 5000), ("100us", 100), ("0.5ms", 500), ("1s", 1_000_000), ("16.5ms", 16_500), ("250µs", 250),
     ("2 sec", 2_000_000), ("0", 0), (0, 0), ("0ms", 0), ("1e3us", 1000)],
)
def test_parse_duration_examples(text: str | int, us: int) -> None:
    assert parse_duration_us(text) == us


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", "has no unit"),
        (5, "has no unit"),
        (0.0, "has no unit"),
        (2.5, "has no unit"),
        ("0.1us", "finer than the resolution of 1 us"),
        ("5 parsecs", "unknown unit"),
        ("1e99s", "out of range"),
        ("20days", "unknown unit"),
        ("100000000s", "longer than"),
        ("-1ms", "not a number"),
        (None, "must be a string"),
    ],
)
def test_parse_duration_refuses(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration_us(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ppm"),
    [("0.1%", 1000), ("1e-5", 10), (1e-5, 10), ("10ppm", 10), ("0", 0), (0, 0), (0.0, 0), ("100%", PPM),
     ("0.0001%", 1), (0.25, 250_000), ("2.5 %", 25_000)],
)
def test_parse_loss_examples(text: str | float, ppm: int) -> None:
    assert parse_loss_ppm(text) == ppm


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1", "bare number is a fraction"),
        (1, "bare number is a fraction"),
        (1.5, "bare number is a fraction"),
        ("1e-7", "finer than the resolution of 1 ppm"),
        ("101%", "between 0% and 100%"),
        ("0.1 %x", "unknown unit"),
        ("lots", "not a number"),
        (float("nan"), "not a number"),
        (True, "must be a string"),
    ],
)
def test_parse_loss_refuses(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loss_ppm(text)  # type: ignore[arg-type]


def test_formatting_examples() -> None:
    assert format_rate(100_000_000) == "100mbit"
    assert format_rate(1_500_000_000) == "1.5gbit"
    assert format_rate(5_700_000) == "5.7mbit"
    assert format_rate(999) == "999bit"
    assert format_rate(10**12) == "1tbit"
    assert format_us(0) == "0us"
    assert format_us(1500) == "1.5ms"
    assert format_us(16_500) == "16.5ms"
    assert format_us(5_000_000) == "5s"
    assert format_us(999) == "999us"
    assert format_ppm(0) == "0%"
    assert format_ppm(1000) == "0.1%"
    assert format_ppm(10) == "0.001%"
    assert format_ppm(PPM) == "100%"


@PROPS
@given(st.integers(1, MAX_RATE_BPS))
def test_rate_round_trip(bps: int) -> None:
    text = format_rate(bps)
    assert "e" not in text.lower().removesuffix("bit")  # never scientific notation
    assert parse_rate(text) == bps


@PROPS
@given(st.integers(0, MAX_DURATION_US))
def test_duration_round_trip(us: int) -> None:
    assert parse_duration_us(format_us(us)) == us


@PROPS
@given(st.integers(0, PPM))
def test_loss_round_trip(ppm: int) -> None:
    assert parse_loss_ppm(format_ppm(ppm)) == ppm


@PROPS
@given(st.integers(0, 999_999))
def test_loss_fraction_and_ppm_agree(ppm: int) -> None:
    assert parse_loss_ppm(f"{ppm}ppm") == ppm
    assert parse_loss_ppm(f"{ppm / PPM:.6f}") == ppm


@PROPS
@given(st.text(max_size=30))
def test_parsers_fail_only_with_value_error(text: str) -> None:
    for parse in (parse_rate, parse_duration_us, parse_loss_ppm):
        try:
            value = parse(text)
        except ValueError as exc:
            assert str(exc)
        else:
            assert isinstance(value, int) and value >= 0
