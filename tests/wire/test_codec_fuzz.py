"""Property tests: decode is total, each kind of damage yields its specific code, round trips hold."""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.wire import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    ERROR_CODES,
    Envelope,
    ErrorInfo,
    Kind,
    WireError,
    WireLimits,
    decode,
    encode,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = [k.value for k in Kind]
TOP_KEYS = {"version", "kind", "device", "seq", "partition", "tensors", "times_ns", "error"}
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))

# ----------------------------------------------------------------------------- strategies

devices = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
partitions = st.text(alphabet=PRINTABLE, max_size=128)
time_keys = st.from_regex(r"[a-z0-9_]{1,40}", fullmatch=True)
times = st.dictionaries(time_keys, st.integers(0, 2**63 - 1), max_size=16)
tensor_names = st.text(alphabet=PRINTABLE, min_size=1, max_size=24)
arrays = hnp.arrays(
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)
tensor_dicts = st.dictionaries(tensor_names, arrays, max_size=4)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
not_int = json_values.filter(lambda v: type(v) is not int)
not_str = json_values.filter(lambda v: not isinstance(v, str))
not_list = json_values.filter(lambda v: not isinstance(v, list))
not_dict = json_values.filter(lambda v: not isinstance(v, dict))


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(list(Kind)))
    error = None
    if kind is Kind.ERROR:
        error = ErrorInfo(draw(st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)), draw(st.text(max_size=50)))
    return Envelope(
        kind,
        draw(devices),
        draw(st.integers(0, 2**63 - 1)),
        draw(partitions),
        times_ns=draw(times),
        error=error,
    )


@st.composite
def messages(draw: st.DrawFn) -> tuple[Envelope, dict[str, np.ndarray]]:
    return draw(envelopes()), draw(tensor_dicts)


def _frames(env: Envelope, tensors: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[bytes]]:
    frames = [bytes(f) for f in encode(env, tensors)]
    return json.loads(frames[0]), frames


# ----------------------------------------------------------------------------- (1) totality

header_like = st.fixed_dictionaries(
    {},
    optional={
        "version": st.just(1) | json_values,
        "kind": st.sampled_from(KINDS) | json_values,
        "device": devices | json_values,
        "seq": st.integers(0, 10) | json_values,
        "partition": partitions | json_values,
        "times_ns": times | json_values,
        "error": st.fixed_dictionaries({"code": st.just("c"), "message": st.just("m")}) | json_values,
        "tensors": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": tensor_names | json_values,
                    "dtype": st.sampled_from(sorted(ALLOWED_DTYPES)) | json_values,
                    "shape": st.lists(st.integers(0, 4), max_size=3) | json_values,
                    "nbytes": st.integers(0, 64) | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
        "extra": json_values,
    },
).map(lambda obj: json.dumps(obj).encode())

nasty_headers = st.sampled_from(
    [
        b"",
        b"\xef\xbb\xbf{}",
        b"\xff\xfe{\x00}\x00",
        b"[" * 50_000,
        b'{"a":' * 20_000,
        b'{"version":1,"kind":"ping","device":"d","seq":' + b"9" * 5000 + b"}",
        b'{"version":1,"kind":"ping","device":"d","seq":NaN}',
        b'{"version":1,"kind":"ping","device":"d","seq":Infinity}',
        b'{"version":1e400,"kind":"ping","device":"d","seq":0}',
        b'{"version":1,"kind":"ping","device":"\\ud800","seq":0}',
        b'{"version":1,"kind":"ping","device":"d","seq":0,"tensors":[{"name":"x","dtype":"uint8",'
        b'"shape":[0,9223372036854775807,9223372036854775807],"nbytes":0}]}',
        b'{"version":1,"kind":"ping","device":"d","seq":0,"tensors":[{"name":"x","dtype":"uint8",'
        b'"shape":[99999999999999999999999],"nbytes":0}]}',
    ]
)

tiny_limits = WireLimits(max_message_bytes=200, max_header_bytes=150, max_tensors=2, max_ndim=2)


@FUZZ
@given(
    header=st.one_of(st.binary(max_size=200), header_like, nasty_headers),
    rest=st.lists(st.binary(max_size=48), max_size=4),
    limits=st.sampled_from([DEFAULT_LIMITS, tiny_limits]),
)
def test_decode_raises_only_wire_error(header: bytes, rest: list[bytes], limits: WireLimits) -> None:
    try:
        msg = decode([header, *rest], limits)
    except WireError as err:
        assert err.code in ERROR_CODES
        assert isinstance(err.message, str) and err.message
    else:
        assert len(msg.tensors) == len(rest)


# ----------------------------------------------------------------------------- (2) damage -> code

Mutation = Callable[[st.DrawFn, dict[str, Any], list[bytes]], tuple[WireLimits, str]]
MUTATIONS: dict[str, Mutation] = {}


def mutation(func: Mutation) -> Mutation:
    MUTATIONS[func.__name__] = func
    return func


def _entry(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    """A tensor entry of the header, adding a tensor (and its frame is added by the caller) if none."""
    return draw(st.sampled_from(obj["tensors"]))


def _needs_tensor(obj: dict[str, Any], frames: list[bytes]) -> None:
    if not obj.get("tensors"):
        obj["tensors"] = [{"name": "z", "dtype": "int16", "shape": [2, 3], "nbytes": 12}]
        frames.append(bytes(12))


@mutation
def version_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["version"] = draw(st.integers().filter(lambda v: v != 1))
    return DEFAULT_LIMITS, "bad_version"


@mutation
def version_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["version"] = draw(not_int)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def missing_field(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    del obj[draw(st.sampled_from(["version", "kind", "device", "seq"]))]
    return DEFAULT_LIMITS, "bad_header"


@mutation
def unknown_field(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj[draw(st.text(max_size=10).filter(lambda k: k not in TOP_KEYS))] = draw(json_values)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def kind_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["kind"] = draw(st.text(max_size=20).filter(lambda k: k not in KINDS))
    return DEFAULT_LIMITS, "bad_kind"


@mutation
def kind_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["kind"] = draw(not_str)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def device_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    valid = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
    obj["device"] = draw(
        st.one_of(
            st.just(""),
            st.text(alphabet="abc", min_size=65, max_size=80),
            st.tuples(valid, st.sampled_from(" \n\t/:@é\x00\u2028"), valid).map("".join),
        )
    )
    return DEFAULT_LIMITS, "bad_device"


@mutation
def device_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["device"] = draw(not_str)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def seq_range(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["seq"] = draw(st.integers(max_value=-1) | st.integers(min_value=2**63, max_value=10**300))
    return DEFAULT_LIMITS, "bad_field"


@mutation
def seq_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["seq"] = draw(not_int)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def partition_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["partition"] = draw(
        st.text(alphabet=PRINTABLE, min_size=129, max_size=140)
        | st.text(min_size=1, max_size=10).filter(lambda p: any(not 0x20 <= ord(c) < 0x7F for c in p))
    )
    return DEFAULT_LIMITS, "bad_field"


@mutation
def partition_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["partition"] = draw(not_str)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def times_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    bad_key = st.text(max_size=45).filter(
        lambda k: not (k and len(k) <= 40 and set(k) <= set(string.digits + string.ascii_lowercase + "_"))
    )
    bad_value = st.integers(max_value=-1) | st.integers(min_value=2**63, max_value=2**80) | not_int
    entries = draw(times)
    choice = draw(st.sampled_from(["key", "value", "count"]))
    if choice == "key":
        entries = {**dict(list(entries.items())[:15]), draw(bad_key): 1}
    elif choice == "value":
        entries = {**entries, draw(time_keys): draw(bad_value)}
    else:
        entries = {f"k{i}": i for i in range(draw(st.integers(17, 30)))}
    obj["times_ns"] = entries
    return DEFAULT_LIMITS, "bad_field"


@mutation
def times_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["times_ns"] = draw(not_dict)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def error_missing(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj.pop("error", None)
    obj["kind"] = "error"
    return DEFAULT_LIMITS, "bad_field"


@mutation
def error_unexpected(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["error"] = {"code": "c", "message": "m"}
    obj["kind"] = draw(st.sampled_from([k for k in KINDS if k != "error"]))
    return DEFAULT_LIMITS, "bad_field"


@mutation
def error_shape(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["kind"] = "error"
    obj["error"] = draw(
        not_dict
        | st.just({"code": "c"})
        | st.just({"code": "c", "message": "m", "x": 1})
        | st.just({"code": 1, "message": "m"})
    )
    return DEFAULT_LIMITS, "bad_header"


@mutation
def error_code_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["kind"] = "error"
    obj["error"] = {"code": draw(st.sampled_from(["", "has space", "x" * 65, "é"])), "message": "m"}
    return DEFAULT_LIMITS, "bad_field"


@mutation
def tensors_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    obj["tensors"] = draw(not_list)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def entry_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    obj["tensors"][draw(st.integers(0, len(obj["tensors"]) - 1))] = draw(not_dict)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def entry_keys(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    entry = _entry(draw, obj)
    if draw(st.booleans()):
        del entry[draw(st.sampled_from(["name", "dtype", "shape", "nbytes"]))]
    else:
        entry[draw(st.sampled_from(["names", "order", "", "strides"]))] = 1
    return DEFAULT_LIMITS, "bad_header"


@mutation
def name_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["name"] = draw(
        st.just("") | st.text(alphabet=PRINTABLE, min_size=129, max_size=140) | st.sampled_from(["a\nb", "é", "\x7f"])
    )
    return DEFAULT_LIMITS, "bad_field"


@mutation
def name_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["name"] = draw(not_str)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def name_duplicate(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    index = draw(st.integers(0, len(obj["tensors"]) - 1))
    obj["tensors"].append(dict(obj["tensors"][index]))
    frames.append(frames[1 + index])
    return DEFAULT_LIMITS, "bad_field"


@mutation
def too_many_tensors(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    return dataclasses.replace(DEFAULT_LIMITS, max_tensors=len(obj["tensors"]) - 1), "bad_field"


@mutation
def dtype_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["dtype"] = draw(
        st.sampled_from(["complex64", "float128", "object", "<f4", "f4", "Float32", "uint16", ""])
        | st.text(max_size=10).filter(lambda d: d not in ALLOWED_DTYPES)
    )
    return DEFAULT_LIMITS, "bad_dtype"


@mutation
def dtype_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["dtype"] = draw(not_str)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def shape_element(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    shape = _entry(draw, obj)["shape"]
    bad = draw(st.integers(max_value=-1) | st.integers(min_value=2**63, max_value=2**70) | not_int)
    if shape and draw(st.booleans()):
        shape[draw(st.integers(0, len(shape) - 1))] = bad
    else:
        shape.insert(draw(st.integers(0, len(shape))), bad)
    return DEFAULT_LIMITS, "bad_shape"


@mutation
def shape_ndim(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    entry = _entry(draw, obj)
    entry["shape"] = entry["shape"] + [1] * draw(st.integers(9 - len(entry["shape"]), 12))
    return DEFAULT_LIMITS, "bad_shape"


@mutation
def shape_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["shape"] = draw(not_list)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def shape_product(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    entry = _entry(draw, obj)
    itemsize = np.dtype(entry["dtype"]).itemsize
    entry["shape"] = [entry["nbytes"] // itemsize + draw(st.integers(1, 5))]
    return DEFAULT_LIMITS, "size_mismatch"


@mutation
def nbytes_value(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    entry = _entry(draw, obj)
    entry["nbytes"] = draw(st.integers(-(2**70), 2**70).filter(lambda n: n != entry["nbytes"]))
    return DEFAULT_LIMITS, "size_mismatch"


@mutation
def nbytes_type(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    _entry(draw, obj)["nbytes"] = draw(not_int)
    return DEFAULT_LIMITS, "bad_header"


@mutation
def frame_length(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    _needs_tensor(obj, frames)
    index = draw(st.integers(1, len(frames) - 1))
    frame = frames[index]
    if frame and draw(st.booleans()):
        frames[index] = frame[: draw(st.integers(0, len(frame) - 1))]
    else:
        frames[index] = frame + bytes(draw(st.integers(1, 16)))
    return DEFAULT_LIMITS, "size_mismatch"


@mutation
def frame_dropped(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    del frames[draw(st.integers(1, len(frames) - 1)) if len(frames) > 1 else 0]
    return DEFAULT_LIMITS, "frame_count"


@mutation
def frame_added(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    frames.insert(draw(st.integers(1, len(frames))), draw(st.binary(max_size=16)))
    return DEFAULT_LIMITS, "frame_count"


@mutation
def total_too_large(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    total = len(json.dumps(obj).encode()) + sum(len(f) for f in frames[1:])
    return dataclasses.replace(DEFAULT_LIMITS, max_message_bytes=draw(st.integers(0, total - 1))), "too_large"


@mutation
def header_too_large(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    size = len(json.dumps(obj).encode())
    return dataclasses.replace(DEFAULT_LIMITS, max_header_bytes=draw(st.integers(0, size - 1))), "too_large"


@mutation
def not_an_object(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    frames[0] = json.dumps(draw(st.sampled_from([[obj], "x", 1, None, True]))).encode()
    return DEFAULT_LIMITS, "bad_header"


@mutation
def not_json(draw: st.DrawFn, obj: dict[str, Any], frames: list[bytes]) -> tuple[WireLimits, str]:
    text = json.dumps(obj).encode()
    frames[0] = draw(
        st.sampled_from(
            [
                text[: len(text) // 2],
                text + b"}",
                text + b"\xff",
                b"\xfe" + text,
                text.replace(b'"seq":', b'"seq":NaN,"x":', 1),
                text.replace(b'"seq":', b'"seq":' + b"7" * 5000 + b',"x":', 1),
                text.replace(b"{", b"{'", 1),
            ]
        )
    )
    return DEFAULT_LIMITS, "bad_header"


@pytest.mark.parametrize("name", sorted(MUTATIONS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), data=st.data())
def test_damage_yields_specific_code(
    name: str, message: tuple[Envelope, dict[str, np.ndarray]], data: st.DataObject
) -> None:
    obj, frames = _frames(*message)
    limits, expected = MUTATIONS[name](data.draw, obj, frames)
    if frames and name not in {"not_an_object", "not_json"}:
        frames[0] = json.dumps(obj).encode()
    try:
        decode(frames, limits)
    except WireError as err:
        assert err.code == expected, f"{name}: expected {expected}, got {err.code}: {err.message}"
    else:
        raise AssertionError(f"{name}: decoded without error, expected {expected}")


# ----------------------------------------------------------------------------- (3) round trip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), as_bytes=st.booleans())
def test_round_trip(message: tuple[Envelope, dict[str, np.ndarray]], as_bytes: bool) -> None:
    env, tensors = message
    frames = encode(env, tensors)
    msg = decode([bytes(f) for f in frames] if as_bytes else frames)
    assert dataclasses.replace(msg.envelope, tensors=()) == env
    assert [(s.name, s.dtype, s.shape) for s in msg.envelope.tensors] == [
        (name, a.dtype.name, a.shape) for name, a in tensors.items()
    ]
    for name, sent in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert got.tobytes() == sent.tobytes()
        assert not got.flags.writeable
