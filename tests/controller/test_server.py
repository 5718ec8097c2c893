"""The controller's server and the agents' control client over real ZeroMQ sockets on loopback, in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from agents.control_client import ControlClient
from testbed.controller.api import Controller, ControllerTimeout
from testbed.controller.protocol import REPORT, Command, CommandError
from testbed.controller.registry import Change
from testbed.controller.server import CommandFailed
from testbed.controller.status import NoController, query_status
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind
from testbed.wire.messages import CONTROL_LIMITS, send_message, unpack_meta

HB = 0.25  # a node is down after 3 silent beats (0.75 s): longer than a stall of this loaded process


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Controller]:
    with Controller(heartbeat_s=HB, run_dir=tmp_path / "run", command_timeout_s=10) as c:
        yield c
    assert not (tmp_path / "run" / "controller.json").exists()


@pytest.fixture
def peer(ctl: Controller) -> Iterator[zmq.Socket]:
    """A raw DEALER: it sends whatever the test wants, however wrong."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ctl.endpoint)
    yield sock
    sock.close(linger=0)


def answer(sock: zmq.Socket) -> tuple[Envelope, dict]:
    assert sock.poll(5000), "the controller did not answer"
    _, msg = channel.recv(sock, limits=CONTROL_LIMITS)
    return msg.envelope, unpack_meta(msg.tensors)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.seen = threading.Condition()

    def __call__(self, change: Change) -> None:
        with self.seen:
            self.changes.append(change)
            self.seen.notify_all()

    def wait(self, kind: str, node: str, timeout_s: float = 10.0) -> Change:
        with self.seen:
            assert self.seen.wait_for(lambda: any(c.kind == kind and c.node == node for c in self.changes),
                                      timeout_s), f"no {kind} for {node}: {self.changes}"
            return [c for c in self.changes if c.kind == kind and c.node == node][-1]  # the latest


def client(ctl: Controller, name: str, role: str = "device", **handlers) -> ControlClient:
    return ControlClient(zmq.Context.instance(), ctl.endpoint, name, role, handlers=handlers,
                         status=lambda: {"alive": True}, facts={"hostname": "here"}, heartbeat_s=HB)


@pytest.mark.parametrize("frames", [
    [b"not json"],
    [b'{"version":1,"kind":"heartbeat","device":"dev1","seq":1,"tensors":[{"name":"meta","dtype":"uint8",'
     b'"shape":[3],"nbytes":3}]}'],  # a tensor frame is missing
    [b'{"version":2,"kind":"register","device":"dev1","seq":1}'],
    [b'{"version":1,"kind":"launch","device":"dev1","seq":5}'],
    [],
])
def test_garbage_gets_an_error_reply_and_the_server_goes_on(ctl: Controller, peer: zmq.Socket,
                                                            frames: list[bytes]) -> None:
    peer.send_multipart(frames or [b""])
    env, _ = answer(peer)
    assert env.kind is Kind.ERROR and env.error is not None
    send_message(peer, Kind.STATUS, "probe", 2)
    env, status = answer(peer)
    assert env.kind is Kind.STATUS_REPLY and status["endpoint"] == ctl.endpoint


@pytest.mark.parametrize(("kind", "meta", "code"), [
    (Kind.INFER_REQUEST, None, "bad_kind"),
    (Kind.REGISTER, {"role": "toaster"}, "bad_args"),
    (Kind.REGISTER, {"role": "device", "facts": [1, 2]}, "bad_args"),
    (Kind.HEARTBEAT, {"status": {}}, "unknown_node"),
])
def test_wrong_messages_are_refused_with_a_code(ctl: Controller, peer: zmq.Socket, kind: Kind, meta: dict | None,
                                                code: str) -> None:
    send_message(peer, kind, "dev9", 7, meta=meta)
    env, _ = answer(peer)
    assert env.kind is Kind.ERROR and env.error is not None and env.error.code == code and env.seq == 7
    assert all(n.name != "dev9" for n in ctl.nodes())


def test_a_meta_that_is_not_json_is_refused(ctl: Controller, peer: zmq.Socket) -> None:
    send_message(peer, Kind.REGISTER, "dev9", 3, tensors={"meta": np.frombuffer(b"{nope", np.uint8)})
    env, _ = answer(peer)
    assert env.kind is Kind.ERROR and env.error is not None and env.error.code == "bad_field"


def test_register_command_down_and_readmission(ctl: Controller) -> None:
    rec = Recorder()
    ctl.on_change(rec)
    shares: dict[str, float] = {}

    def set_shares(cmd: Command) -> dict:
        shares.update(cmd.args["shares"])
        return {"shares": dict(shares)}

    def report(cmd: Command) -> dict:
        if cmd.args["requests"]:
            raise CommandError("busy", "not now")
        return {"n": 1}

    with client(ctl, "edge", "edge", set_shares=set_shares, report=report) as edge:
        assert ctl.wait_for(0, timeout_s=10) == ()
        assert edge.registered.wait(10)
        [view] = ctl.nodes()
        assert (view.name, view.role, view.up, view.facts["hostname"]) == ("edge", "edge", True, "here")
        assert ctl.set_shares({"dev1": 2.0, "dev2": 1.0}) == {"shares": {"dev1": 2.0, "dev2": 1.0}}
        assert ctl.report("edge") == {"n": 1}
        with pytest.raises(CommandFailed, match="busy: not now"):
            ctl.report("edge", requests=True)
        with pytest.raises(CommandFailed) as info:
            ctl.stop_workload("edge")
        assert info.value.code == "unsupported_command"
        with pytest.raises(CommandError, match="unknown command"):
            ctl.command("edge", "format_disk")
        rec.wait("registered", "edge")
    # The client is gone: no more heartbeats, so the edge goes down, and commands to it fail at once.
    down = rec.wait("down", "edge")
    assert down.at - ctl.registry.get("edge").last_seen > 3 * HB
    with pytest.raises(CommandFailed, match="not up"):
        ctl.report("edge")
    with client(ctl, "edge", "edge", report=report) as again:
        rec.wait("readmitted", "edge")
        assert again.registered.wait(10) and ctl.registry.get("edge").incarnation == 2
        assert ctl.report("edge") == {"n": 1}


def test_a_forgetful_controller_makes_the_agent_register_again() -> None:
    """After a controller restart on the same endpoint the agent's heartbeats get unknown_node: it registers."""
    with Controller(heartbeat_s=HB) as first:
        endpoint = first.endpoint
        with client(first, "dev1") as dev:
            first.wait_for(1, 10, edge=False)
            first.close()
            with Controller(endpoint, heartbeat_s=HB) as second:
                assert second.wait_for(1, 10, edge=False) == ("dev1",)
                deadline = time.monotonic() + 10
                while dev.registrations < 2 and time.monotonic() < deadline:  # the reply is on its way
                    time.sleep(0.01)
                assert dev.registrations == 2


def test_bad_command_arguments_reach_the_agent_and_get_an_error(ctl: Controller) -> None:
    """The controller checks arguments before sending; an agent checks again (another controller may not)."""
    with client(ctl, "dev1", report=lambda cmd: {"ok": True}):
        ctl.wait_for(1, 10, edge=False)
        for meta, code in (({"command": "report", "args": {"requests": "yes"}}, "bad_args"),
                           ({"command": "reboot"}, "unknown_command"),
                           ({"command": "report", "args": {}, "extra": 1}, "bad_args")):
            with pytest.raises(CommandFailed) as info:
                ctl._send("dev1", meta, {}, timeout_s=10)  # bypasses the controller's own check on purpose
            assert info.value.code == code
        assert ctl.command("dev1", REPORT) == {"ok": True}


def test_wait_for_says_who_is_missing(ctl: Controller) -> None:
    with pytest.raises(ControllerTimeout, match=r"0 of 2 devices up after 0\.3 s"):
        ctl.wait_for(2, 0.3)


def test_status_answers_and_a_missing_controller_is_a_clear_error(ctl: Controller) -> None:
    with client(ctl, "dev1"):
        ctl.wait_for(1, 10, edge=False)
        ctl.set_link_estimate("dev1", uplink_bps=1e6, downlink_bps=2e6, rtt_s=0.01)
        deadline = time.monotonic() + 10
        while not (status := query_status(ctl.endpoint, timeout_s=5))["nodes"][0]["status"]:
            assert time.monotonic() < deadline, "no heartbeat arrived"  # the first one follows registration
            time.sleep(0.02)
    [node] = status["nodes"]
    assert node["name"] == "dev1" and node["up"] and node["status"] == {"alive": True}
    assert node["link"] == {"uplink_bps": 1e6, "downlink_bps": 2e6, "rtt_s": 0.01, "source": "estimate"}
    with pytest.raises(NoController, match="no controller answered"):
        query_status("tcp://127.0.0.1:1", timeout_s=0.2)
