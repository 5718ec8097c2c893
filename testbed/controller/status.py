"""What `testbed status` shows: the status object (pure) and the one-shot client that asks a controller for it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import zmq

from testbed.controller.protocol import split_of
from testbed.controller.registry import Registry
from testbed.errors import TestbedError
from testbed.wire import channel
from testbed.wire.envelope import Kind, WireError
from testbed.wire.messages import CONTROL_LIMITS, send_message, unpack_meta

RAW_LINK_SAMPLES: Final = 64
STATUS_CLIENT_ID: Final = "status-client"


class NoController(TestbedError):
    """No controller answered (none running, wrong endpoint, or a run directory without controller.json)."""


def raw_link(samples: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """Throughput of the last samples, bytes over seconds per direction (bits per second); None when unknown.

    Shown until an estimator hands the controller smoothed estimates (Controller.set_link_estimate).
    """
    recent = list(samples)[-RAW_LINK_SAMPLES:]
    out: dict[str, float | None] = {}
    for direction, key_b, key_s in (("uplink_bps", "bytes_up", "uplink_s"), ("downlink_bps", "bytes_down",
                                                                             "downlink_s")):
        nbytes = sum(s.get(key_b, 0) for s in recent if isinstance(s.get(key_b), int | float))
        secs = sum(s.get(key_s, 0.0) for s in recent if isinstance(s.get(key_s), int | float))
        out[direction] = 8 * nbytes / secs if secs > 0 and nbytes > 0 else None
    out["rtt_s"] = None
    return out


def status_object(endpoint: str, registry: Registry, now: float, partitions: Mapping[str, str],
                  shares: Mapping[str, float], links: Mapping[str, Mapping[str, float | None]],
                  samples: Mapping[str, Iterable[Mapping[str, Any]]], figures: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready picture of the controller: nodes, splits, shares, link estimates, health, recent changes."""
    nodes = []
    for view in registry.nodes():
        partition = partitions.get(view.name) or view.status.get("partition") or None
        split = None
        if isinstance(partition, str):
            try:
                split = list(split_of(partition))
            except TestbedError:
                split = None
        link = dict(links.get(view.name) or {})
        source = "estimate" if link else "raw"
        if not link and view.role == "device":
            link = raw_link(samples.get(view.name, ()))
        nodes.append({
            "name": view.name, "role": view.role, "device_class": view.device_class, "up": view.up,
            "last_seen_s_ago": round(max(0.0, now - view.last_seen), 3), "incarnation": view.incarnation,
            "partition": partition, "split": split, "share": shares.get(view.name),
            "link": {**link, "source": source} if view.role == "device" else None,
            "status": dict(view.status),
            "facts": {k: view.facts.get(k) for k in ("hostname", "machine", "cpu", "logical_cores") if k in view.facts},
        })
    return {
        "endpoint": endpoint, "heartbeat_s": registry.heartbeat_s, "down_after_s": registry.down_after_s,
        "nodes": nodes, "figures": dict(figures),
        "changes": [{"kind": c.kind, "node": c.node, "role": c.role, "s_ago": round(now - c.at, 3)}
                    for c in list(registry.history)[-20:]],
    }


def endpoint_from_run_dir(run_dir: Path) -> str:
    path = run_dir / "controller.json"
    try:
        info = json.loads(path.read_text())
        endpoint = info["endpoint"]
    except FileNotFoundError:
        raise NoController(f"no {path}: is a run (or `testbed controller serve --run-dir {run_dir}`) going?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoController(f"{path} is unreadable: {exc}") from None
    if not isinstance(endpoint, str):
        raise NoController(f"{path}: endpoint is not a string")
    return endpoint


def query_status(endpoint: str, timeout_s: float = 3.0, ctx: zmq.Context | None = None) -> dict[str, Any]:
    """Ask the controller at ``endpoint`` for its status object; NoController if none answers in time."""
    own = ctx is None
    ctx = ctx or zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        channel.configure_socket(sock, CONTROL_LIMITS, linger_ms=0)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise NoController(f"bad controller endpoint {endpoint!r}: {exc}") from None
        send_message(sock, Kind.STATUS, STATUS_CLIENT_ID, 1)
        if not sock.poll(int(timeout_s * 1000)):
            raise NoController(f"no controller answered at {endpoint} within {timeout_s:g} s")
        try:
            _, msg = channel.recv(sock, limits=CONTROL_LIMITS)
            status = unpack_meta(msg.tensors)
        except WireError as exc:
            raise NoController(f"{endpoint} sent a malformed status reply: {exc}") from None
        if msg.envelope.kind is not Kind.STATUS_REPLY:
            raise NoController(f"{endpoint} answered {msg.envelope.kind.value}, not a status reply")
        return status
    finally:
        sock.close(linger=0)
        if own:
            ctx.term()
