"""The controller's commands and the rules their arguments obey (pure: no sockets, no threads).

A command travels as a ``command`` envelope whose ``meta`` is ``{"command": NAME, "args": {...}}`` (plus uint8
tensors for deployed artifacts). :func:`parse_command` checks the name and every argument (type, range, unknown
keys) and raises :class:`CommandError` with a code and a one-line message, which the receiver sends back as an
``error`` reply. A node answers with :func:`dispatch`: a plain function per command, ``handler(command) -> result``,
so the handlers never see the transport. Torch-free: the device agent imports this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from testbed.errors import TestbedError

DEPLOY, SET_SPLIT, START, STOP, REPORT, SET_SHARES = "deploy", "set_split", "start", "stop", "report", "set_shares"
PROFILE, DEPLOY_BODY = "profile", "deploy_body"
#: Commands a device agent takes, and those the edge server takes.
DEVICE_COMMANDS: Final = (DEPLOY, SET_SPLIT, START, STOP, REPORT, PROFILE)
EDGE_COMMANDS: Final = (SET_SHARES, REPORT, DEPLOY_BODY)
COMMANDS: Final = (DEPLOY, SET_SPLIT, START, STOP, REPORT, SET_SHARES, PROFILE, DEPLOY_BODY)

MAX_BATCH: Final = 4096
MAX_REQUESTS: Final = 10_000_000
MAX_DURATION_S: Final = 7 * 86400.0
#: Bounds of a `profile` command: the agent measures at most this much (sizes, rounds, time).
MAX_PROFILE_SIZES: Final = 8
MAX_PROFILE_BYTES: Final = 64 << 20
MAX_PROFILE_COUNT: Final = 1000
MAX_PROFILE_BUDGET_S: Final = 600.0
#: What a `profile` command measures unless told otherwise: small enough for an LTE uplink within the budget.
PROFILE_SIZES: Final = (16 * 1024, 256 * 1024)
_PARTITION_RE: Final = re.compile(r"[0-9a-fA-F]{16}(?:[0-9a-fA-F]{48})?:(\d{1,4}):(\d{1,4})\Z")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}\Z")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_ENDPOINT_RE: Final = re.compile(r"(tcp|ipc|inproc)://\S{1,250}\Z")


class CommandError(TestbedError):
    """A command that cannot be carried out; ``code`` is machine-readable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Command:
    """A validated command: its name, its arguments (defaults filled in) and any tensors it carries."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)


Handler = Callable[[Command], Mapping[str, Any]]


def split_of(partition: str) -> tuple[int, int]:
    """``(a, b)`` of a partition id ``weights_hash:a:b`` (checked by :func:`check_partition` first)."""
    match = _PARTITION_RE.match(partition)
    if match is None:
        raise CommandError("bad_args", f"partition {partition!r} is not weights_hash:a:b (16 or 64 hex digits)")
    return int(match.group(1)), int(match.group(2))


# ---- argument checks: each returns the value or raises CommandError("bad_args", ...) -------------------------


def _fail(command: str, key: str, why: str) -> CommandError:
    return CommandError("bad_args", f"{command}: argument {key!r} {why}")


def _int(lo: int, hi: int) -> Callable[[str, str, Any], int]:
    def check(command: str, key: str, v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(command, key, f"must be an integer in {lo}..{hi}, got {v!r}")
        return v
    return check


def _float(lo_exclusive: float, hi: float) -> Callable[[str, str, Any], float]:
    def check(command: str, key: str, v: Any) -> float:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo_exclusive < v <= hi:
            raise _fail(command, key, f"must be a number in ({lo_exclusive}, {hi}], got {v!r}")
        return float(v)
    return check


def _bool(command: str, key: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _fail(command, key, f"must be true or false, got {v!r}")
    return v


def _partition(command: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or _PARTITION_RE.match(v) is None:
        raise _fail(command, key, f"must be a partition id weights_hash:a:b, got {v!r}")
    a, b = split_of(v)
    if not 1 <= a <= b:
        raise _fail(command, key, f"needs 1 <= a <= b, got {v!r}")
    return v


def _sha256(command: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or _SHA256_RE.match(v) is None:
        raise _fail(command, key, f"must be 64 lower-case hex digits, got {v!r}")
    return v


def _endpoint(command: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or _ENDPOINT_RE.match(v) is None:
        raise _fail(command, key, f"must be a ZeroMQ endpoint such as tcp://127.0.0.1:5555, got {v!r}")
    return v


def _path(command: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 4096 or "\x00" in v:
        raise _fail(command, key, f"must be a file path, got {v!r}")
    return v


def _shares(command: str, key: str, v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or not 0 < len(v) <= 1024:
        raise _fail(command, key, f"must be an object of 1..1024 DEVICE: WEIGHT entries, got {v!r}")
    out: dict[str, float] = {}
    for name, weight in v.items():
        if _NAME_RE.match(name) is None:
            raise _fail(command, key, f"has a bad device name {name!r}")
        out[name] = _float(0.0, 1e9)(command, f"{key}.{name}", weight)
    return out


def _sizes(command: str, key: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or not 2 <= len(v) <= MAX_PROFILE_SIZES:
        raise _fail(command, key, f"must be a list of 2..{MAX_PROFILE_SIZES} byte counts, got {v!r}")
    out = tuple(_int(1, MAX_PROFILE_BYTES)(command, f"{key}[{i}]", s) for i, s in enumerate(v))
    if len(set(out)) < 2:
        raise _fail(command, key, f"needs at least two different sizes (a rate is a slope), got {v!r}")
    return out


def _echo_partition(command: str, key: str, v: Any) -> str:
    a, b = split_of(_partition(command, key, v))
    if a != b:
        raise _fail(command, key, f"must be an empty-body partition weights_hash:a:a, got {v!r}")
    return str(v)


def _shape(command: str, key: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or not 1 <= len(v) <= 8:
        raise _fail(command, key, f"must be a list of 1..8 dimensions, got {v!r}")
    return tuple(_int(1, 1 << 20)(command, f"{key}[{i}]", d) for i, d in enumerate(v))


Check = Callable[[str, str, Any], Any]
_REQUIRED: Final = object()

#: Per command: argument -> (check, default or _REQUIRED). None as a default means "absent".
SCHEMAS: Final[Mapping[str, Mapping[str, tuple[Check, Any]]]] = {
    DEPLOY: {"partition": (_partition, _REQUIRED), "version": (_int(0, 2**53), _REQUIRED),
             "head_sha256": (_sha256, _REQUIRED), "tail_sha256": (_sha256, _REQUIRED),
             "activate": (_bool, False)},
    SET_SPLIT: {"partition": (_partition, _REQUIRED)},
    START: {"edge": (_endpoint, _REQUIRED), "data": (_path, None), "synthetic_samples": (_int(1, 1 << 20), 64),
            "batch_size": (_int(1, MAX_BATCH), 1), "requests": (_int(1, MAX_REQUESTS), None),
            "duration_s": (_float(0.0, MAX_DURATION_S), None), "rate_rps": (_float(0.0, 1e6), None),
            "timeout_s": (_float(0.0, 3600.0), 30.0), "seed": (_int(0, 2**32 - 1), 0)},
    STOP: {},
    REPORT: {"requests": (_bool, False)},
    SET_SHARES: {"shares": (_shares, _REQUIRED)},
    PROFILE: {"edge": (_endpoint, _REQUIRED), "sizes": (_sizes, PROFILE_SIZES),
              "count": (_int(1, MAX_PROFILE_COUNT), 8), "warmup": (_int(0, 100), 2),
              "timeout_s": (_float(0.0, 60.0), 5.0), "budget_s": (_float(0.0, MAX_PROFILE_BUDGET_S), 30.0),
              "echo_partition": (_echo_partition, None), "echo_shape": (_shape, None)},
    DEPLOY_BODY: {"weights_sha256": (_sha256, _REQUIRED), "version": (_int(0, 2**53), _REQUIRED)},
}
#: Tensors a command must carry (uint8, 1-D), and no others.
TENSORS: Final[Mapping[str, tuple[str, ...]]] = {DEPLOY: ("head", "tail"), DEPLOY_BODY: ("weights",)}


def check_args(name: str, args: Any) -> dict[str, Any]:
    """Validated arguments with defaults filled in; unknown names and keys are errors."""
    schema = SCHEMAS.get(name) if isinstance(name, str) else None
    if schema is None:
        raise CommandError("unknown_command", f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if not isinstance(args, dict):
        raise CommandError("bad_args", f"{name}: args must be a JSON object, got {type(args).__name__}")
    unknown = sorted(set(args) - set(schema))
    if unknown:
        raise CommandError("bad_args", f"{name}: unknown argument(s) {unknown}; allowed: {sorted(schema)}")
    out: dict[str, Any] = {}
    for key, (check, default) in schema.items():
        if key in args and args[key] is not None:
            out[key] = check(name, key, args[key])
        elif default is _REQUIRED:
            raise CommandError("bad_args", f"{name}: argument {key!r} is required")
        else:
            out[key] = default
    if name == START and out["requests"] is None and out["duration_s"] is None:
        raise CommandError("bad_args", "start: give 'requests' or 'duration_s' (a workload must end)")
    if name == PROFILE and (out["echo_partition"] is None) != (out["echo_shape"] is None):
        raise CommandError("bad_args", "profile: 'echo_partition' and 'echo_shape' go together")
    return out


def parse_command(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Command:
    """A :class:`Command` from a received message's meta object and tensors (``meta`` excluded)."""
    unknown = sorted(set(meta) - {"command", "args"})
    if unknown:
        raise CommandError("bad_args", f"command message has unknown key(s) {unknown}")
    name = meta.get("command")
    args = check_args(name, meta.get("args", {}))
    expected = TENSORS.get(name, ())
    if sorted(tensors) != sorted(expected):
        raise CommandError("bad_args", f"{name}: expected tensors {list(expected)}, got {sorted(tensors)}")
    for key, arr in tensors.items():
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise CommandError("bad_args", f"{name}: tensor {key!r} must be 1-D uint8 bytes")
    return Command(name, args, dict(tensors))


def dispatch(command: Command, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    """Run the node's handler for ``command``; a command this node does not take is a CommandError."""
    handler = handlers.get(command.name)
    if handler is None:
        raise CommandError("unsupported_command",
                           f"this node does not take {command.name!r}; it takes {', '.join(sorted(handlers))}")
    return dict(handler(command))


# ---- registration and heartbeat objects ----------------------------------------------------------------------

MAX_SAMPLES: Final = 512  # data-plane samples per heartbeat


def check_register(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The REGISTER object: role, device_class, facts (free-form, best effort), heartbeat_s."""
    role = meta.get("role")
    if role not in ("device", "edge"):
        raise CommandError("bad_args", f"register: role must be 'device' or 'edge', got {role!r}")
    device_class = meta.get("device_class", "")
    if not isinstance(device_class, str) or len(device_class) > 64:
        raise CommandError("bad_args", f"register: device_class must be a string of <= 64 chars, got {device_class!r}")
    facts = meta.get("facts", {})
    if not isinstance(facts, dict):
        raise CommandError("bad_args", "register: facts must be a JSON object")
    unknown = sorted(set(meta) - {"role", "device_class", "facts"})
    if unknown:
        raise CommandError("bad_args", f"register: unknown key(s) {unknown}")
    return {"role": role, "device_class": device_class, "facts": facts}


def check_heartbeat(meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The HEARTBEAT object: ``status`` (free-form object) and ``samples`` (data-plane timings, a list)."""
    unknown = sorted(set(meta) - {"status", "samples"})
    if unknown:
        raise CommandError("bad_args", f"heartbeat: unknown key(s) {unknown}")
    status = meta.get("status", {})
    samples = meta.get("samples", [])
    if not isinstance(status, dict):
        raise CommandError("bad_args", "heartbeat: status must be a JSON object")
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES or not all(isinstance(s, dict) for s in samples):
        raise CommandError("bad_args", f"heartbeat: samples must be a list of at most {MAX_SAMPLES} objects")
    return status, samples
