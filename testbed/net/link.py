"""What a link is: per-direction rate, one-way delay, jitter and loss; and the named profiles in profiles/links/.

A link is described, never built, here: :mod:`testbed.net.tcplan` turns a :class:`DirectionSpec` into tc
operations, :mod:`testbed.net.tc` applies them. Uplink is device -> edge, downlink edge -> device; each
direction is shaped where its packets leave (the device's egress for uplink, the edge's for downlink), so
a one-way delay is applied once and the round trip is uplink delay + downlink delay — never doubled.

Profile files are YAML with human units, parsed here and nowhere else::

    description: LTE, US median 2020
    source: Ookla Q2-2020 report ...
    uplink:   {rate: 5.7mbit, delay: 16.5ms, jitter: 0ms, loss: 0%}
    downlink: {rate: 29mbit,  delay: 16.5ms, jitter: 0ms, loss: 0%}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from testbed.errors import TestbedError
from testbed.net.units import (
    MAX_RATE_BPS,
    PPM,
    format_ppm,
    format_rate,
    format_us,
    parse_duration_us,
    parse_loss_ppm,
    parse_rate,
)

__all__ = [
    "MAX_DELAY_US",
    "MIN_RATE_BPS",
    "PROFILES_DIR",
    "DirectionSpec",
    "LinkError",
    "LinkProfile",
    "LinkSpec",
    "direction_from_mapping",
    "direction_to_mapping",
    "list_link_profiles",
    "load_link_profile",
]

#: The repository's profiles/ folder.
PROFILES_DIR: Final[Path] = Path(__file__).resolve().parents[2] / "profiles"

#: Slowest shaped rate. HTB keeps its token buffer as a u32 count of 64-ns ticks (at most ~274 s) and two
#: full-size packets already take 24 s at 1 kbit/s. A trace outage is modelled as this rate: packets wait,
#: as they do in a real cell, instead of being dropped.
MIN_RATE_BPS: Final[int] = 1000
#: netem's delay and jitter fields are u32 counts of 64-ns ticks (at most ~274 s); a minute is plenty.
MAX_DELAY_US: Final[int] = 60_000_000

_DIRECTION_KEYS: Final[frozenset[str]] = frozenset({"rate", "delay", "jitter", "loss"})
_PROFILE_KEYS: Final[frozenset[str]] = frozenset({"name", "description", "source", "uplink", "downlink", "notes"})


class LinkError(TestbedError):
    """A bad link description or profile, or a link that could not be applied to an interface."""


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LinkError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise LinkError(f"{name} = {value} is out of range [{low}, {high}]")


@dataclass(frozen=True)
class DirectionSpec:
    """One direction of a link. ``rate_bps=None`` means unlimited; everything else 0 means none."""

    rate_bps: int | None = None
    delay_us: int = 0
    jitter_us: int = 0
    loss_ppm: int = 0

    def __post_init__(self) -> None:
        if self.rate_bps is not None:
            _check_int("rate_bps", self.rate_bps, MIN_RATE_BPS, MAX_RATE_BPS)
        _check_int("delay_us", self.delay_us, 0, MAX_DELAY_US)
        _check_int("jitter_us", self.jitter_us, 0, MAX_DELAY_US)
        _check_int("loss_ppm", self.loss_ppm, 0, PPM)
        if self.delay_us + self.jitter_us > MAX_DELAY_US:
            raise LinkError(f"delay + jitter = {format_us(self.delay_us + self.jitter_us)} exceeds "
                            f"{format_us(MAX_DELAY_US)}")

    def needs_delay_line_or_netem(self) -> bool:
        """True when delay, jitter or loss is set: HTB alone cannot do it."""
        return bool(self.delay_us or self.jitter_us or self.loss_ppm)

    def describe(self) -> str:
        """One line for humans: "100mbit, delay 5ms ± 1ms, loss 0.1%"."""
        parts = [format_rate(self.rate_bps) if self.rate_bps is not None else "unlimited"]
        if self.delay_us or self.jitter_us:
            delay = f"delay {format_us(self.delay_us)}"
            if self.jitter_us:
                delay += f" ± {format_us(self.jitter_us)}"
            parts.append(delay)
        if self.loss_ppm:
            parts.append(f"loss {format_ppm(self.loss_ppm)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class LinkSpec:
    """Both directions of a device–edge link."""

    uplink: DirectionSpec  # device -> edge
    downlink: DirectionSpec  # edge -> device

    @classmethod
    def symmetric(cls, direction: DirectionSpec) -> LinkSpec:
        return cls(uplink=direction, downlink=direction)

    @classmethod
    def unlimited(cls) -> LinkSpec:
        return cls.symmetric(DirectionSpec())

    def rtt_us(self) -> int:
        """Base round-trip propagation delay (no queueing, no jitter)."""
        return self.uplink.delay_us + self.downlink.delay_us


@dataclass(frozen=True)
class LinkProfile:
    """A named, sourced LinkSpec from profiles/links/<name>.yaml."""

    name: str
    description: str
    source: str
    spec: LinkSpec
    notes: str = ""


def direction_from_mapping(data: object, where: str) -> DirectionSpec:
    """Parse {rate, delay, jitter, loss} in human units (every key optional); ``where`` prefixes errors."""
    if data is None:
        return DirectionSpec()
    if not isinstance(data, Mapping):
        raise LinkError(f"{where}: expected a mapping with keys {sorted(_DIRECTION_KEYS)}, got {data!r}")
    unknown = sorted(str(k) for k in data if k not in _DIRECTION_KEYS)
    if unknown:
        raise LinkError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_DIRECTION_KEYS)}")
    parsers: dict[str, Any] = {
        "rate": parse_rate, "delay": parse_duration_us, "jitter": parse_duration_us, "loss": parse_loss_ppm,
    }
    values: dict[str, Any] = {}
    for key, parse in parsers.items():
        raw = data.get(key)
        if raw is None or (key == "rate" and raw == "unlimited"):
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise LinkError(f"{where}.{key}: {exc}") from None
    try:
        return DirectionSpec(
            rate_bps=values.get("rate"),
            delay_us=values.get("delay", 0),
            jitter_us=values.get("jitter", 0),
            loss_ppm=values.get("loss", 0),
        )
    except LinkError as exc:
        raise LinkError(f"{where}: {exc}") from None


def direction_to_mapping(spec: DirectionSpec) -> dict[str, str]:
    """The inverse of :func:`direction_from_mapping`: exact human strings."""
    return {
        "rate": format_rate(spec.rate_bps) if spec.rate_bps is not None else "unlimited",
        "delay": format_us(spec.delay_us),
        "jitter": format_us(spec.jitter_us),
        "loss": format_ppm(spec.loss_ppm),
    }


def _known_names(profiles_dir: Path) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml")) if profiles_dir.is_dir() else []


def _resolve(name_or_path: str, profiles_dir: Path) -> Path:
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise LinkError(f"link profile file {path} does not exist")
        return path
    path = profiles_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = _known_names(profiles_dir)
        raise LinkError(
            f"unknown link profile {name_or_path!r}; known profiles in {profiles_dir}: "
            f"{', '.join(known) if known else '(none)'}"
        )
    return path


def _parse_profile(data: object, path: Path) -> LinkProfile:
    where = str(path)
    if not isinstance(data, Mapping):
        raise LinkError(f"{where}: a link profile is a mapping with keys {sorted(_PROFILE_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in _PROFILE_KEYS)
    if unknown:
        raise LinkError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_PROFILE_KEYS)}")
    name = data.get("name", path.stem)
    if name != path.stem:
        raise LinkError(f"{where}: name {name!r} does not match the file name {path.stem!r}")
    text: dict[str, str] = {}
    for key in ("description", "source", "notes"):
        value = data.get(key, "")
        if not isinstance(value, str) or (key != "notes" and not value.strip()):
            raise LinkError(f"{where}: {key!r} must be a non-empty string")
        text[key] = " ".join(value.split())
    for key in ("uplink", "downlink"):
        if key not in data:
            raise LinkError(f"{where}: missing {key!r} (a mapping with rate, delay, jitter, loss)")
    spec = LinkSpec(
        uplink=direction_from_mapping(data["uplink"], f"{where}: uplink"),
        downlink=direction_from_mapping(data["downlink"], f"{where}: downlink"),
    )
    return LinkProfile(name=name, description=text["description"], source=text["source"], spec=spec,
                       notes=text["notes"])


def load_link_profile(name_or_path: str, profiles_dir: Path = PROFILES_DIR / "links") -> LinkProfile:
    """Load a profile by name (profiles/links/<name>.yaml) or by path (anything with "/" or a .yaml suffix)."""
    path = _resolve(name_or_path, profiles_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LinkError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LinkError(f"{path}: cannot read: {exc}") from None
    return _parse_profile(data, path)


def list_link_profiles(profiles_dir: Path = PROFILES_DIR / "links") -> list[LinkProfile]:
    """Every profile in the folder, sorted by name; one bad file raises (naming it) rather than hiding."""
    return [load_link_profile(str(profiles_dir / f"{name}.yaml")) for name in _known_names(profiles_dir)]
