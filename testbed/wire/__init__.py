"""The testbed's wire protocol: ZeroMQ multipart messages with a JSON header and raw tensor frames.

Self-contained on purpose (numpy and pyzmq only, never torch, never pickle) so that the smallest
device agent can speak it. See docs/wire.md for the protocol description.
"""

from testbed.wire.channel import configure_socket, recv, reply_error, send
from testbed.wire.codec import Message, decode, encode, error_envelope, peek_ids
from testbed.wire.envelope import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    ERROR_CODES,
    PROTOCOL_VERSION,
    Envelope,
    ErrorInfo,
    Kind,
    MessageTooLarge,
    TensorSpec,
    WireError,
    WireLimits,
)

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_LIMITS",
    "ERROR_CODES",
    "PROTOCOL_VERSION",
    "Envelope",
    "ErrorInfo",
    "Kind",
    "Message",
    "MessageTooLarge",
    "TensorSpec",
    "WireError",
    "WireLimits",
    "configure_socket",
    "decode",
    "encode",
    "error_envelope",
    "peek_ids",
    "recv",
    "reply_error",
    "send",
]
