"""Messages with a JSON object beside the tensors: the control planes' way to say what a message is about.

The envelope has no free-form field (it stays small and strictly validated), so a control message carries its
arguments as a JSON object in a uint8 tensor named ``meta``: still pickle-free, still size-capped, and decoded
only by the receiver that expects it. Used by the training control plane and the controller's control plane.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import zmq

from testbed.wire.codec import decode, encode
from testbed.wire.envelope import Envelope, Kind, WireError, WireLimits

META: Final[str] = "meta"
MAX_META_BYTES: Final[int] = 1 << 20
DATA_LIMITS: Final = WireLimits(max_message_bytes=1 << 30)
CONTROL_LIMITS: Final = WireLimits(max_message_bytes=1 << 30, max_header_bytes=16 << 20, max_tensors=1 << 16)


class MetaError(WireError):
    """The ``meta`` tensor is not a JSON object of at most MAX_META_BYTES bytes."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_field", message)


def pack_meta(meta: Mapping[str, Any]) -> np.ndarray:
    """A JSON object as a 1-D uint8 tensor."""
    raw = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_META_BYTES:
        raise MetaError(f"control metadata of {len(raw)} bytes exceeds {MAX_META_BYTES}")
    return np.frombuffer(raw, dtype=np.uint8)


def unpack_meta(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``meta`` object of a received message ({} when it has none)."""
    arr = tensors.get(META)
    if arr is None:
        return {}
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size > MAX_META_BYTES:
        raise MetaError(f"'{META}' must be a 1-D uint8 tensor of at most {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(arr.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetaError(f"'{META}' is not a JSON object: {exc}") from exc
    if not isinstance(meta, dict):
        raise MetaError(f"'{META}' must be a JSON object")
    return meta


def send_message(
    sock: zmq.Socket,
    kind: Kind,
    sender: str,
    seq: int,
    *,
    meta: Mapping[str, Any] | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
    partition: str = "",
    times: Mapping[str, int] | None = None,
    route: bytes | None = None,
    limits: WireLimits = CONTROL_LIMITS,
) -> int:
    """Encode and send; return the bytes put on the wire (header and tensor frames, not the route)."""
    payload: dict[str, np.ndarray] = dict(tensors or {})
    if meta is not None:
        payload[META] = pack_meta(meta)
    frames = encode(Envelope(kind, sender, seq, partition, times_ns=dict(times or {})), payload, limits)
    nbytes = sum(memoryview(f).nbytes for f in frames)
    if route is not None:
        frames.insert(0, route)
    sock.send_multipart(frames, copy=False)
    return nbytes


def recv_message(
    sock: zmq.Socket, *, routed: bool = False, limits: WireLimits = CONTROL_LIMITS
) -> tuple[bytes | None, Envelope, dict[str, np.ndarray], int]:
    """Receive and validate one message: ``(route, envelope, tensors, bytes)``; raises WireError."""
    frames = sock.recv_multipart(copy=False)
    route = None
    if routed:
        route, frames = frames[0].bytes, frames[1:]
    nbytes = sum(len(f) for f in frames)
    try:
        msg = decode(frames, limits)
    except WireError as err:
        err.route = route
        raise
    return route, msg.envelope, msg.tensors, nbytes
