"""Envelope validation and codec round trips (no sockets)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import zmq

from testbed.wire import (
    ALLOWED_DTYPES,
    ERROR_CODES,
    PROTOCOL_VERSION,
    Envelope,
    ErrorInfo,
    Kind,
    MessageTooLarge,
    TensorSpec,
    WireError,
    WireLimits,
    decode,
    encode,
    error_envelope,
    peek_ids,
)

SHAPES = [(), (0,), (1,), (7,), (3, 5, 7), (2, 0, 3), (1, 1, 1, 1, 1, 1, 1, 2)]


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _code(exc_info: pytest.ExceptionInfo[WireError]) -> str:
    return exc_info.value.code


# ----------------------------------------------------------------------------- constants


def test_protocol_constants() -> None:
    assert PROTOCOL_VERSION == 1
    expected = ["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
    assert sorted(ALLOWED_DTYPES) == sorted(expected)
    # The first release's kinds keep their values and order; split training added its kinds after them.
    assert [k.value for k in Kind][:5] == ["infer_request", "infer_reply", "error", "ping", "pong"]
    assert {"train_forward", "train_backward", "train_forward_reply", "train_backward_reply"} <= {k.value for k in Kind}
    assert Kind("ping") is Kind.PING and Kind.PING == "ping"
    assert WireLimits() == WireLimits(256 * 2**20, 64 * 2**10, 16, 8)
    assert "too_large" in ERROR_CODES and len(ERROR_CODES) == 10


def test_wire_error_attributes() -> None:
    err = WireError("bad_dtype", "tensor 'x': dtype complex64")
    assert (err.code, err.message, err.route, err.device, err.seq) == (
        "bad_dtype",
        "tensor 'x': dtype complex64",
        None,
        "unknown",
        0,
    )
    assert "bad_dtype" in str(err) and "complex64" in str(err)
    big = MessageTooLarge("message is 9 bytes, limit 8")
    assert isinstance(big, WireError) and big.code == "too_large"


# ----------------------------------------------------------------------------- envelope


def test_envelope_defaults_and_immutability() -> None:
    times = {"device_send_ns": 5}
    env = Envelope(Kind.PING, "dev-1", 3, times_ns=times)
    assert (env.partition, env.tensors, env.error, env.version) == ("", (), None, PROTOCOL_VERSION)
    times["device_send_ns"] = 6  # the envelope keeps its own copy
    assert env.times_ns == {"device_send_ns": 5}
    with pytest.raises(TypeError):
        env.times_ns["x"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.seq = 4  # type: ignore[misc]
    assert Envelope("ping", "d", 0).kind is Kind.PING  # type: ignore[arg-type]
    assert dataclasses.replace(env, seq=9).seq == 9
    assert hash(env) == hash(Envelope(Kind.PING, "dev-1", 3, times_ns={"device_send_ns": 5}))
    assert env != Envelope(Kind.PING, "dev-1", 3)


GOOD = {"kind": Kind.INFER_REQUEST, "device": "dev_1.a-B", "seq": 0}


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"version": 2}, "bad_version"),
        ({"version": True}, "bad_header"),
        ({"kind": "infer"}, "bad_kind"),
        ({"kind": 3}, "bad_header"),
        ({"device": ""}, "bad_device"),
        ({"device": "x" * 65}, "bad_device"),
        ({"device": "a b"}, "bad_device"),
        ({"device": "dev\n"}, "bad_device"),
        ({"device": "déf"}, "bad_device"),
        ({"device": b"dev"}, "bad_header"),
        ({"seq": -1}, "bad_field"),
        ({"seq": 2**63}, "bad_field"),
        ({"seq": True}, "bad_header"),
        ({"seq": 1.0}, "bad_header"),
        ({"partition": "p" * 129}, "bad_field"),
        ({"partition": "tab\there"}, "bad_field"),
        ({"partition": 5}, "bad_header"),
        ({"times_ns": {"Bad": 1}}, "bad_field"),
        ({"times_ns": {"t": -1}}, "bad_field"),
        ({"times_ns": {"t": 2**63}}, "bad_field"),
        ({"times_ns": {"t": 1.5}}, "bad_field"),
        ({"times_ns": {"t": False}}, "bad_field"),
        ({"times_ns": {f"t{i}": i for i in range(17)}}, "bad_field"),
        ({"times_ns": [("t", 1)]}, "bad_header"),
        ({"kind": Kind.ERROR}, "bad_field"),
        ({"error": ErrorInfo("x", "y")}, "bad_field"),
        ({"error": "boom"}, "bad_header"),
        ({"tensors": ("x",)}, "bad_header"),
        (
            {"tensors": (TensorSpec("a", "int8", (1,), 1), TensorSpec("a", "int8", (2,), 2))},
            "bad_field",
        ),
    ],
)
def test_envelope_rejects(changes: dict[str, Any], code: str) -> None:
    with pytest.raises(WireError) as exc_info:
        Envelope(**{**GOOD, **changes})
    assert _code(exc_info) == code, exc_info.value.message


def test_envelope_accepts_limits() -> None:
    Envelope(Kind.PONG, "d" * 64, 2**63 - 1, "~" * 128, times_ns={f"k{i}": 2**63 - 1 for i in range(16)})
    Envelope(Kind.ERROR, "d", 0, error=ErrorInfo("too_large", "x" * 4096))


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("x", "complex64", (1,), 8), "bad_dtype"),
        (("x", "float32", (-1,), -4), "bad_shape"),
        (("x", "float32", (1.0,), 4), "bad_shape"),
        (("x", "float32", (True,), 4), "bad_shape"),
        (("x", "float32", (2**63,), 2**65), "bad_shape"),
        (("x", "float32", (2, 3), 23), "size_mismatch"),
        (("x", "float32", (2, 3), 24.0), "bad_header"),
        (("x", "float32", "23", 8), "bad_header"),
        (("", "float32", (1,), 4), "bad_field"),
        (("x\x00", "float32", (1,), 4), "bad_field"),
        ((1, "float32", (1,), 4), "bad_header"),
    ],
)
def test_tensor_spec_rejects(args: tuple[Any, ...], code: str) -> None:
    with pytest.raises(WireError) as exc_info:
        TensorSpec(*args)
    assert _code(exc_info) == code


def test_error_info_rejects() -> None:
    with pytest.raises(WireError, match="bad_field"):
        ErrorInfo("has space", "m")
    with pytest.raises(WireError, match="bad_field"):
        ErrorInfo("c", "m" * 4097)
    with pytest.raises(WireError, match="bad_header"):
        ErrorInfo("c", None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_round_trip_all_dtypes_and_shapes(dtype: str) -> None:
    tensors = {f"t{i}": _sample(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    env = Envelope(Kind.INFER_REQUEST, "pi-4", 17, "3f2a9c0d1e2b4a5c:2:5", times_ns={"device_send_ns": 12})
    frames = encode(env, tensors)
    assert len(frames) == 1 + len(SHAPES)
    msg = decode([bytes(f) for f in frames])
    assert msg.envelope == dataclasses.replace(env, tensors=msg.envelope.tensors)
    assert [s.name for s in msg.envelope.tensors] == list(tensors)
    for name, sent in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert got.tobytes() == sent.tobytes()  # bit-exact, NaN payloads included
        assert not got.flags.writeable and got.flags.aligned


def test_header_is_compact_json() -> None:
    frames = encode(Envelope(Kind.PING, "d", 1), {"x": np.zeros((2, 3), np.float16)})
    header = bytes(frames[0])
    assert b" " not in header
    assert json.loads(header) == {
        "version": 1,
        "kind": "ping",
        "device": "d",
        "seq": 1,
        "tensors": [{"name": "x", "dtype": "float16", "shape": [2, 3], "nbytes": 12}],
    }


def test_header_escapes_quotes_and_backslashes() -> None:
    env = Envelope(Kind.INFER_REQUEST, "d", 3, 'p"q\\r')
    name = 'x"\\y\\"'
    frames = encode(env, {name: np.zeros(2, np.int8)})
    assert json.loads(bytes(frames[0]))["partition"] == 'p"q\\r'
    msg = decode(frames)
    assert msg.envelope.partition == env.partition and list(msg.tensors) == [name]
    err = error_envelope("c", 'quote " backslash \\ newline \n tab \t nul \x00 é \ud800')
    assert decode(encode(err)).envelope == err


def test_encode_is_zero_copy_for_contiguous_arrays() -> None:
    array = np.arange(100_000, dtype=np.float32)
    frames = encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"x": array})
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.asarray(frames[1]), array)


def test_decode_returns_read_only_views_on_the_frames() -> None:
    array = np.arange(50_000, dtype=np.int32).reshape(100, 500)
    frames = encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"x": array})
    for frame in (bytes(frames[1]), bytearray(frames[1]), zmq.Frame(bytes(frames[1]))):
        msg = decode([frames[0], frame])
        got = msg.tensors["x"]
        assert np.shares_memory(got, np.frombuffer(frame, dtype=np.uint8))
        assert got.base is not None and not got.flags.owndata
        assert not got.flags.writeable
        with pytest.raises(ValueError):
            got[0, 0] = 1
        np.testing.assert_array_equal(got, array)


def test_encode_copies_non_contiguous_and_byte_swapped_arrays_once() -> None:
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    cases = {
        "strided": base[:, ::3],
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "big_endian": base.astype(">f8"),
        "big_endian_strided": base.astype(">i4")[::2],
    }
    frames = encode(Envelope(Kind.INFER_REQUEST, "d", 0), cases)
    msg = decode(frames)
    for name, sent in cases.items():
        got = msg.tensors[name]
        assert got.dtype == sent.dtype.newbyteorder("=") and got.dtype.isnative
        np.testing.assert_array_equal(got, sent)
    assert json.loads(bytes(frames[0]))["tensors"][3]["dtype"] == "float64"


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix: reshape keeps 2 dims
def test_encode_accepts_ndarray_subclasses_as_plain_arrays() -> None:
    matrix = np.asmatrix(np.arange(6, dtype=np.float32).reshape(2, 3))
    got = decode(encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"m": matrix})).tensors["m"]
    assert type(got) is np.ndarray and got.shape == (2, 3)
    np.testing.assert_array_equal(got, np.asarray(matrix))


def test_encode_replaces_existing_specs() -> None:
    stale = Envelope(Kind.INFER_REPLY, "d", 1, tensors=(TensorSpec("old", "int8", (3,), 3),))
    msg = decode(encode(stale, {"new": np.ones(2, np.uint8)}))
    assert msg.envelope.tensors == (TensorSpec("new", "uint8", (2,), 2),)


def test_misaligned_frame_is_copied_to_an_aligned_array() -> None:
    array = np.arange(1000, dtype=np.float64)
    frames = encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"x": array})
    padded = bytearray(1) + bytearray(frames[1])
    got = decode([frames[0], memoryview(padded)[1:]]).tensors["x"]
    assert got.flags.aligned and not got.flags.writeable
    np.testing.assert_array_equal(got, array)


def test_error_envelope_round_trip() -> None:
    env = error_envelope("bad_dtype", "tensor 'x': complex64", device="pi-2", seq=41, partition="p:1:2")
    assert env.kind is Kind.ERROR and env.error == ErrorInfo("bad_dtype", "tensor 'x': complex64")
    assert decode(encode(env, {})).envelope == env


def test_error_envelope_never_fails_on_addressing_fields() -> None:
    env = error_envelope("bad_device", "m" * 10_000, device="bad device", seq=-5, partition="\x00")
    assert (env.device, env.seq, env.partition) == ("unknown", 0, "")
    assert env.error is not None and len(env.error.message) == 4096


# ----------------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("tensors", "limits", "code"),
    [
        ({"x": np.zeros(2, np.complex64)}, WireLimits(), "bad_dtype"),
        ({"x": np.zeros(2, object)}, WireLimits(), "bad_dtype"),
        ({"x": np.array(["a"])}, WireLimits(), "bad_dtype"),
        ({"x": np.zeros(2, [("a", "f4")])}, WireLimits(), "bad_dtype"),
        ({"x": np.zeros(2, "datetime64[ns]")}, WireLimits(), "bad_dtype"),
        ({"x": [1.0, 2.0]}, WireLimits(), "bad_field"),
        ({"x": np.float32(1.0)}, WireLimits(), "bad_field"),
        ({"": np.zeros(1)}, WireLimits(), "bad_field"),
        ({"x\n": np.zeros(1)}, WireLimits(), "bad_field"),
        ({f"t{i}": np.zeros(1) for i in range(3)}, WireLimits(max_tensors=2), "bad_field"),
        ({"x": np.zeros((1,) * 3)}, WireLimits(max_ndim=2), "bad_shape"),
        ({"x": np.zeros(1)}, WireLimits(max_header_bytes=50), "too_large"),
        ({"x": np.zeros(1000)}, WireLimits(max_message_bytes=8000), "too_large"),
    ],
)
def test_encode_refuses(tensors: dict[str, Any], limits: WireLimits, code: str) -> None:
    with pytest.raises(WireError) as exc_info:
        encode(Envelope(Kind.INFER_REQUEST, "d", 0), tensors, limits)
    assert _code(exc_info) == code
    assert isinstance(exc_info.value, MessageTooLarge) == (code == "too_large")


def test_encode_at_exact_limits() -> None:
    frames = encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"x": np.zeros(1000)})
    total = sum(memoryview(f).nbytes for f in frames)
    limits = WireLimits(max_message_bytes=total, max_header_bytes=len(frames[0]))
    encode(Envelope(Kind.INFER_REQUEST, "d", 0), {"x": np.zeros(1000)}, limits)
    decode(frames, limits)
    with pytest.raises(MessageTooLarge):
        decode(frames, dataclasses.replace(limits, max_message_bytes=total - 1))
    with pytest.raises(MessageTooLarge):
        decode(frames, dataclasses.replace(limits, max_header_bytes=len(frames[0]) - 1))


def test_decode_rejects_non_buffer_frames() -> None:
    with pytest.raises(WireError) as exc_info:
        decode([b"{}", 42])
    assert _code(exc_info) == "bad_field"
    frames = encode(Envelope(Kind.PING, "d", 0), {"x": np.arange(4, dtype=np.int16)})
    strided = memoryview(bytes(16))[::2]
    for bad in ([strided], [frames[0], strided]):
        with pytest.raises(WireError) as exc_info:
            decode(bad)
        assert _code(exc_info) == "bad_field"
    wide = memoryview(np.frombuffer(bytes(frames[1]), np.int16))  # any contiguous buffer is read as bytes
    np.testing.assert_array_equal(decode([frames[0], wide]).tensors["x"], np.arange(4))
    with pytest.raises(WireError) as exc_info:
        decode([])
    assert _code(exc_info) == "frame_count"


# ----------------------------------------------------------------------------- peek_ids


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b'{"device":"pi-3","seq":12,"kind":"nope"}', ("pi-3", 12)),
        (b'{"device":"bad device","seq":12}', ("unknown", 12)),
        (b'{"device":"pi","seq":true}', ("pi", 0)),
        (b'{"device":"pi","seq":-3}', ("pi", 0)),
        (b'{"device":"pi","seq":1e3}', ("pi", 0)),
        (b'{"device":"pi","seq":NaN}', ("unknown", 0)),
        (b"[1, 2]", ("unknown", 0)),
        (b"\xff\xfe", ("unknown", 0)),
        (b"[" * 100_000, ("unknown", 0)),
        (b"", ("unknown", 0)),
    ],
)
def test_peek_ids(header: bytes, expected: tuple[str, int]) -> None:
    assert peek_ids(header) == expected
    assert peek_ids(memoryview(header)) == expected
