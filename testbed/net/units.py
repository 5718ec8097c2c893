"""Human strings for rates, durations and loss, parsed once at the CLI/config boundary.

Inside the library every quantity is an int with its unit in the name: ``rate_bps`` (bits per second),
``delay_us`` (microseconds), ``loss_ppm`` (parts per million). The parsers are strict on purpose: a
number without a unit is rejected (is "5" milliseconds or seconds?), tc's ``mbps`` (which tc reads as
megaBYTES per second) is rejected as ambiguous, and a value finer than the resolution (1 bit/s, 1 µs,
1 ppm) is an error rather than a silent rounding. The formatters are exact inverses:
``parse_rate(format_rate(x)) == x`` for every valid ``x``.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal
from typing import Final

__all__ = [
    "MAX_DURATION_US",
    "MAX_RATE_BPS",
    "PPM",
    "format_ppm",
    "format_rate",
    "format_us",
    "parse_duration_us",
    "parse_loss_ppm",
    "parse_rate",
]

#: The kernel holds rates as u64 bytes per second.
MAX_RATE_BPS: Final[int] = (2**64 - 1) * 8
#: About 11.6 days: far beyond any link delay, small enough to catch a unit mix-up ("5000000s").
MAX_DURATION_US: Final[int] = 10**12
#: One million parts per million: total loss.
PPM: Final[int] = 1_000_000

_MAX_TEXT: Final[int] = 64
# A decimal number, optional exponent, optional unit (letters, µ, %, "/s").
_QUANTITY_RE: Final = re.compile(
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-zµ%]+(?:/s)?)?\Z"
)
# Exact decimal arithmetic: enough digits that no accepted input is ever rounded.
_CTX: Final = decimal.Context(prec=120, Emax=10_000, Emin=-10_000, traps=[decimal.Overflow, decimal.InvalidOperation])

_RATE_UNITS: Final[dict[str, int]] = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "kibit": 2**10,
    "mibit": 2**20,
    "gibit": 2**30,
    "tibit": 2**40,
}
_RATE_FORMAT_UNITS: Final[tuple[tuple[str, int], ...]] = (
    ("tbit", 10**12),
    ("gbit", 10**9),
    ("mbit", 10**6),
    ("kbit", 10**3),
    ("bit", 1),
)
_DURATION_UNITS: Final[dict[str, int]] = {
    "us": 1,
    "µs": 1,
    "usec": 1,
    "ms": 1000,
    "msec": 1000,
    "s": 1_000_000,
    "sec": 1_000_000,
}


def _split(text: str, what: str, example: str) -> tuple[Decimal, str]:
    """Split "1.5 gbit" into (Decimal("1.5"), "gbit"); the unit is lower-cased, "" when absent."""
    if len(text) > _MAX_TEXT:
        raise ValueError(f"{what} {text[:_MAX_TEXT]!r}... is too long (at most {_MAX_TEXT} characters)")
    match = _QUANTITY_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{what} {text!r} is not a number with a unit, e.g. {example!r}")
    try:
        number = _CTX.create_decimal(match["num"])
    except (decimal.Overflow, decimal.InvalidOperation):
        raise ValueError(f"{what} {text!r} is out of range") from None
    return number, (match["unit"] or "").lower()


def _whole(value: Decimal, text: str, what: str, resolution: str) -> int:
    if value != value.to_integral_value(context=_CTX):
        raise ValueError(f"{what} {text!r} is finer than the resolution of {resolution}")
    return int(value)


def _scaled(number: Decimal, factor: int, text: str, what: str, limit: int) -> Decimal:
    """number * factor, refusing values whose size alone is out of range (before any exact arithmetic)."""
    if number.adjusted() > len(str(limit)) + 1:
        raise ValueError(f"{what} {text!r} is out of range")
    return _CTX.multiply(number, Decimal(factor))


def parse_rate(text: str | int) -> int:
    """A rate in bits per second: "100mbit", "1.5gbit", "20Mbit/s", "800kbit", "2gibit"; an int is bit/s.

    Units are decimal (kbit = 1000 bit) unless binary (kibit = 1024 bit), case-insensitive, with an
    optional "/s". Strings without a unit and byte units ("mbps", "MBps") are rejected.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"rate must be a string such as '100mbit' or an int in bit/s, not {text!r}")
    if isinstance(text, int):
        bps = text
    else:
        number, unit = _split(text, "rate", "100mbit")
        if unit.endswith("/s"):
            unit = unit[:-2]
        if unit == "":
            raise ValueError(f"rate {text!r} has no unit: write e.g. '{number}mbit' (or pass an int in bit/s)")
        if unit.endswith(("bps", "b")) and unit not in _RATE_UNITS:
            raise ValueError(
                f"rate {text!r}: {unit!r} is ambiguous (tc reads 'mbps' as megabytes per second); "
                f"write bits, e.g. '{number}mbit'"
            )
        if unit not in _RATE_UNITS:
            raise ValueError(f"rate {text!r}: unknown unit {unit!r}; use one of {', '.join(_RATE_UNITS)}")
        value = _scaled(number, _RATE_UNITS[unit], text, "rate", MAX_RATE_BPS)
        bps = _whole(value, text, "rate", "1 bit/s")
    if not 1 <= bps <= MAX_RATE_BPS:
        raise ValueError(f"rate {text!r} must be between 1 bit/s and {MAX_RATE_BPS} bit/s")
    return bps


def parse_duration_us(text: str | int | float) -> int:
    """A duration in microseconds: "5ms", "100us", "0.5ms", "1s". A bare number is rejected, except 0.

    Why no bare numbers: "5" is 5 ms to tc's netem, 5 µs to pyroute2's tbf latency, 5 s to a human.
    """
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"duration must be a string such as '5ms', not {text!r}")
    if isinstance(text, int | float):
        if isinstance(text, int) and text == 0:
            return 0
        raise ValueError(f"duration {text!r} has no unit: write e.g. '{text}ms' or '{text}us'")
    number, unit = _split(text, "duration", "5ms")
    if unit == "":
        if number == 0:
            return 0
        raise ValueError(f"duration {text!r} has no unit: write e.g. '{number}ms' or '{number}us'")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"duration {text!r}: unknown unit {unit!r}; use one of us, ms, s")
    value = _scaled(number, _DURATION_UNITS[unit], text, "duration", MAX_DURATION_US)
    us = _whole(value, text, "duration", "1 us")
    if us > MAX_DURATION_US:
        raise ValueError(f"duration {text!r} is longer than {format_us(MAX_DURATION_US)}")
    return us


def parse_loss_ppm(text: str | float) -> int:
    """A loss probability in parts per million: "0.1%", "10ppm", or a fraction in [0, 1) such as "1e-5" or 1e-5.

    A bare number is a fraction, so "1" (100 %) is refused as a likely slip for "1%": write "100%".
    """
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"loss must be a string such as '0.1%' or a fraction, not {text!r}")
    source = text
    if isinstance(text, int | float):
        text = repr(text)  # repr keeps every digit of a float ("1e-05"); Decimal then reads it exactly
    number, unit = _split(text, "loss", "0.1%")
    if unit == "%":
        value = _scaled(number, 10_000, text, "loss", PPM)
    elif unit == "ppm":
        value = number
    elif unit == "":
        if number >= 1:
            raise ValueError(
                f"loss {source!r}: a bare number is a fraction in [0, 1); write '{number}%' for percent"
                " or '100%' for total loss"
            )
        value = _scaled(number, PPM, text, "loss", PPM)
    else:
        raise ValueError(f"loss {source!r}: unknown unit {unit!r}; use '%', 'ppm' or a bare fraction")
    ppm = _whole(value, str(source), "loss", "1 ppm (0.0001%)")
    if not 0 <= ppm <= PPM:
        raise ValueError(f"loss {source!r} must be between 0% and 100%")
    return ppm


def _decimal_text(value: Decimal) -> str:
    text = f"{value.normalize(_CTX):f}"
    return text


def format_rate(bps: int) -> str:
    """The shortest exact string for a rate: 100_000_000 -> "100mbit", 1_500_000_000 -> "1.5gbit"."""
    for unit, factor in _RATE_FORMAT_UNITS:
        if bps >= factor:
            return _decimal_text(_CTX.divide(Decimal(bps), Decimal(factor))) + unit
    return f"{bps}bit"


def format_us(us: int) -> str:
    """The shortest exact string for a duration: 1500 -> "1.5ms", 5_000_000 -> "5s", 0 -> "0us"."""
    for unit, factor in (("s", 1_000_000), ("ms", 1000)):
        if us >= factor:
            return _decimal_text(_CTX.divide(Decimal(us), Decimal(factor))) + unit
    return f"{us}us"


def format_ppm(ppm: int) -> str:
    """A loss in percent, exact: 1000 -> "0.1%", 10 -> "0.001%", 0 -> "0%"."""
    return _decimal_text(_CTX.divide(Decimal(ppm), Decimal(10_000))) + "%"
