"""Planning inputs: a random instance generator (tests, benchmark) and the YAML/JSON "planning input" loader.

The file format (YAML or JSON; times in seconds ``*_s`` or milliseconds ``*_ms``)::

    mode: inference            # or training; the CLI's --mode overrides it
    batches_per_round: 1
    min_head: 1
    min_tail: 1
    model:
      name: cnn
      fwd_ms: [1.2, 3.4, 2.0, 0.5]        # per block, on the reference device (speed 1)
      bwd_ms: [2.4, 6.8, 4.0, 1.0]        # optional (training); zeros if absent
      edge_fwd_ms: [0.1, 0.2, 0.1, 0.05]  # per block, on the whole edge
      edge_bwd_ms: [0.2, 0.4, 0.2, 0.1]   # optional
      act_bytes: [3136, 25088, 12544, 6272, 40]   # L + 1 entries: input, after each block (last: logits)
      param_bytes: [320, 18496, 73856, 1290]      # optional; zeros if absent
      tail_call_ms: 0.15                  # optional: the device runtime's fixed cost of the tail's own call
      body_call_ms: 0.4                   # optional: the edge body's wake-up cost per request
    devices:
      - name: pi4
        count: 3                 # optional: pi4-0, pi4-1, pi4-2
        speed: 1.0               # device time = profiled time / speed
        uplink: 20mbit           # or uplink_bps: 2.0e7
        downlink: 100mbit        # or downlink_bps
        delay: 5ms               # one way; or rtt: 10ms, or delay_s
        memory: 512MiB           # optional; or memory_bytes / memory_mb
        edge_request: 0.8ms      # optional: the edge's fixed handling of one request; or edge_request_s
        uplink_burst: 36KiB      # optional: bytes of a message the link's token bucket passes at no cost

Human units ("20mbit", "5ms", "512MiB") are parsed here, at the config boundary, and nowhere else.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from testbed.planning.model import DeviceProfile, ModelProfile, PlanningError, PlanningProblem

__all__ = [
    "load_problem",
    "parse_bytes",
    "parse_rate_bps",
    "parse_seconds",
    "problem_from_dict",
    "problem_to_dict",
    "random_problem",
]

_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_RATE = {"bit": 1, "bps": 1, "kbit": 1e3, "kbps": 1e3, "mbit": 1e6, "mbps": 1e6, "gbit": 1e9, "gbps": 1e9,
         "tbit": 1e12, "tbps": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _parse(value: Any, units: dict[str, float], what: str, default_unit: str | None) -> float:
    if isinstance(value, bool):
        raise PlanningError(f"{what}: expected a number or a string with a unit, got {value!r}")
    if isinstance(value, int | float):
        if default_unit is None:
            raise PlanningError(f"{what}: a bare number is ambiguous; add a unit ({', '.join(units)})")
        return float(value) * units[default_unit]
    if isinstance(value, str):
        m = re.fullmatch(_NUM + r"([A-Za-zµ]*)\s*", value)
        if m:
            unit = m.group(2).lower() or default_unit
            if unit in units:
                return float(m.group(1)) * units[unit]
    raise PlanningError(f"{what}: cannot parse {value!r}; use a number with a unit ({', '.join(units)})")


def parse_rate_bps(value: Any, what: str = "rate") -> float:
    """``"100mbit"`` → 1e8 (bits per second). A bare number is bits per second."""
    return _parse(value, _RATE, what, "bps")


def parse_seconds(value: Any, what: str = "time") -> float:
    """``"5ms"`` → 0.005. A bare number is seconds."""
    return _parse(value, _TIME, what, "s")


def parse_bytes(value: Any, what: str = "size") -> int:
    """``"512MiB"`` → 536870912. A bare number is bytes."""
    return int(_parse(value, _BYTES, what, "b"))


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PlanningError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _number_list(d: dict[str, Any], base: str, where: str, required: bool, length: int | None) -> tuple[float, ...]:
    """``base_s`` (seconds) or ``base_ms`` (milliseconds), as a tuple of seconds."""
    if f"{base}_s" in d and f"{base}_ms" in d:
        raise PlanningError(f"{where}: give {base}_s or {base}_ms, not both")
    for suffix, scale in (("_s", 1.0), ("_ms", 1e-3)):
        if base + suffix in d:
            raw = d[base + suffix]
            if not isinstance(raw, list) or not all(isinstance(x, int | float) and not isinstance(x, bool)
                                                    for x in raw):
                raise PlanningError(f"{where}: {base}{suffix} must be a list of numbers")
            return tuple(float(x) * scale for x in raw)
    if required or length is None:
        raise PlanningError(f"{where}: missing {base}_s (or {base}_ms)")
    return (0.0,) * length


def _int_list(d: dict[str, Any], key: str, where: str, length: int | None) -> tuple[int, ...]:
    if key not in d:
        if length is None:
            raise PlanningError(f"{where}: missing {key}")
        return (0,) * length
    raw = d[key]
    if not isinstance(raw, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw):
        raise PlanningError(f"{where}: {key} must be a list of byte counts")
    return tuple(raw)


_MODEL_KEYS = {"name", "act_bytes", "param_bytes", "tail_call_s", "tail_call_ms", "body_call_s", "body_call_ms"} | {
    f"{b}_{u}" for b in ("fwd", "bwd", "edge_fwd", "edge_bwd") for u in ("s", "ms")}
_DEVICE_KEYS = {"name", "count", "speed", "uplink", "uplink_bps", "downlink", "downlink_bps", "delay", "delay_s",
                "rtt", "rtt_s", "memory", "memory_bytes", "memory_mb", "edge_request", "edge_request_s",
                "uplink_burst", "uplink_burst_bytes", "downlink_burst", "downlink_burst_bytes"}
_TOP_KEYS = {"mode", "batches_per_round", "min_head", "min_tail", "model", "devices"}


def _model_from_dict(d: Any) -> ModelProfile:
    if not isinstance(d, dict):
        raise PlanningError("model: expected a mapping")
    _check_keys(d, _MODEL_KEYS, "model")
    name = str(d.get("name", "model"))
    where = f"model {name!r}"
    fwd = _number_list(d, "fwd", where, True, None)
    L = len(fwd)
    fixed = {}
    for cost in ("tail_call", "body_call"):
        key = _one_of(d, (f"{cost}_s", f"{cost}_ms"), where)
        fixed[cost] = 0.0
        if key is not None:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise PlanningError(f"{where}: {key} must be a number, got {v!r}")
            fixed[cost] = float(v) * (1e-3 if key.endswith("_ms") else 1.0)
    return ModelProfile(
        name=name,
        fwd_s=fwd,
        bwd_s=_number_list(d, "bwd", where, False, L),
        edge_fwd_s=_number_list(d, "edge_fwd", where, True, L),
        edge_bwd_s=_number_list(d, "edge_bwd", where, False, L),
        act_bytes=_int_list(d, "act_bytes", where, None),
        param_bytes=_int_list(d, "param_bytes", where, L),
        tail_call_s=fixed["tail_call"],
        body_call_s=fixed["body_call"],
    )


def _one_of(d: dict[str, Any], keys: tuple[str, ...], where: str) -> str | None:
    given = [k for k in keys if k in d]
    if len(given) > 1:
        raise PlanningError(f"{where}: give only one of {', '.join(given)}")
    return given[0] if given else None


def _devices_from_list(items: Any) -> tuple[DeviceProfile, ...]:
    if not isinstance(items, list) or not items:
        raise PlanningError("devices: expected a non-empty list")
    out: list[DeviceProfile] = []
    for n, d in enumerate(items):
        if not isinstance(d, dict):
            raise PlanningError(f"devices[{n}]: expected a mapping")
        _check_keys(d, _DEVICE_KEYS, f"devices[{n}]")
        name = str(d.get("name", f"device{n}"))
        where = f"device {name!r}"
        kw: dict[str, Any] = {}
        for direction in ("uplink", "downlink"):
            key = _one_of(d, (direction, f"{direction}_bps"), where)
            if key is None:
                raise PlanningError(f"{where}: missing {direction} (e.g. {direction}: 100mbit)")
            kw[f"{direction}_bps"] = parse_rate_bps(d[key], f"{where} {key}")
        key = _one_of(d, ("delay", "delay_s", "rtt", "rtt_s"), where)
        if key is not None:
            seconds = parse_seconds(d[key], f"{where} {key}")
            kw["delay_s"] = seconds / 2 if key.startswith("rtt") else seconds
        key = _one_of(d, ("edge_request", "edge_request_s"), where)
        if key is not None:
            kw["edge_request_s"] = parse_seconds(d[key], f"{where} {key}")
        for direction in ("uplink", "downlink"):
            key = _one_of(d, (f"{direction}_burst", f"{direction}_burst_bytes"), where)
            if key is not None:
                kw[f"{direction}_burst_bytes"] = parse_bytes(d[key], f"{where} {key}")
        key = _one_of(d, ("memory", "memory_bytes", "memory_mb"), where)
        if key == "memory_mb":
            kw["memory_bytes"] = int(parse_bytes(d[key], f"{where} {key}") * 2**20)
        elif key is not None:
            kw["memory_bytes"] = parse_bytes(d[key], f"{where} {key}")
        speed = d.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float):
            raise PlanningError(f"{where}: speed must be a number, got {speed!r}")
        count = d.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise PlanningError(f"{where}: count must be an integer >= 1, got {count!r}")
        names = [name] if count == 1 else [f"{name}-{k}" for k in range(count)]
        out.extend(DeviceProfile(name=nm, speed=float(speed), **kw) for nm in names)
    return tuple(out)


def problem_from_dict(data: Any, mode: str | None = None) -> PlanningProblem:
    """Build a problem from the parsed planning input; ``mode`` (if given) overrides the file's."""
    if not isinstance(data, dict):
        raise PlanningError("planning input: expected a mapping with 'model' and 'devices'")
    _check_keys(data, _TOP_KEYS, "planning input")
    for key in ("model", "devices"):
        if key not in data:
            raise PlanningError(f"planning input: missing '{key}'")
    kw = {k: data[k] for k in ("min_head", "min_tail", "batches_per_round") if k in data}
    return PlanningProblem(
        model=_model_from_dict(data["model"]),
        devices=_devices_from_list(data["devices"]),
        mode=mode or data.get("mode", "inference"),
        **kw,
    )


def load_problem(path: str | Path, mode: str | None = None) -> PlanningProblem:
    """Read a planning input (``.json``, else YAML). Every problem with the file is a :class:`PlanningError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanningError(f"planning input {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanningError(f"cannot read planning input {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlanningError(f"planning input {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                            f"{str(exc).splitlines()[0]}") from None
    try:
        return problem_from_dict(data, mode)
    except PlanningError as exc:
        raise PlanningError(f"{path}: {exc}") from None


def problem_to_dict(problem: PlanningProblem) -> dict[str, Any]:
    """The planning-input form of a problem (seconds, bits per second, bytes): ``problem_from_dict`` inverts it."""
    m = problem.model
    devices = []
    for d in problem.devices:
        item: dict[str, Any] = {"name": d.name, "speed": d.speed, "uplink_bps": d.uplink_bps,
                                "downlink_bps": d.downlink_bps, "delay_s": d.delay_s}
        if d.memory_bytes is not None:
            item["memory_bytes"] = d.memory_bytes
        if d.edge_request_s:
            item["edge_request_s"] = d.edge_request_s
        for key in ("uplink_burst_bytes", "downlink_burst_bytes"):
            if getattr(d, key):
                item[key] = getattr(d, key)
        devices.append(item)
    return {
        "mode": problem.mode,
        "batches_per_round": problem.batches_per_round,
        "min_head": problem.min_head,
        "min_tail": problem.min_tail,
        "model": {"name": m.name, "fwd_s": list(m.fwd_s), "bwd_s": list(m.bwd_s), "edge_fwd_s": list(m.edge_fwd_s),
                  "edge_bwd_s": list(m.edge_bwd_s), "act_bytes": list(m.act_bytes),
                  "param_bytes": list(m.param_bytes), "tail_call_s": m.tail_call_s,
                  "body_call_s": m.body_call_s},
        "devices": devices,
    }


def random_problem(
    seed: int | np.random.Generator,
    n_devices: int,
    n_blocks: int,
    mode: str = "inference",
    *,
    memory: bool = False,
    min_head: int = 1,
    min_tail: int = 1,
    batches_per_round: int = 1,
    edge_speedup: float | None = None,
) -> PlanningProblem:
    """A random but plausible instance: CNN-like blocks, edge 5–50× faster, 1 Mbit/s–1 Gbit/s links, 0–20 ms delay.

    Activations shrink along the model with noise, so different devices (speed 0.25–4×, different links) prefer
    different splits. ``edge_speedup`` fixes how much faster the whole edge runs a block than a speed-1 device
    (default: random in 5–50; scale it with the number of devices for a busy edge). With ``memory``, some devices
    get a memory limit that rules out some splits (never all).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    L = n_blocks
    fwd = rng.lognormal(math.log(5e-3), 1.0, L)
    if edge_speedup is None:
        edge_speedup = rng.uniform(5, 50)
    edge_fwd = fwd / edge_speedup * rng.uniform(0.5, 2.0, L)
    training = mode == "training"
    bwd = fwd * rng.uniform(1.5, 2.5, L) if training else np.zeros(L)
    edge_bwd = edge_fwd * rng.uniform(1.5, 2.5, L) if training else np.zeros(L)
    scale = np.exp(np.linspace(0, math.log(rng.uniform(1e-3, 1.0)), L + 1))
    act = np.maximum(1, (rng.uniform(1e4, 1e6) * scale * rng.lognormal(0, 0.8, L + 1))).astype(int)
    params = rng.integers(1_000, 5_000_000, L)
    model = ModelProfile(
        name=f"random-{L}",
        fwd_s=tuple(float(x) for x in fwd),
        bwd_s=tuple(float(x) for x in bwd),
        edge_fwd_s=tuple(float(x) for x in edge_fwd),
        edge_bwd_s=tuple(float(x) for x in edge_bwd),
        act_bytes=tuple(int(x) for x in act),
        param_bytes=tuple(int(x) for x in params),
    )
    devices = []
    for i in range(n_devices):
        mem = None
        if memory and rng.random() < 0.5:
            # Between the smallest allowed head + tail and the whole model: some splits fit, some do not.
            least = int(params[:min_head].sum() + params[L - min_tail:].sum())
            mem = int(rng.integers(least, int(params.sum()) + 1))
        devices.append(DeviceProfile(
            name=f"dev{i}",
            speed=float(np.exp(rng.uniform(math.log(0.25), math.log(4.0)))),
            uplink_bps=float(np.exp(rng.uniform(math.log(1e6), math.log(1e9)))),
            downlink_bps=float(np.exp(rng.uniform(math.log(1e6), math.log(1e9)))),
            delay_s=float(rng.uniform(0, 0.02)),
            memory_bytes=mem,
        ))
    return PlanningProblem(model, tuple(devices), min_head=min_head, min_tail=min_tail, mode=mode,  # type: ignore[arg-type]
                           batches_per_round=batches_per_round)
