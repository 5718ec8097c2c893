"""A thin shell around pyzmq sockets: encode/decode plus routing ids and error replies.

Buffer ownership: :func:`send` hands the arrays' memory to libzmq without copying (frames of at
least ``zmq.COPY_THRESHOLD`` bytes; smaller ones are copied by pyzmq). The frames keep the arrays
alive until libzmq has written them, so dropping your references right after ``send`` is fine, but
**mutating an array after passing it to send is not**: the bytes may still be in flight. Allocate a
fresh array per message instead of reusing a buffer. Close sockets with a linger (see
:func:`configure_socket`) before the process exits: pyzmq aborts ("Bad address") when a process
exits while zero-copy frames are still queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import numpy as np
import zmq

from testbed.wire.codec import Message, decode, encode, error_envelope, peek_ids
from testbed.wire.envelope import DEFAULT_LIMITS, Envelope, MessageTooLarge, WireError, WireLimits

__all__ = ["configure_socket", "recv", "reply_error", "send"]

_NO_TENSORS: Final[Mapping[str, np.ndarray]] = MappingProxyType({})
_SHORT_ERROR_CHARS: Final = 100


def configure_socket(sock: zmq.Socket, limits: WireLimits, *, linger_ms: int = 1000) -> None:
    """Apply ``limits`` at the libzmq level and bound how long close() waits for queued frames.

    ``MAXMSGSIZE`` is per frame in libzmq and a peer exceeding it is silently disconnected, so it is
    only a first line of defence; the total over all frames is checked by :func:`decode`.
    """
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    sock.setsockopt(zmq.LINGER, linger_ms)


def send(
    sock: zmq.Socket,
    envelope: Envelope,
    tensors: Mapping[str, np.ndarray] = _NO_TENSORS,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    route: bytes | None = None,
) -> None:
    """Encode and send one message (zero-copy for large contiguous arrays).

    ``route`` is the ROUTER routing id of the peer to address. Raises :class:`WireError` (or
    :class:`MessageTooLarge`) before anything is sent if the message breaks the protocol or
    ``limits``. The caller must not mutate the arrays afterwards (see the module docstring).
    """
    frames = encode(envelope, tensors, limits)
    if route is not None:
        frames.insert(0, route)
    sock.send_multipart(frames, copy=False)


def recv(
    sock: zmq.Socket,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    routed: bool = False,
    flags: int = 0,
) -> tuple[bytes | None, Message]:
    """Receive and validate one message; returns ``(routing id or None, message)``.

    Set ``routed`` on a ROUTER socket: its first frame is the peer's routing id. A bad message
    raises :class:`WireError` with ``route``, ``device`` and ``seq`` filled in (as far as they can
    be recovered) so the caller can :func:`reply_error`. ``zmq.Again`` propagates with ``NOBLOCK``.
    """
    frames = sock.recv_multipart(flags=flags, copy=False)
    route: bytes | None = None
    if routed:
        route = frames[0].bytes
        frames = frames[1:]
    try:
        return route, decode(frames, limits)
    except WireError as err:
        err.route = route
        if frames:
            err.device, err.seq = peek_ids(memoryview(frames[0]))
        raise


def reply_error(sock: zmq.Socket, route: bytes | None, err: WireError, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Answer a bad message with an ERROR envelope carrying ``err.code`` and ``err.message``.

    The message quotes the offending input, so under a small header cap it may not fit: it is
    then cut to a short ASCII prefix, because the code is what the peer needs.
    """
    envelope = error_envelope(err.code, err.message, device=err.device, seq=err.seq)
    try:
        send(sock, envelope, limits=limits, route=route)
    except MessageTooLarge:
        short = err.message[:_SHORT_ERROR_CHARS].encode("ascii", "replace").decode("ascii")
        envelope = error_envelope(err.code, short, device=err.device, seq=err.seq)
        send(sock, envelope, limits=limits, route=route)
