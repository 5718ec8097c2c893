"""Command validation and deployment checks: every bad argument gets a code and a one-line reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.controller import deploy
from testbed.controller.protocol import (
    Command,
    CommandError,
    check_args,
    check_heartbeat,
    check_register,
    dispatch,
    parse_command,
    split_of,
)

PID = "0123456789abcdef:2:6"


def test_defaults_are_filled_in() -> None:
    args = check_args("start", {"edge": "tcp://127.0.0.1:5555", "requests": 10})
    assert args["batch_size"] == 1 and args["data"] is None and args["duration_s"] is None
    assert args["timeout_s"] == 30.0
    assert check_args("deploy", {"partition": PID, "version": 1, "head_sha256": "a" * 64,
                                 "tail_sha256": "b" * 64})["activate"] is False
    assert split_of(PID) == (2, 6)


@pytest.mark.parametrize(("name", "args", "code", "fragment"), [
    ("reboot", {}, "unknown_command", "unknown command 'reboot'"),
    (7, {}, "unknown_command", "unknown command 7"),
    ("stop", [], "bad_args", "must be a JSON object"),
    ("stop", {"now": True}, "bad_args", "unknown argument(s) ['now']"),
    ("set_split", {}, "bad_args", "'partition' is required"),
    ("set_split", {"partition": "p:1:2"}, "bad_args", "weights_hash:a:b"),
    ("set_split", {"partition": "0123456789abcdef:5:3"}, "bad_args", "1 <= a <= b"),
    ("start", {"edge": "tcp://x:1", "requests": True}, "bad_args", "integer"),
    ("start", {"edge": "tcp://x:1", "requests": "10"}, "bad_args", "integer"),
    ("start", {"edge": "tcp://x:1", "requests": 1, "batch_size": 0}, "bad_args", "1..4096"),
    ("start", {"edge": "tcp://x:1", "duration_s": float("nan")}, "bad_args", "number"),
    ("start", {"edge": "http://x", "requests": 1}, "bad_args", "ZeroMQ endpoint"),
    ("start", {"edge": "tcp://x:1"}, "bad_args", "a workload must end"),
    ("deploy", {"partition": PID, "version": 1, "head_sha256": "A" * 64, "tail_sha256": "b" * 64},
     "bad_args", "64 lower-case hex"),
    ("set_shares", {"shares": {"dev1": -1}}, "bad_args", "shares.dev1"),
    ("set_shares", {"shares": {"bad name": 1}}, "bad_args", "bad device name"),
    ("set_shares", {"shares": {}}, "bad_args", "1..1024"),
])
def test_bad_commands_are_refused_with_a_code(name: object, args: object, code: str, fragment: str) -> None:
    with pytest.raises(CommandError) as info:
        check_args(name, args)  # type: ignore[arg-type]
    assert info.value.code == code and fragment in str(info.value)


def test_tensors_must_match_the_command() -> None:
    meta = {"command": "stop", "args": {}}
    assert parse_command(meta, {}).name == "stop"
    with pytest.raises(CommandError, match="expected tensors"):
        parse_command(meta, {"head": np.zeros(3, np.uint8)})
    with pytest.raises(CommandError, match="unknown key"):
        parse_command({**meta, "extra": 1}, {})
    dep_meta, tensors = deploy.to_command(deploy.Deployment.of(PID, b"head", b"tail"))
    tensors["head"] = tensors["head"].astype(np.float32)
    with pytest.raises(CommandError, match="1-D uint8"):
        parse_command(dep_meta, tensors)


def test_dispatch_refuses_a_command_the_node_does_not_take() -> None:
    handlers = {"report": lambda cmd: {"ok": 1}}
    assert dispatch(Command("report", {"requests": False}), handlers) == {"ok": 1}
    with pytest.raises(CommandError) as info:
        dispatch(Command("set_shares", {}), handlers)
    assert info.value.code == "unsupported_command" and "it takes report" in str(info.value)


def test_deploy_round_trip_and_a_corrupted_artifact_is_refused(tmp_path: Path) -> None:
    dep = deploy.Deployment.of(PID, b"head-bytes", b"tail-bytes", version=3)
    meta, tensors = deploy.to_command(dep, activate=True)
    received = deploy.verify(parse_command(meta, tensors))
    assert received == dep
    head, tail = deploy.store(received, tmp_path)
    assert head.read_bytes() == b"head-bytes" and tail.read_bytes() == b"tail-bytes"
    assert deploy.store(received, tmp_path) == (head, tail)  # idempotent
    corrupted = dict(tensors, tail=np.frombuffer(b"tail-bytez", np.uint8))
    with pytest.raises(CommandError) as info:
        deploy.verify(parse_command(meta, corrupted))
    assert info.value.code == "hash_mismatch" and "tail" in str(info.value)


def test_register_and_heartbeat_objects_are_checked() -> None:
    assert check_register({"role": "edge"}) == {"role": "edge", "device_class": "", "facts": {}}
    for bad, fragment in (({"role": "x"}, "role"), ({"role": "device", "facts": []}, "facts"),
                          ({"role": "device", "device_class": 3}, "device_class"),
                          ({"role": "device", "port": 1}, "unknown key")):
        with pytest.raises(CommandError, match=fragment):
            check_register(bad)
    assert check_heartbeat({"status": {"a": 1}, "samples": [{}]}) == ({"a": 1}, [{}])
    for bad in ({"status": []}, {"samples": {}}, {"samples": [1]}, {"samples": [{}] * 10_000}, {"x": 1}):
        with pytest.raises(CommandError):
            check_heartbeat(bad)


def test_profile_and_deploy_body_arguments() -> None:
    args = check_args("profile", {"edge": "tcp://127.0.0.1:5555"})
    assert args["sizes"] == (16 * 1024, 256 * 1024) and args["count"] == 8 and args["budget_s"] == 30.0
    for bad, fragment in (({"sizes": [1, 1]}, "two different sizes"), ({"sizes": [1, 2 ** 30]}, "sizes[1]"),
                          ({"count": 10 ** 6}, "count"), ({"echo_partition": "0123456789abcdef:2:5",
                                                           "echo_shape": [8]}, "empty-body")):
        with pytest.raises(CommandError, match=fragment.replace("[", r"\[")) as info:
            check_args("profile", {"edge": "tcp://127.0.0.1:5555", **bad})
        assert info.value.code == "bad_args"
    assert check_args("deploy_body", {"weights_sha256": "a" * 64, "version": 1}) == {
        "weights_sha256": "a" * 64, "version": 1}


def test_body_round_trip_and_a_corrupted_body_is_refused(tmp_path: Path) -> None:
    data = b"weights" * 100
    meta, tensors = deploy.body_command(data, version=2)
    cmd = parse_command(meta, tensors)
    assert deploy.verify_body(cmd).sha256 == meta["args"]["weights_sha256"]
    path = deploy.store_body(deploy.verify_body(cmd), tmp_path)
    assert path.read_bytes() == data and path.parent == tmp_path / "body"
    tensors["weights"] = np.frombuffer(data[:-1] + b"x", np.uint8)
    with pytest.raises(CommandError) as info:
        deploy.verify_body(parse_command(meta, tensors))
    assert info.value.code == "hash_mismatch" and "kept" in info.value.message
