"""Measured profiles on disk: block profiles (per-block compute times) and link measurements, as YAML (the
records themselves, and their validation, are in :mod:`testbed.profiling.records`).

Two kinds of file live under ``profiles/measured/``:

* a **block profile** (``kind: blocks``): one model on one runtime of one machine. Per batch size and per block,
  the forward (and, for training, backward) time as median, p10 and p90 over the timed repeats, plus the whole
  model timed in one run (a check on the per-block sum), the activation shape at every split point and the
  parameter bytes of every block;
* a **link measurement** (``kind: link``): round-trip time and throughput of one device's path to an edge server
  over the real ZeroMQ protocol, and the edge's fixed per-request handling cost seen over that path.

Fields added after the first files were written (``call_ms`` of a batch; ``request_bytes``, ``request_rtt_ms``,
``request_echo_rtt_ms``, ``edge_request_ms``, ``request_residence_ms`` and ``request_echo_residence_ms`` of a
link) are optional: files without them load, with the costs
unmeasured (0 in the model).

Times are milliseconds in the files (``*_ms`` keys, rounded to the nanosecond) and seconds in memory. Every file
records the host facts of the machine that measured it. Loading validates everything and raises
:class:`ProfileError` naming the file and the field. This module is pure (no torch): the planner side loads
profiles without the measuring stack.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from testbed.profiling.records import (
    BatchTimings,
    BlockProfile,
    LinkMeasurement,
    ProfileError,
    Stat,
    is_int,
    is_real,
    utc_now,
)

__all__ = [
    "FORMAT",
    "MEASURED_DIR",
    "default_link_path",
    "default_profile_path",
    "load_block_profile",
    "load_link_measurement",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
    "runtime_tag",
    "save_profile",
]

#: The format tag written in (and required of) every profile file.
FORMAT: Final[str] = "testbed.profile/1"
#: Where measured profiles are kept by default (the repository's profiles/measured/).
MEASURED_DIR: Final[Path] = Path(__file__).resolve().parents[2] / "profiles" / "measured"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------------
# File names


def _safe(text: str) -> str:
    return _SAFE_NAME.sub("-", text).strip("-.") or "x"


def runtime_tag(profile: BlockProfile) -> str:
    """``onnxruntime``, ``torch``, ``torch-cuda``…, with ``-training`` for a training profile."""
    tag = profile.runtime
    kind = profile.device.split(":")[0]
    if kind != "cpu":
        tag += f"-{kind}"
    if profile.threads != 1:
        tag += f"-t{profile.threads}"
    return tag + ("-training" if profile.training else "")


def default_profile_path(profile: BlockProfile, root: Path = MEASURED_DIR) -> Path:
    """``root/<host>-<model>-<runtime tag>.yaml``."""
    return Path(root) / f"{_safe(profile.host_name)}-{_safe(profile.model)}-{runtime_tag(profile)}.yaml"


def default_link_path(link: LinkMeasurement, root: Path = MEASURED_DIR) -> Path:
    """``root/<host>-link-<endpoint host and port>.yaml``."""
    target = re.sub(r"^[a-z]+://", "", link.endpoint)
    return Path(root) / f"{_safe(link.host_name)}-link-{_safe(target.replace(':', '-'))}.yaml"


# ---------------------------------------------------------------------------------------------
# Serialisation


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


def _stat_to(s: Stat) -> dict[str, Any]:
    return {"median": _ms(s.median), "p10": _ms(s.p10), "p90": _ms(s.p90), "n": s.n}


def _stats_to(stats: Sequence[Stat]) -> dict[str, Any]:
    return {"median": [_ms(s.median) for s in stats], "p10": [_ms(s.p10) for s in stats],
            "p90": [_ms(s.p90) for s in stats], "n": [s.n for s in stats]}


class _Reader:
    """Field access on a parsed mapping with errors that name the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, msg: str) -> ProfileError:
        return ProfileError(f"{self.where}: {msg}")

    def mapping(self, d: Any, what: str, required: Sequence[str] = (), allowed: Sequence[str] | None = None
                ) -> Mapping[str, Any]:
        if not isinstance(d, Mapping):
            raise self.fail(f"{what} must be a mapping")
        missing = [k for k in required if k not in d]
        if missing:
            raise self.fail(f"{what}: missing {', '.join(missing)}")
        if allowed is not None:
            unknown = sorted(str(k) for k in d if k not in allowed)
            if unknown:
                raise self.fail(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        return d

    def num(self, v: Any, what: str) -> float:
        if not is_real(v) or not math.isfinite(v):
            raise self.fail(f"{what} must be a finite number, got {v!r}")
        return float(v)

    def int_(self, v: Any, what: str) -> int:
        if not is_int(v):
            raise self.fail(f"{what} must be an integer, got {v!r}")
        return int(v)

    def str_(self, v: Any, what: str) -> str:
        if not isinstance(v, str):
            raise self.fail(f"{what} must be a string, got {v!r}")
        return v

    def stat(self, d: Any, what: str) -> Stat:
        d = self.mapping(d, what, ("median", "p10", "p90", "n"), ("median", "p10", "p90", "n"))
        try:
            return Stat(self.num(d["median"], f"{what}.median") / 1e3, self.num(d["p10"], f"{what}.p10") / 1e3,
                        self.num(d["p90"], f"{what}.p90") / 1e3, self.int_(d["n"], f"{what}.n"))
        except ProfileError as exc:
            if str(exc).startswith(self.where):
                raise
            raise self.fail(f"{what}: {exc}") from None

    def stats(self, d: Any, what: str, length: int) -> tuple[Stat, ...]:
        d = self.mapping(d, what, ("median", "p10", "p90", "n"), ("median", "p10", "p90", "n"))
        cols = {}
        for key in ("median", "p10", "p90", "n"):
            col = d[key]
            if not isinstance(col, list) or len(col) != length:
                raise self.fail(f"{what}.{key} must be a list of {length} entries (one per block)")
            cols[key] = col
        out = []
        for k in range(length):
            out.append(self.stat({key: cols[key][k] for key in cols}, f"{what}[{k}]"))
        return tuple(out)


def profile_to_dict(profile: BlockProfile | LinkMeasurement) -> dict[str, Any]:
    """The file form of a profile (milliseconds, plain lists and mappings)."""
    if isinstance(profile, LinkMeasurement):
        return {
            "format": FORMAT,
            "kind": "link",
            "created": profile.created or utc_now(),
            "endpoint": profile.endpoint,
            "host": dict(profile.host),
            "rtt_ms": _stat_to(profile.rtt),
            "delay_ms": _ms(profile.delay_s),
            "uplink_bps": round(profile.uplink_bps),
            "downlink_bps": None if profile.downlink_bps is None else round(profile.downlink_bps),
            "downlink_method": profile.downlink_method,
            "sizes_bytes": list(profile.sizes),
            "uplink_rtt_ms": _stats_to(profile.uplink_rtt),
            "echo_rtt_ms": None if profile.echo_rtt is None else _stats_to(profile.echo_rtt),
            "request_bytes": profile.request_bytes,
            "request_rtt_ms": None if profile.request_rtt is None else _stat_to(profile.request_rtt),
            "request_echo_rtt_ms": None if profile.request_echo_rtt is None else _stat_to(profile.request_echo_rtt),
            "edge_request_ms": None if profile.edge_request_s is None else _ms(profile.edge_request_s),
            **({} if profile.request_residence is None or profile.request_echo_residence is None else {
                "request_residence_ms": _stat_to(profile.request_residence),
                "request_echo_residence_ms": _stat_to(profile.request_echo_residence)}),
            "uplink_burst_bytes": profile.uplink_burst_bytes,
            "downlink_burst_bytes": profile.downlink_burst_bytes,
            "notes": profile.notes,
        }
    if not isinstance(profile, BlockProfile):
        raise ProfileError(f"cannot save a {type(profile).__name__} as a profile")
    batches = []
    for b in profile.batches:
        batches.append({
            "batch_size": b.batch_size,
            "fwd_ms": _stats_to(b.fwd),
            "bwd_ms": None if b.bwd is None else _stats_to(b.bwd),
            "model_fwd_ms": _stat_to(b.model_fwd),
            "model_bwd_ms": None if b.model_bwd is None else _stat_to(b.model_bwd),
            **({} if b.call is None else {"call_ms": _stat_to(b.call)}),
        })
    return {
        "format": FORMAT,
        "kind": "blocks",
        "created": profile.created or utc_now(),
        "model": {"name": profile.model, "config": dict(profile.config), "weights_hash": profile.weights_hash,
                  "num_blocks": profile.num_blocks},
        "measurement": {"runtime": profile.runtime, "device": profile.device, "threads": profile.threads,
                        "training": profile.training, "method": profile.method, "warmup": profile.warmup,
                        "repeats": profile.repeats, "idle_ms": round(profile.idle_s * 1e3, 6)},
        "reference": {"speed_vs_pi4": profile.speed_vs_pi4, "source": profile.speed_source},
        "host": dict(profile.host),
        "act_shapes": [list(s) for s in profile.act_shapes],
        "act_bytes_per_sample": list(profile.act_bytes_per_sample),
        "param_bytes": list(profile.param_bytes),
        "batches": batches,
    }


_BLOCK_KEYS = ("format", "kind", "created", "model", "measurement", "reference", "host", "act_shapes",
               "act_bytes_per_sample", "param_bytes", "batches")
_LINK_KEYS = ("format", "kind", "created", "endpoint", "host", "rtt_ms", "delay_ms", "uplink_bps", "downlink_bps",
              "downlink_method", "sizes_bytes", "uplink_rtt_ms", "echo_rtt_ms", "request_bytes", "request_rtt_ms",
              "request_echo_rtt_ms", "edge_request_ms", "request_residence_ms", "request_echo_residence_ms", "notes",
              "uplink_burst_bytes", "downlink_burst_bytes")


def _link_from(d: Mapping[str, Any], r: _Reader) -> LinkMeasurement:
    d = r.mapping(d, "link measurement", ("endpoint", "rtt_ms", "uplink_bps", "sizes_bytes", "uplink_rtt_ms"),
                  _LINK_KEYS)
    sizes = d["sizes_bytes"]
    if not isinstance(sizes, list) or not all(is_int(s) for s in sizes):
        raise r.fail("sizes_bytes must be a list of integers")
    down = d.get("downlink_bps")
    echo = d.get("echo_rtt_ms")
    request = d.get("request_rtt_ms")
    request_echo = d.get("request_echo_rtt_ms")
    request_bytes = d.get("request_bytes")
    edge_request = d.get("edge_request_ms")
    residence, echo_residence = d.get("request_residence_ms"), d.get("request_echo_residence_ms")
    try:
        link = LinkMeasurement(
            endpoint=r.str_(d["endpoint"], "endpoint"),
            rtt=r.stat(d["rtt_ms"], "rtt_ms"),
            sizes=tuple(sizes),
            uplink_rtt=r.stats(d["uplink_rtt_ms"], "uplink_rtt_ms", len(sizes)),
            uplink_bps=r.num(d["uplink_bps"], "uplink_bps"),
            downlink_bps=None if down is None else r.num(down, "downlink_bps"),
            echo_rtt=None if echo is None else r.stats(echo, "echo_rtt_ms", len(sizes)),
            downlink_method=r.str_(d.get("downlink_method", "none"), "downlink_method"),
            host=r.mapping(d.get("host", {}), "host"),
            created=str(d.get("created", "")),
            notes=r.str_(d.get("notes", ""), "notes"),
            request_bytes=None if request_bytes is None else r.int_(request_bytes, "request_bytes"),
            request_rtt=None if request is None else r.stat(request, "request_rtt_ms"),
            request_echo_rtt=None if request_echo is None else r.stat(request_echo, "request_echo_rtt_ms"),
            edge_request_s=None if edge_request is None else r.num(edge_request, "edge_request_ms") / 1e3,
            request_residence=None if residence is None else r.stat(residence, "request_residence_ms"),
            request_echo_residence=None if echo_residence is None else r.stat(echo_residence,
                                                                              "request_echo_residence_ms"),
            uplink_burst_bytes=r.int_(d.get("uplink_burst_bytes", 0), "uplink_burst_bytes"),
            downlink_burst_bytes=r.int_(d.get("downlink_burst_bytes", 0), "downlink_burst_bytes"),
        )
    except ProfileError as exc:
        if str(exc).startswith(r.where):
            raise
        raise r.fail(str(exc)) from None
    return link


def _blocks_from(d: Mapping[str, Any], r: _Reader) -> BlockProfile:
    d = r.mapping(d, "block profile", ("model", "measurement", "reference", "act_shapes", "param_bytes", "batches"),
                  _BLOCK_KEYS)
    model = r.mapping(d["model"], "model", ("name", "config", "weights_hash"),
                      ("name", "config", "weights_hash", "num_blocks"))
    keys = ("runtime", "device", "threads", "training", "method", "warmup", "repeats")
    meas = r.mapping(d["measurement"], "measurement", keys, (*keys, "idle_ms"))  # idle_ms: newer files
    ref = r.mapping(d["reference"], "reference", ("speed_vs_pi4", "source"), ("speed_vs_pi4", "source"))
    params = d["param_bytes"]
    if not isinstance(params, list) or not all(is_int(p) for p in params):
        raise r.fail("param_bytes must be a list of integers")
    L = len(params)
    if "num_blocks" in model and model["num_blocks"] != L:
        raise r.fail(f"model.num_blocks = {model['num_blocks']!r} but param_bytes has {L} entries")
    shapes = d["act_shapes"]
    if not isinstance(shapes, list) or not all(isinstance(s, list) and all(is_int(x) for x in s) for s in shapes):
        raise r.fail("act_shapes must be a list of shapes (lists of integers)")
    raw_batches = d["batches"]
    if not isinstance(raw_batches, list) or not raw_batches:
        raise r.fail("batches must be a non-empty list")
    batches = []
    for k, rb in enumerate(raw_batches):
        what = f"batches[{k}]"
        rb = r.mapping(rb, what, ("batch_size", "fwd_ms", "model_fwd_ms"),
                       ("batch_size", "fwd_ms", "bwd_ms", "model_fwd_ms", "model_bwd_ms", "call_ms"))
        bwd, model_bwd, call = rb.get("bwd_ms"), rb.get("model_bwd_ms"), rb.get("call_ms")
        try:
            batches.append(BatchTimings(
                batch_size=r.int_(rb["batch_size"], f"{what}.batch_size"),
                fwd=r.stats(rb["fwd_ms"], f"{what}.fwd_ms", L),
                model_fwd=r.stat(rb["model_fwd_ms"], f"{what}.model_fwd_ms"),
                bwd=None if bwd is None else r.stats(bwd, f"{what}.bwd_ms", L),
                model_bwd=None if model_bwd is None else r.stat(model_bwd, f"{what}.model_bwd_ms"),
                call=None if call is None else r.stat(call, f"{what}.call_ms"),
            ))
        except ProfileError as exc:
            if str(exc).startswith(r.where):
                raise
            raise r.fail(f"{what}: {exc}") from None
    training = meas["training"]
    if not isinstance(training, bool):
        raise r.fail(f"measurement.training must be true or false, got {training!r}")
    try:
        profile = BlockProfile(
            model=r.str_(model["name"], "model.name"),
            config=r.mapping(model["config"], "model.config"),
            weights_hash=r.str_(model["weights_hash"], "model.weights_hash"),
            runtime=r.str_(meas["runtime"], "measurement.runtime"),
            device=r.str_(meas["device"], "measurement.device"),
            threads=r.int_(meas["threads"], "measurement.threads"),
            training=training,
            warmup=r.int_(meas["warmup"], "measurement.warmup"),
            repeats=r.int_(meas["repeats"], "measurement.repeats"),
            method=r.str_(meas["method"], "measurement.method"),
            act_shapes=tuple(tuple(s) for s in shapes),
            param_bytes=tuple(params),
            batches=tuple(batches),
            speed_vs_pi4=r.num(ref["speed_vs_pi4"], "reference.speed_vs_pi4"),
            speed_source=r.str_(ref["source"], "reference.source"),
            host=r.mapping(d.get("host", {}), "host"),
            created=str(d.get("created", "")),
            idle_s=r.num(meas.get("idle_ms", 0.0), "measurement.idle_ms") * 1e-3,
        )
    except ProfileError as exc:
        if str(exc).startswith(r.where):
            raise
        raise r.fail(str(exc)) from None
    if "act_bytes_per_sample" in d and list(d["act_bytes_per_sample"]) != list(profile.act_bytes_per_sample):
        raise r.fail("act_bytes_per_sample does not match act_shapes (float32)")
    return profile


def profile_from_dict(data: Any, where: str = "profile") -> BlockProfile | LinkMeasurement:
    """Rebuild a profile from its file form; ``where`` names the source in error messages."""
    r = _Reader(where)
    d = r.mapping(data, "profile", ("format", "kind"))
    if d["format"] != FORMAT:
        raise r.fail(f"format {d['format']!r} is not {FORMAT!r} (written by another version of the testbed?)")
    if d["kind"] == "blocks":
        return _blocks_from(d, r)
    if d["kind"] == "link":
        return _link_from(d, r)
    raise r.fail(f"kind {d['kind']!r} is neither 'blocks' nor 'link'")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists of scalars (one line per per-block column)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, dict | list) for x in data) or all(
        isinstance(x, list) and all(not isinstance(y, dict | list) for y in x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def save_profile(profile: BlockProfile | LinkMeasurement, path: str | Path) -> Path:
    """Write a profile as YAML (atomically; parent folders are created); returns the path."""
    path = Path(path)
    text = yaml.dump(profile_to_dict(profile), Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)
    # The file must load back into the same profile: check before anything is written.
    profile_from_dict(yaml.safe_load(text), str(path))
    try:
        _atomic_write_text(path, text)
    except OSError as exc:
        raise ProfileError(f"cannot write profile {path}: {exc}") from None
    return path


def load_profile(path: str | Path) -> BlockProfile | LinkMeasurement:
    """Read a profile file of either kind; every problem is a :class:`ProfileError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return profile_from_dict(data, str(path))


def load_block_profile(path: str | Path) -> BlockProfile:
    """Read a block profile (``kind: blocks``)."""
    profile = load_profile(path)
    if not isinstance(profile, BlockProfile):
        raise ProfileError(f"{path} is a link measurement, not a block profile")
    return profile


def load_link_measurement(path: str | Path) -> LinkMeasurement:
    """Read a link measurement (``kind: link``)."""
    profile = load_profile(path)
    if not isinstance(profile, LinkMeasurement):
        raise ProfileError(f"{path} is a block profile, not a link measurement")
    return profile
