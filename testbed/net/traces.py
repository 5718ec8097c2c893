"""Time-varying links: a trace of (rate up, rate down, delay) points, the spec in force at any time, a replayer.

A :class:`LinkTrace` is a step function that loops: point i holds from its ``t_ms`` until the next
point's (the last until ``period_ms``), then the trace starts again. Traces are stored in
profiles/traces/ as CSV (a few ``# key: value`` header lines, then ``t_ms,uplink_bps,downlink_bps,delay_us``)
or YAML (``name``, ``source``, ``period_ms``, ``points: [[t_ms, uplink_bps, downlink_bps, delay_us], ...]``).

:func:`from_mahimahi` converts Mahimahi's delivery-opportunity traces into rates per window; a window
with no opportunity is an outage, rate 0, which :func:`spec_at` turns into the slowest shapeable rate
(packets wait, as in a real cell, rather than being dropped).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from testbed.net.link import MAX_DELAY_US, MIN_RATE_BPS, PROFILES_DIR, LinkError, LinkSpec
from testbed.net.units import MAX_RATE_BPS, format_us

__all__ = [
    "MAHIMAHI_PACKET_BYTES",
    "TRACES_DIR",
    "LinkTrace",
    "TraceError",
    "TracePoint",
    "TraceReplayer",
    "from_mahimahi",
    "load_trace",
    "mean_rates_bps",
    "read_mahimahi",
    "save_trace",
    "spec_at",
]

TRACES_DIR: Final[Path] = PROFILES_DIR / "traces"
#: Each Mahimahi line is one opportunity to deliver one packet of this size.
MAHIMAHI_PACKET_BYTES: Final[int] = 1500
_CSV_HEADER: Final[tuple[str, ...]] = ("t_ms", "uplink_bps", "downlink_bps", "delay_us")
_YAML_KEYS: Final[frozenset[str]] = frozenset({"name", "source", "period_ms", "points"})
_MAX_POINTS: Final[int] = 1_000_000


class TraceError(LinkError):
    """A malformed trace file or an invalid trace."""


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{name} must be an int, not {value!r}")
    if not low <= value <= high:
        raise TraceError(f"{name} = {value} is out of range [{low}, {high}]")
    return value


@dataclass(frozen=True)
class TracePoint:
    """From ``t_ms`` on: these rates (0 = outage) and this one-way delay, in both directions."""

    t_ms: int
    uplink_bps: int
    downlink_bps: int
    delay_us: int

    def __post_init__(self) -> None:
        _int("t_ms", self.t_ms, 0, 2**63 - 1)
        _int("uplink_bps", self.uplink_bps, 0, MAX_RATE_BPS)
        _int("downlink_bps", self.downlink_bps, 0, MAX_RATE_BPS)
        _int("delay_us", self.delay_us, 0, MAX_DELAY_US)


@dataclass(frozen=True)
class LinkTrace:
    """Points sorted by strictly increasing ``t_ms``, the first at 0; the trace loops every ``period_ms``.

    ``period_ms=0`` (the default) means: last point's start + the last step (1000 ms for a single point).
    """

    name: str
    source: str
    points: tuple[TracePoint, ...]
    period_ms: int = 0
    _starts: list[int] = dataclasses.field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise TraceError("a trace needs a name")
        points = tuple(self.points)
        object.__setattr__(self, "points", points)
        if not points:
            raise TraceError(f"trace {self.name!r} has no points")
        if len(points) > _MAX_POINTS:
            raise TraceError(f"trace {self.name!r} has {len(points)} points; at most {_MAX_POINTS}")
        if points[0].t_ms != 0:
            raise TraceError(f"trace {self.name!r} must start at t_ms = 0, not {points[0].t_ms}")
        for before, after in itertools.pairwise(points):
            if after.t_ms <= before.t_ms:
                raise TraceError(f"trace {self.name!r}: t_ms must increase strictly ({before.t_ms} then {after.t_ms})")
        if self.period_ms == 0:
            step = points[-1].t_ms - points[-2].t_ms if len(points) > 1 else 1000
            object.__setattr__(self, "period_ms", points[-1].t_ms + step)
        _int("period_ms", self.period_ms, 1, 2**63 - 1)
        object.__setattr__(self, "_starts", [p.t_ms for p in points])  # bisect keys; not a field
        if self.period_ms <= points[-1].t_ms:
            raise TraceError(f"trace {self.name!r}: period_ms {self.period_ms} must exceed the last t_ms "
                             f"{points[-1].t_ms}")

    def point_at(self, t_ms: int) -> TracePoint:
        """The point in force at ``t_ms`` (>= 0) after the start, looping."""
        if t_ms < 0:
            raise ValueError(f"t_ms must be >= 0, got {t_ms}")
        offset = t_ms % self.period_ms
        return self.points[bisect.bisect_right(self._starts, offset) - 1]

    def next_change_ms(self, t_ms: int) -> int:
        """The first time after ``t_ms`` at which the next point (or the loop) starts."""
        loop_start = t_ms - t_ms % self.period_ms
        index = bisect.bisect_right(self._starts, t_ms % self.period_ms)
        return loop_start + (self._starts[index] if index < len(self._starts) else self.period_ms)


def mean_rates_bps(trace: LinkTrace) -> tuple[float, float]:
    """Time-weighted mean (uplink, downlink) over one period, outages counted as 0."""
    ends = [p.t_ms for p in trace.points[1:]] + [trace.period_ms]
    up = sum(p.uplink_bps * (end - p.t_ms) for p, end in zip(trace.points, ends, strict=True))
    down = sum(p.downlink_bps * (end - p.t_ms) for p, end in zip(trace.points, ends, strict=True))
    return up / trace.period_ms, down / trace.period_ms


def spec_at(trace: LinkTrace, t_ms: int, base: LinkSpec) -> LinkSpec:
    """``base`` with the trace's rates and delay at ``t_ms`` (looping); jitter and loss stay the base's.

    A rate below the slowest shapeable one (an outage: 0) becomes ``MIN_RATE_BPS``.
    """
    point = trace.point_at(t_ms)
    return LinkSpec(
        uplink=dataclasses.replace(base.uplink, rate_bps=max(point.uplink_bps, MIN_RATE_BPS), delay_us=point.delay_us),
        downlink=dataclasses.replace(
            base.downlink, rate_bps=max(point.downlink_bps, MIN_RATE_BPS), delay_us=point.delay_us
        ),
    )


# --- Mahimahi -------------------------------------------------------------------------------------


def read_mahimahi(path: Path | str) -> list[int]:
    """The delivery-opportunity timestamps (ms) of a Mahimahi trace file, validated."""
    path = Path(path)
    stamps: list[int] = []
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read Mahimahi trace {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if not text.isdigit():
            raise TraceError(f"{path}:{number}: expected a millisecond timestamp, got {text!r}")
        stamp = int(text)
        if stamps and stamp < stamps[-1]:
            raise TraceError(f"{path}:{number}: timestamps must not decrease ({stamps[-1]} then {stamp})")
        stamps.append(stamp)
    if not stamps or stamps[-1] == 0:
        raise TraceError(f"{path}: a Mahimahi trace needs at least one timestamp > 0 (its last one is its length)")
    return stamps


def _opportunity_counter(stamps: list[int]) -> Callable[[int], int]:
    """F(x) = number of opportunities in [0, x) ms of the looped trace (Mahimahi wraps after its last stamp)."""
    period = stamps[-1]
    per_ms = [0] * period
    for stamp in stamps:
        per_ms[stamp % period] += 1  # the last stamp coincides with the next loop's start
    cumulative = [0]
    for count in per_ms:
        cumulative.append(cumulative[-1] + count)

    def before(x: int) -> int:
        loops, rest = divmod(x, period)
        return loops * cumulative[period] + cumulative[rest]

    return before


def from_mahimahi(
    up_path: Path | str,
    down_path: Path | str,
    *,
    window_ms: int = 1000,
    delay_us: int,
    name: str,
    source: str | None = None,
) -> LinkTrace:
    """Average Mahimahi's delivery opportunities per ``window_ms`` into a rate trace.

    The two files may differ in length; the trace lasts as long as the longer one, the shorter looping
    as Mahimahi would loop it. The last window is cut at that length and its rate computed over what is left.
    Mahimahi traces carry no delay: ``delay_us`` is the one-way delay of every point.
    """
    _int("window_ms", window_ms, 1, 3_600_000)
    up_stamps, down_stamps = read_mahimahi(up_path), read_mahimahi(down_path)
    up_count, down_count = _opportunity_counter(up_stamps), _opportunity_counter(down_stamps)
    period = max(up_stamps[-1], down_stamps[-1])
    bits = MAHIMAHI_PACKET_BYTES * 8
    points = []
    for start in range(0, period, window_ms):
        end = min(start + window_ms, period)
        span = end - start
        up = round((up_count(end) - up_count(start)) * bits * 1000 / span)
        down = round((down_count(end) - down_count(start)) * bits * 1000 / span)
        points.append(TracePoint(start, up, down, delay_us))
    if source is None:
        source = (
            f"Mahimahi traces {Path(up_path).name} / {Path(down_path).name} (ravinet/mahimahi traces/, "
            f"recorded with Saturator, Winstein et al., NSDI 2013), averaged over {window_ms}-ms windows; "
            f"the delay ({format_us(delay_us)} one-way) is not in the trace"
        )
    return LinkTrace(name=name, source=source, points=tuple(points), period_ms=period)


# --- files ----------------------------------------------------------------------------------------


def _resolve(path: Path | str) -> Path:
    candidate = Path(path)
    if candidate.suffix or "/" in str(path):
        return candidate
    for suffix in (".csv", ".yaml", ".yml"):
        if (TRACES_DIR / f"{path}{suffix}").is_file():
            return TRACES_DIR / f"{path}{suffix}"
    known = sorted(p.stem for p in TRACES_DIR.glob("*") if p.suffix in (".csv", ".yaml", ".yml"))
    raise TraceError(f"unknown trace {path!r}; known traces in {TRACES_DIR}: {', '.join(known) or '(none)'}")


def _points_from_rows(rows: Iterable[object], where: str) -> tuple[TracePoint, ...]:
    points = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, list | tuple) or len(row) != 4:
            raise TraceError(
                f"{where}: point {number}: expected [t_ms, uplink_bps, downlink_bps, delay_us], got {row!r}"
            )
        try:
            points.append(TracePoint(*row))
        except TraceError as exc:
            raise TraceError(f"{where}: point {number}: {exc}") from None
    return tuple(points)


def _load_csv(text: str, where: str) -> LinkTrace:
    header: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if not sep or key.strip() not in ("name", "source", "period_ms"):
                raise TraceError(f"{where}: bad header line {line!r}; expected '# name|source|period_ms: value'")
            header[key.strip()] = value.strip()
        elif line.strip():
            body.append(line)
    reader = csv.reader(body)
    columns = next(reader, None)
    if columns is None or tuple(c.strip() for c in columns) != _CSV_HEADER:
        raise TraceError(f"{where}: the first row must be {','.join(_CSV_HEADER)}, got {columns}")
    rows = []
    for number, row in enumerate(reader, start=2):
        try:
            rows.append([int(cell) for cell in row])
        except ValueError:
            raise TraceError(f"{where}: row {number}: expected four integers, got {row}") from None
    period = header.get("period_ms", "0")
    if not period.isdigit():
        raise TraceError(f"{where}: period_ms must be an integer, got {period!r}")
    return _trace(header.get("name", ""), header.get("source", ""), _points_from_rows(rows, where), int(period), where)


def _trace(name: object, source: object, points: tuple[TracePoint, ...], period: object, where: str) -> LinkTrace:
    if not isinstance(name, str) or not name or not isinstance(source, str) or not source:
        raise TraceError(f"{where}: a trace needs a non-empty name and source")
    try:
        return LinkTrace(name=name, source=source, points=points, period_ms=period)  # type: ignore[arg-type]
    except TraceError as exc:
        raise TraceError(f"{where}: {exc}") from None


def _load_yaml(text: str, where: str) -> LinkTrace:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TraceError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise TraceError(f"{where}: expected a mapping with keys {sorted(_YAML_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in _YAML_KEYS)
    if unknown:
        raise TraceError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_YAML_KEYS)}")
    rows = data.get("points")
    if not isinstance(rows, list):
        raise TraceError(f"{where}: 'points' must be a list of [t_ms, uplink_bps, downlink_bps, delay_us]")
    return _trace(data.get("name"), data.get("source"), _points_from_rows(rows, where), data.get("period_ms", 0), where)


def load_trace(path: Path | str) -> LinkTrace:
    """Load a .csv or .yaml trace; a bare name is looked up in profiles/traces/."""
    resolved = _resolve(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {resolved}: {exc}") from None
    if resolved.suffix == ".csv":
        return _load_csv(text, str(resolved))
    if resolved.suffix in (".yaml", ".yml"):
        return _load_yaml(text, str(resolved))
    raise TraceError(f"{resolved}: a trace file ends in .csv, .yaml or .yml")


def save_trace(trace: LinkTrace, path: Path | str) -> None:
    """Write a trace as CSV or YAML, chosen by the file's suffix."""
    path = Path(path)
    if path.suffix == ".csv":
        out = io.StringIO()
        out.write(f"# name: {trace.name}\n# source: {' '.join(trace.source.split())}\n")
        out.write(f"# period_ms: {trace.period_ms}\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_HEADER)
        writer.writerows((p.t_ms, p.uplink_bps, p.downlink_bps, p.delay_us) for p in trace.points)
        text = out.getvalue()
    elif path.suffix in (".yaml", ".yml"):
        data = {
            "name": trace.name,
            "source": trace.source,
            "period_ms": trace.period_ms,
            "points": [[p.t_ms, p.uplink_bps, p.downlink_bps, p.delay_us] for p in trace.points],
        }
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    else:
        raise TraceError(f"{path}: a trace file ends in .csv, .yaml or .yml")
    path.write_text(text, encoding="utf-8")


# --- replay ---------------------------------------------------------------------------------------


class TraceReplayer:
    """Steps a trace on a timer, calling ``apply(spec)`` whenever the spec in force changes.

    The clock (seconds, monotonic) and sleep are injected so tests run on a fake clock; without an
    injected sleep a run waits on its stop event, so setting the event interrupts it at once. A run is
    bounded by its duration and by a step budget, so even a clock that never advances cannot spin forever.
    """

    def __init__(
        self,
        trace: LinkTrace,
        base: LinkSpec,
        apply: Callable[[LinkSpec], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.trace = trace
        self._base = base
        self._apply = apply
        self._clock = clock
        self._sleep = sleep

    def _step_budget(self, duration_ms: float) -> int:
        starts = [p.t_ms for p in self.trace.points] + [self.trace.period_ms]
        shortest = min(b - a for a, b in itertools.pairwise(starts))
        return 4 * (int(duration_ms) // shortest + 2) + 100

    def run(self, duration_s: float, stop: threading.Event | None = None) -> list[tuple[int, LinkSpec]]:
        """Replay for ``duration_s`` seconds or until ``stop`` is set; returns (ms since start, spec) per apply."""
        if not 0 <= duration_s < math.inf:
            raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s}")
        stop = stop if stop is not None else threading.Event()
        sleep = self._sleep if self._sleep is not None else stop.wait
        duration_ms = duration_s * 1000
        applied: list[tuple[int, LinkSpec]] = []
        current: LinkSpec | None = None
        start = self._clock()
        for _ in range(self._step_budget(duration_ms)):
            if stop.is_set():
                break
            elapsed_ms = (self._clock() - start) * 1000
            if elapsed_ms >= duration_ms:
                break
            now_ms = math.floor(elapsed_ms)
            spec = spec_at(self.trace, now_ms, self._base)
            if spec != current:
                self._apply(spec)
                applied.append((now_ms, spec))
                current = spec
            wake_ms = min(self.trace.next_change_ms(now_ms), duration_ms)
            wait_ms = wake_ms - (self._clock() - start) * 1000
            if wait_ms > 0:
                sleep(wait_ms / 1000)
        return applied
