"""The message envelope: what travels in the JSON header frame, and the rules it must obey.

Every field is validated when an :class:`Envelope` is constructed, so an invalid envelope can
neither be sent nor come out of :func:`testbed.wire.codec.decode`. Limits that depend on the
deployment (message size, tensor count, rank) live in :class:`WireLimits` and are checked by the
codec, because the dataclasses cannot know them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

PROTOCOL_VERSION: Final[int] = 1

#: numpy dtype names accepted on the wire. Data is always little-endian.
ALLOWED_DTYPES: Final[frozenset[str]] = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)

#: Every value :attr:`WireError.code` can take.
ERROR_CODES: Final[frozenset[str]] = frozenset(
    {
        "bad_header",
        "bad_version",
        "bad_kind",
        "bad_device",
        "bad_dtype",
        "bad_shape",
        "size_mismatch",
        "frame_count",
        "too_large",
        "bad_field",
    }
)

MAX_SEQ: Final[int] = 2**63 - 1
MAX_TIME_NS: Final[int] = 2**63 - 1
MAX_DIM: Final[int] = 2**63 - 1
MAX_TIMES: Final[int] = 16
MAX_PARTITION_CHARS: Final[int] = 128
MAX_TENSOR_NAME_CHARS: Final[int] = 128
MAX_ERROR_MESSAGE_CHARS: Final[int] = 4096

# \Z rather than $: "$" would accept a trailing newline.
_DEVICE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_TIME_KEY_RE: Final = re.compile(r"[a-z0-9_]{1,40}\Z")
_ERROR_CODE_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_PARTITION_RE: Final = re.compile(r"[\x20-\x7e]{0,128}\Z")  # printable ASCII, MAX_PARTITION_CHARS
_TENSOR_NAME_RE: Final = re.compile(r"[\x20-\x7e]{1,128}\Z")  # printable ASCII, MAX_TENSOR_NAME_CHARS

_ITEMSIZE: Final[dict[str, int]] = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


class Kind(enum.StrEnum):
    """What a message is for; the string value is what goes on the wire."""

    INFER_REQUEST = "infer_request"
    INFER_REPLY = "infer_reply"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    # Split training (added after the first release; the values above are unchanged).
    # Data plane, device <-> edge: activations up, activations down, gradients up, gradients down.
    TRAIN_FORWARD = "train_forward"
    TRAIN_FORWARD_REPLY = "train_forward_reply"
    TRAIN_BACKWARD = "train_backward"
    TRAIN_BACKWARD_REPLY = "train_backward_reply"
    # Control plane, controller <-> training agents: run a stretch of steps; move model state.
    ROUND_START = "round_start"
    ROUND_END = "round_end"
    SYNC = "sync"
    SYNC_REPLY = "sync_reply"
    # Controller control plane (agents and the edge dial the controller; see docs/controller.md).
    REGISTER = "register"
    REGISTERED = "registered"
    HEARTBEAT = "heartbeat"
    COMMAND = "command"
    COMMAND_REPLY = "command_reply"
    STATUS = "status"
    STATUS_REPLY = "status_reply"


class WireError(Exception):
    """A message (or one about to be sent) violates the protocol.

    ``code`` is one of :data:`ERROR_CODES` so that a peer can react programmatically; ``message``
    names the offending field precisely. :func:`testbed.wire.channel.recv` also fills ``route``,
    ``device`` and ``seq`` (best effort) so a server can address an error reply.
    """

    code: str
    message: str
    route: bytes | None
    device: str
    seq: int

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.route = None
        self.device = "unknown"
        self.seq = 0


class MessageTooLarge(WireError):
    """A header or a whole message exceeds :class:`WireLimits`; raised by senders and receivers."""

    def __init__(self, message: str) -> None:
        super().__init__("too_large", message)


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Caps a receiver enforces (and a sender checks first, to fail before anything is sent)."""

    max_message_bytes: int = 256 * 2**20  # total of all frames, header included
    max_header_bytes: int = 64 * 2**10
    max_tensors: int = 16
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_tensors", "max_ndim"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"WireLimits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS: Final[WireLimits] = WireLimits()


def _describe(value: object) -> str:
    """A short rendering of a rejected value for error messages; never raises."""
    try:
        text = repr(value)
    except Exception:  # e.g. ints beyond sys.get_int_max_str_digits()
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def itemsize(dtype: str) -> int:
    """Bytes per element of an allowed dtype name."""
    return _ITEMSIZE[dtype]


def is_valid_device(device: object) -> bool:
    """Whether ``device`` is an acceptable device id."""
    return isinstance(device, str) and _DEVICE_RE.match(device) is not None


def is_valid_partition(partition: object) -> bool:
    """Whether ``partition`` is an acceptable partition id ("" included)."""
    return isinstance(partition, str) and _PARTITION_RE.match(partition) is not None


def is_valid_tensor_name(name: str) -> bool:
    """Whether ``name`` is an acceptable tensor name."""
    return _TENSOR_NAME_RE.match(name) is not None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Describes one tensor frame: enough to rebuild the array without trusting the frame."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def __post_init__(self) -> None:
        name, dtype, shape, nbytes = self.name, self.dtype, self.shape, self.nbytes
        if not isinstance(name, str):
            raise WireError("bad_header", f"tensor name must be a string, got {_describe(name)}")
        if not is_valid_tensor_name(name):
            raise WireError(
                "bad_field",
                f"tensor name {_describe(name)} must be 1..{MAX_TENSOR_NAME_CHARS} printable ASCII chars",
            )
        if not isinstance(dtype, str):
            raise WireError("bad_header", f"tensor {name!r}: dtype must be a string, got {_describe(dtype)}")
        if dtype not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"tensor {name!r}: dtype {_describe(dtype)} not in {sorted(ALLOWED_DTYPES)}")
        if not isinstance(shape, tuple):
            if not isinstance(shape, list):
                raise WireError("bad_header", f"tensor {name!r}: shape must be a tuple or list, got {_describe(shape)}")
            shape = tuple(shape)
            object.__setattr__(self, "shape", shape)
        for dim in shape:
            if type(dim) is not int:  # bool is an int subclass: True must not pass for 1
                raise WireError("bad_shape", f"tensor {name!r}: dimension {_describe(dim)} is not an int")
            if not 0 <= dim <= MAX_DIM:
                raise WireError("bad_shape", f"tensor {name!r}: dimension {_describe(dim)} out of range 0..2**63-1")
        if type(nbytes) is not int:
            raise WireError("bad_header", f"tensor {name!r}: nbytes must be an int, got {_describe(nbytes)}")
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if nbytes != expected:
            raise WireError(
                "size_mismatch",
                f"tensor {name!r}: nbytes={_describe(nbytes)} but shape {_describe(shape)} of {dtype}"
                f" needs {_describe(expected)}",
            )


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a request failed; ``code`` is machine-readable, ``message`` is for humans."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise WireError("bad_header", f"error.code must be a string, got {_describe(self.code)}")
        if _ERROR_CODE_RE.match(self.code) is None:
            raise WireError("bad_field", f"error.code {_describe(self.code)} must match [A-Za-z0-9_.-]{{1,64}}")
        if not isinstance(self.message, str):
            raise WireError("bad_header", f"error.message must be a string, got {_describe(self.message)}")
        if len(self.message) > MAX_ERROR_MESSAGE_CHARS:
            raise WireError("bad_field", f"error.message longer than {MAX_ERROR_MESSAGE_CHARS} chars")


_KINDS: Final[dict[str, Kind]] = {kind.value: kind for kind in Kind}
_NO_TIMES: Final[Mapping[str, int]] = MappingProxyType({})


def _freeze_times(times: object) -> Mapping[str, int]:
    """A private read-only copy, so that a frozen envelope really cannot change."""
    if not times and type(times) in (dict, MappingProxyType):
        return _NO_TIMES
    if not isinstance(times, Mapping):
        raise WireError("bad_header", f"times_ns must be a mapping, got {_describe(times)}")
    if len(times) > MAX_TIMES:
        raise WireError("bad_field", f"times_ns has {len(times)} entries, at most {MAX_TIMES} allowed")
    for key, value in times.items():
        if not isinstance(key, str) or _TIME_KEY_RE.match(key) is None:
            raise WireError("bad_field", f"times_ns key {_describe(key)} must match [a-z0-9_]{{1,40}}")
        if type(value) is not int or not 0 <= value <= MAX_TIME_NS:
            raise WireError("bad_field", f"times_ns[{key!r}]={_describe(value)} must be an int in 0..2**63-1")
    return MappingProxyType(dict(times))


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about a message except the tensor bytes themselves."""

    kind: Kind
    device: str  # device id, 1..64 chars of [A-Za-z0-9_.-]
    seq: int  # 0 <= seq < 2**63; echoed in replies to match them to requests
    partition: str = ""  # e.g. "3f2a9c0d1e2b4a5c:2:5"; "" when not applicable
    tensors: tuple[TensorSpec, ...] = ()
    # Stored as a read-only copy; left out of hash() (a mapping is unhashable), still compared by ==.
    times_ns: Mapping[str, int] = field(default_factory=dict, hash=False)
    error: ErrorInfo | None = None  # required iff kind == ERROR
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        # The version comes first: a future version may change every other rule.
        if type(self.version) is not int:
            raise WireError("bad_header", f"version must be an int, got {_describe(self.version)}")
        if self.version != PROTOCOL_VERSION:
            raise WireError(
                "bad_version", f"version {_describe(self.version)} not supported (this is {PROTOCOL_VERSION})"
            )
        kind: Any = self.kind
        if type(kind) is not Kind:
            if not isinstance(kind, str):
                raise WireError("bad_header", f"kind must be a string, got {_describe(kind)}")
            kind = _KINDS.get(kind)
            if kind is None:
                raise WireError("bad_kind", f"kind {_describe(self.kind)} not in {list(_KINDS)}")
            object.__setattr__(self, "kind", kind)
        device = self.device
        if not isinstance(device, str):
            raise WireError("bad_header", f"device must be a string, got {_describe(device)}")
        if _DEVICE_RE.match(device) is None:
            raise WireError("bad_device", f"device {_describe(device)} must be 1..64 chars of [A-Za-z0-9_.-]")
        seq = self.seq
        if type(seq) is not int:
            raise WireError("bad_header", f"seq must be an int, got {_describe(seq)}")
        if not 0 <= seq <= MAX_SEQ:
            raise WireError("bad_field", f"seq {_describe(seq)} out of range 0..2**63-1")
        partition = self.partition
        if not isinstance(partition, str):
            raise WireError("bad_header", f"partition must be a string, got {_describe(partition)}")
        if partition and not is_valid_partition(partition):
            raise WireError(
                "bad_field",
                f"partition {_describe(partition)} must be <= {MAX_PARTITION_CHARS} printable ASCII chars",
            )
        object.__setattr__(self, "times_ns", _freeze_times(self.times_ns))
        tensors: Any = self.tensors
        if type(tensors) is not tuple:
            if not isinstance(tensors, tuple | list):
                raise WireError("bad_header", f"tensors must be a tuple or list, got {_describe(tensors)}")
            tensors = tuple(tensors)
            object.__setattr__(self, "tensors", tensors)
        if tensors:
            names: set[str] = set()
            for spec in tensors:
                if type(spec) is not TensorSpec:
                    raise WireError("bad_header", f"tensors entries must be TensorSpec, got {_describe(spec)}")
                if spec.name in names:
                    raise WireError("bad_field", f"duplicate tensor name {spec.name!r}")
                names.add(spec.name)
        error = self.error
        if error is None:
            if kind is Kind.ERROR:
                raise WireError("bad_field", "error is required for kind 'error'")
        elif type(error) is not ErrorInfo:
            raise WireError("bad_header", f"error must be an ErrorInfo, got {_describe(error)}")
        elif kind is not Kind.ERROR:
            raise WireError("bad_field", f"error is only allowed for kind 'error', not {kind.value!r}")
