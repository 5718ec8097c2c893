"""Pure encoding and decoding of wire messages (no sockets).

A message is a list of frames: ``[header, tensor_0, tensor_1, ...]``. The header is compact UTF-8
JSON; each tensor is one raw, C-ordered, little-endian frame. Decoding validates everything and
either returns a :class:`Message` or raises :class:`WireError`; no other exception escapes, whatever
the bytes, because the input comes from the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from testbed.wire.envelope import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_SEQ,
    MAX_TENSOR_NAME_CHARS,
    Envelope,
    ErrorInfo,
    Kind,
    MessageTooLarge,
    TensorSpec,
    WireError,
    WireLimits,
    _describe,
    is_valid_device,
    is_valid_partition,
    is_valid_tensor_name,
)

__all__ = ["Message", "decode", "encode", "error_envelope", "peek_ids"]

# Wire dtypes are little-endian whatever the host; on little-endian hosts these equal the native ones.
_WIRE_DTYPES: Final[dict[str, np.dtype[Any]]] = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
_WIRE_NAMES: Final[dict[np.dtype[Any], str]] = {dtype: name for name, dtype in _WIRE_DTYPES.items()}
_TOP_KEYS: Final = frozenset({"version", "kind", "device", "seq", "partition", "tensors", "times_ns", "error"})
_REQUIRED_KEYS: Final = ("kind", "device", "seq")
_TENSOR_KEYS: Final = frozenset({"name", "dtype", "shape", "nbytes"})
_ERROR_KEYS: Final = frozenset({"code", "message"})
_NO_TENSORS: Final[Mapping[str, np.ndarray]] = MappingProxyType({})
_PEEK_MAX_BYTES: Final = 1 << 20  # peek_ids gives up on larger headers rather than parse them


def _reject_constant(name: str) -> Any:
    # json accepts NaN/Infinity by default; they are not JSON and never valid here.
    raise ValueError(f"non-standard JSON constant {name}")


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: the validated envelope and read-only array views on the frames."""

    envelope: Envelope
    tensors: dict[str, np.ndarray]


def _json_text(text: str) -> str:
    """JSON string literal for a validated printable-ASCII field (only quote and backslash need escaping)."""
    if '"' in text or "\\" in text:
        return _ENCODER.encode(text)
    return f'"{text}"'


def _header_text(env: Envelope, specs: list[str]) -> str:
    """The compact JSON header, written directly: json.dumps costs several times more per message.

    Only fields the Envelope has already validated are written verbatim (ids, kinds, dtypes and
    keys from fixed ASCII alphabets, ints); free text goes through the json encoder.
    """
    parts = [f'{{"version":{env.version},"kind":"{env.kind.value}","device":"{env.device}","seq":{env.seq}']
    if env.partition:
        parts.append(f',"partition":{_json_text(env.partition)}')
    if specs:
        parts.append(f',"tensors":[{",".join(specs)}]')
    if env.times_ns:
        parts.append(',"times_ns":{' + ",".join(f'"{k}":{v}' for k, v in env.times_ns.items()) + "}")
    if env.error is not None:
        parts.append(f',"error":{{"code":"{env.error.code}","message":{_ENCODER.encode(env.error.message)}}}')
    parts.append("}")
    return "".join(parts)


def encode(
    envelope_without_specs: Envelope,
    tensors: Mapping[str, np.ndarray] = _NO_TENSORS,
    limits: WireLimits = DEFAULT_LIMITS,
) -> list[bytes | memoryview]:
    """Build the frames for ``envelope`` carrying ``tensors``; the tensor specs are derived here.

    Contiguous little-endian arrays are passed as memoryviews (no copy); anything else costs one
    copy. Any specs already on the envelope are replaced. Everything a receiver with the same
    ``limits`` would reject is rejected here, before a byte is sent.
    """
    if type(envelope_without_specs) is not Envelope:
        raise TypeError(f"expected an Envelope, got {type(envelope_without_specs).__name__}")
    if len(tensors) > limits.max_tensors:
        raise WireError("bad_field", f"{len(tensors)} tensors, at most {limits.max_tensors} allowed")
    # The envelope validated itself when it was built, so only the tensors need checking here;
    # the header is written directly instead of building (and re-validating) a new Envelope.
    specs: list[str] = []
    frames: list[bytes | memoryview] = [b""]
    payload = 0
    for name, array in tensors.items():
        if not isinstance(name, str) or not is_valid_tensor_name(name):
            raise WireError(
                "bad_field", f"tensor name {name!r} must be 1..{MAX_TENSOR_NAME_CHARS} printable ASCII chars"
            )
        if type(array) is not np.ndarray:
            if not isinstance(array, np.ndarray):
                raise WireError("bad_field", f"tensor {name!r} is a {type(array).__name__}, not a numpy.ndarray")
            array = array.view(np.ndarray)  # subclasses (np.matrix...) reshape differently; no copy
        dtype_name = _WIRE_NAMES.get(array.dtype)
        if dtype_name is None:  # not allowed, or allowed but byte-swapped
            dtype_name = array.dtype.name
            if dtype_name not in _WIRE_DTYPES or array.dtype.fields is not None:
                raise WireError("bad_dtype", f"tensor {name!r}: dtype {array.dtype} not in {sorted(ALLOWED_DTYPES)}")
            array = np.asarray(array, dtype=_WIRE_DTYPES[dtype_name], order="C")  # the one copy
        elif not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)  # the one copy
        if array.ndim > limits.max_ndim:
            raise WireError("bad_shape", f"tensor {name!r}: {array.ndim} dimensions, at most {limits.max_ndim}")
        nbytes = array.nbytes
        shape = ",".join(map(str, array.shape))
        specs.append(f'{{"name":{_json_text(name)},"dtype":"{dtype_name}","shape":[{shape}],"nbytes":{nbytes}}}')
        frames.append(memoryview(array.reshape(-1).view(np.uint8)))
        payload += nbytes
    header = _header_text(envelope_without_specs, specs).encode("ascii")
    if len(header) > limits.max_header_bytes:
        raise MessageTooLarge(f"header is {len(header)} bytes, limit {limits.max_header_bytes}")
    total = len(header) + payload
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"message is {total} bytes, limit {limits.max_message_bytes}")
    frames[0] = header
    return frames


def _byte_view(frame: object, index: int) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (bytes, memoryview, zmq.Frame...)."""
    try:
        view = memoryview(frame)  # type: ignore[arg-type]
    except TypeError:
        raise WireError("bad_field", f"frame {index} is a {type(frame).__name__}, not a buffer") from None
    if view.ndim == 1 and view.format == "B" and view.c_contiguous:
        return view
    if view.nbytes == 0:
        return memoryview(b"")
    if not view.c_contiguous:
        raise WireError("bad_field", f"frame {index} is not a contiguous buffer")
    try:
        return view.cast("B")
    except (TypeError, ValueError):
        raise WireError("bad_field", f"frame {index} is not a byte buffer") from None


def _parse_header(view: memoryview) -> object:
    try:
        return _DECODER.decode(str(view, "utf-8"))
    except UnicodeDecodeError as exc:
        raise WireError("bad_header", f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge ints
        raise WireError("bad_header", f"header is not valid JSON: {str(exc)[:120]}") from None


def _tensor_spec(entry: object, index: int, limits: WireLimits) -> TensorSpec:
    if type(entry) is not dict:
        raise WireError("bad_header", f"tensors[{index}] must be an object")
    if entry.keys() != _TENSOR_KEYS:
        missing = sorted(_TENSOR_KEYS - entry.keys())
        unknown = sorted(entry.keys() - _TENSOR_KEYS)
        raise WireError("bad_header", f"tensors[{index}]: missing keys {missing}, unknown keys {unknown}")
    shape = entry["shape"]
    if type(shape) is not list:
        raise WireError("bad_header", f"tensors[{index}].shape must be an array")
    if len(shape) > limits.max_ndim:
        raise WireError("bad_shape", f"tensors[{index}]: {len(shape)} dimensions, at most {limits.max_ndim}")
    return TensorSpec(entry["name"], entry["dtype"], tuple(shape), entry["nbytes"])


def _envelope_from_header(obj: object, limits: WireLimits) -> Envelope:
    if type(obj) is not dict:
        raise WireError("bad_header", f"header must be a JSON object, got {type(obj).__name__}")
    if "version" not in obj:
        raise WireError("bad_header", "header has no 'version'")
    version = obj["version"]
    if type(version) is not int:
        raise WireError("bad_header", "version must be an int")
    if version != 1:
        # Checked before anything else: another version may have different fields.
        raise WireError("bad_version", f"version {_describe(version)} not supported")
    if not _TOP_KEYS.issuperset(obj):
        raise WireError("bad_header", f"unknown header keys {sorted(obj.keys() - _TOP_KEYS)[:8]}")
    for key in _REQUIRED_KEYS:
        if key not in obj:
            raise WireError("bad_header", f"header has no {key!r}")
    entries = obj.get("tensors", [])
    if type(entries) is not list:
        raise WireError("bad_header", "tensors must be an array")
    if len(entries) > limits.max_tensors:
        raise WireError("bad_field", f"{len(entries)} tensors, at most {limits.max_tensors} allowed")
    error = obj.get("error")
    if error is not None:
        if type(error) is not dict:
            raise WireError("bad_header", "error must be an object")
        if error.keys() != _ERROR_KEYS:
            raise WireError("bad_header", f"error must have exactly the keys {sorted(_ERROR_KEYS)}")
        error = ErrorInfo(error["code"], error["message"])
    elif "error" in obj:
        raise WireError("bad_header", "error must be an object")
    times = obj.get("times_ns", {})
    if type(times) is not dict:
        raise WireError("bad_header", "times_ns must be an object")
    return Envelope(
        obj["kind"],
        obj["device"],
        obj["seq"],
        obj.get("partition", ""),
        tuple(_tensor_spec(entry, i, limits) for i, entry in enumerate(entries)),
        times,
        error,
        version,
    )


def decode(frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Validate ``frames`` and return the message; raises only :class:`WireError`.

    Arrays are read-only views on the frame buffers (which they keep alive). The one exception is
    a frame whose address is misaligned for its dtype (libzmq packs small messages into a shared
    receive buffer): that array is copied once, so every returned array is aligned.
    """
    try:
        count = len(frames)
    except TypeError:
        raise WireError("frame_count", f"frames must be a sequence, got {type(frames).__name__}") from None
    if count == 0:
        raise WireError("frame_count", "no frames (a header frame is required)")
    views: list[memoryview] = []
    total = 0
    for index, frame in enumerate(frames):
        view = _byte_view(frame, index)
        views.append(view)
        total += view.nbytes
    header = views[0]
    if header.nbytes > limits.max_header_bytes:
        raise MessageTooLarge(f"header is {header.nbytes} bytes, limit {limits.max_header_bytes}")
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"message is {total} bytes, limit {limits.max_message_bytes}")
    envelope = _envelope_from_header(_parse_header(header), limits)
    if count != 1 + len(envelope.tensors):
        raise WireError("frame_count", f"{count} frames, expected 1 header + {len(envelope.tensors)} tensor frames")
    arrays: dict[str, np.ndarray] = {}
    for spec, view in zip(envelope.tensors, views[1:], strict=True):
        if view.nbytes != spec.nbytes:
            raise WireError(
                "size_mismatch",
                f"tensor {spec.name!r}: header says {spec.nbytes} bytes, frame has {view.nbytes}",
            )
        try:
            array = np.ndarray(spec.shape, _WIRE_DTYPES[spec.dtype], view)  # a view, not a copy
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:
            raise WireError("bad_shape", f"tensor {spec.name!r}: shape {spec.shape} unusable: {exc}") from None
        flags = array.flags
        if not flags.aligned:
            array = array.copy()
            flags = array.flags
        flags.writeable = False
        arrays[spec.name] = array
    return Message(envelope, arrays)


def error_envelope(code: str, message: str, *, device: str = "unknown", seq: int = 0, partition: str = "") -> Envelope:
    """An ERROR envelope; never fails on the addressing fields, which often come from bad input.

    An invalid ``device``/``seq``/``partition`` falls back to the default and an over-long message
    is truncated, so that a server can always answer a malformed request.
    """
    if not is_valid_device(device):
        device = "unknown"
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        seq = 0
    if not is_valid_partition(partition):
        partition = ""
    if isinstance(message, str) and len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    return Envelope(Kind.ERROR, device, seq, partition, error=ErrorInfo(code, message))


def peek_ids(header: bytes | memoryview) -> tuple[str, int]:
    """Best-effort ``(device, seq)`` from a header that failed validation; ``("unknown", 0)`` if not found."""
    try:
        view = memoryview(header)
        if view.nbytes > _PEEK_MAX_BYTES:
            return ("unknown", 0)
        obj = _DECODER.decode(str(view.cast("B") if view.format != "B" else view, "utf-8"))
        if not isinstance(obj, dict):
            return ("unknown", 0)
        device, seq = obj.get("device"), obj.get("seq")
        return (
            device if is_valid_device(device) else "unknown",
            seq if type(seq) is int and 0 <= seq <= MAX_SEQ else 0,
        )
    except Exception:  # never raises: this runs while handling another error
        return ("unknown", 0)
