"""Device classes (profiles/devices/*.yaml): how fast a lab host must run to stand for a real device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.lab.topology import LabError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles" / "devices"
_KEYS = {"name", "description", "cores", "memory_mb", "speed_vs_pi4", "accelerator", "source"}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    description: str
    cores: int
    memory_mb: int
    speed_vs_pi4: float  # CPU speed, fp32 inference, relative to a Raspberry Pi 4 (the reference machine)
    accelerator: str
    source: str


def load_device_class(name_or_path: str, profiles_dir: Path = PROFILES_DIR) -> DeviceClass:
    path = Path(name_or_path)
    if not path.suffix:
        path = profiles_dir / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in profiles_dir.glob("*.yaml")))
        raise LabError(f"unknown device class {name_or_path!r}; known: {known}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LabError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) - _KEYS or {"name", "cores", "speed_vs_pi4", "source"} - set(data):
        raise LabError(f"{path}: expected keys {sorted(_KEYS)} (name, cores, speed_vs_pi4, source required)")
    try:
        cls = DeviceClass(
            name=str(data["name"]), description=str(data.get("description", "")), cores=int(data["cores"]),
            memory_mb=int(data.get("memory_mb", 0)), speed_vs_pi4=float(data["speed_vs_pi4"]),
            accelerator=str(data.get("accelerator", "none")), source=str(data["source"]),
        )
    except (TypeError, ValueError) as exc:
        raise LabError(f"{path}: {exc}") from exc
    if cls.cores < 1 or cls.speed_vs_pi4 <= 0:
        raise LabError(f"{path}: cores must be >= 1 and speed_vs_pi4 > 0")
    return cls


def host_speed_vs_pi4() -> float:
    """This machine's speed in Pi-4 units: TESTBED_HOST_SPEED, else the estimate in profiles/devices/host.yaml."""
    env = os.environ.get("TESTBED_HOST_SPEED")
    if env:
        try:
            return float(env)
        except ValueError as exc:
            raise LabError(f"TESTBED_HOST_SPEED must be a number, got {env!r}") from exc
    return load_device_class("host").speed_vs_pi4


def slowdown(device: DeviceClass, host_speed: float) -> float:
    """How many times slower than this host a lab device of this class must run (>= 1 or no throttling)."""
    return host_speed / device.speed_vs_pi4
