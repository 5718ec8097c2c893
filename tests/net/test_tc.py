"""tc plans on real interfaces: apply, read back, clear, update, and goodput through an HTB-shaped veth.

The pure half (how a TcOp becomes pyroute2 arguments and netlink bytes, and back) runs everywhere; it is
also what covers the netem path on kernels without sch_netem. The real half needs root and `ip netns`;
it works only in namespaces named tb-t-tc-<pid>-*, which a fixture always removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC, RTM_NEWTCLASS
from pyroute2.netlink.rtnl.tcmsg import plugins, tcmsg

from testbed.net import tc
from testbed.net.link import DirectionSpec, LinkError
from testbed.net.tcplan import HTB_CLASS, HTB_ROOT, TC_H_ROOT, TcOp, plan_direction

TICKS_PER_US = 15.625


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


needs_netns = pytest.mark.skipif(not _netns_usable(), reason="needs root and `ip netns`")


# ----------------------------------------------------------------------------- pure: arguments and bytes


def _round_trip(op: TcOp) -> dict[str, Any]:
    """Encode op as pyroute2 would send it, decode the bytes, read them back as tc.read_qdiscs would."""
    command, kind, kwargs = tc._pyroute2_call(op, "add")
    is_class = command.endswith("-class")
    plugin = plugins[kind]
    options = (plugin.get_class_parameters if is_class else plugin.get_parameters)(dict(kwargs))
    msg = tcmsg()
    msg["header"]["type"] = RTM_NEWTCLASS if is_class else RTM_NEWQDISC
    msg["handle"], msg["parent"] = op.handle, op.parent
    msg["attrs"] = [["TCA_KIND", kind], ["TCA_OPTIONS", options]]
    msg.encode()
    back = tcmsg(msg.data)
    back.decode()
    return tc._decode(back, is_class)


def _assert_matches(entry: dict[str, Any], op: TcOp) -> None:
    assert (entry["kind"], entry["handle"], entry["parent"]) == (op.kind, op.handle, op.parent)
    for key, want in op.params:
        got = entry[key]
        if key.endswith("burst_bytes"):  # stored as whole 64-ns ticks of the rate
            assert abs(got - want) <= entry["rate_bps"] / 8 / 1e6 / TICKS_PER_US + 1, key
        else:
            assert got == want, key


def test_netem_arguments_are_in_pyroute2_units() -> None:
    op = plan_direction(DirectionSpec(rate_bps=10**8, delay_us=5000, jitter_us=1000, loss_ppm=1000), netem=True)[-1]
    assert tc._pyroute2_call(op, "add") == (
        "add", "netem", {"parent": HTB_CLASS, "delay": 5000, "jitter": 1000, "loss": 0.1, "limit": 1000}
    )
    cls = plan_direction(DirectionSpec(rate_bps=10**8), netem=False)[1]
    command, kind, kwargs = tc._pyroute2_call(cls, "change")
    assert (command, kind, kwargs["rate"], kwargs["burst"]) == ("change-class", "htb", 12_500_000, 3000)


@pytest.mark.parametrize(
    "spec",
    [
        DirectionSpec(rate_bps=100_000_000, delay_us=5000, jitter_us=1000, loss_ppm=1000),
        DirectionSpec(rate_bps=40_000_000_000, delay_us=20_000, loss_ppm=1),  # HTB RATE64
        DirectionSpec(rate_bps=10**12, delay_us=100),
        DirectionSpec(delay_us=60_000_000 - 1, jitter_us=1, loss_ppm=999_999),
        DirectionSpec(loss_ppm=1_000_000),
    ],
)
def test_plans_survive_netlink_encoding(spec: DirectionSpec) -> None:
    for op in plan_direction(spec, netem=True):
        _assert_matches(_round_trip(op), op)


def test_unknown_op_kinds_are_refused_before_netlink() -> None:
    with pytest.raises(LinkError, match="unsupported tc operation kind 'tbf'"):
        tc.apply_plan("tb-t-never-created", "x", [TcOp("tbf", HTB_ROOT, TC_H_ROOT)])


# ----------------------------------------------------------------------------- real namespaces


@dataclass(frozen=True)
class Pair:
    a: str  # namespace with "va" (198.18.0.1/30); its egress is what we shape
    b: str  # namespace with "vb" (198.18.0.2/30)


@contextlib.contextmanager
def scratch_pair(tag: str) -> Iterator[Pair]:
    """Two namespaces joined by a veth; removes exactly the namespaces it created, whatever happens."""
    names = [f"tb-t-{tag}-{os.getpid()}-a", f"tb-t-{tag}-{os.getpid()}-b"]
    created: list[str] = []
    try:
        for name in names:
            assert name not in netns.listnetns(), f"{name} already exists"
            netns.create(name)
            created.append(name)
        with IPRoute(netns=names[0], flags=0) as ipr:
            ipr.link("add", ifname="va", kind="veth", peer={"ifname": "vb", "net_ns_fd": names[1]})
            index = ipr.link_lookup(ifname="va")[0]
            ipr.addr("add", index=index, address="198.18.0.1", prefixlen=30)
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=names[1], flags=0) as ipr:
            index = ipr.link_lookup(ifname="vb")[0]
            ipr.addr("add", index=index, address="198.18.0.2", prefixlen=30)
            ipr.link("set", index=index, state="up")
        yield Pair(*names)
    finally:
        for name in created:
            netns.remove(name)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    if not _netns_usable():
        pytest.skip("needs root and `ip netns`")
    with scratch_pair("tc") as made:
        yield made
    assert not [n for n in netns.listnetns() if n.startswith(f"tb-t-tc-{os.getpid()}-")]


def _root_kinds(p: Pair) -> list[str]:
    """Root qdiscs someone added (the kernel's defaults, noqueue or pfifo_fast, have handle 0)."""
    return [e["kind"] for e in tc.read_qdiscs(p.a, "va") if e["parent"] == TC_H_ROOT and e["handle"] != 0]


def _netem_available(p: Pair) -> bool:
    with IPRoute(netns=p.b, flags=0) as ipr:
        index = ipr.link_lookup(ifname="vb")[0]
        try:
            ipr.tc("add", "netem", index, HTB_ROOT, parent=TC_H_ROOT, delay=1000)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
        ipr.tc("del", index=index, handle=HTB_ROOT, parent=TC_H_ROOT)
    return True


@pytest.mark.netns
@pytest.mark.parametrize("rate", [100_000_000, 5_700_001, 5_000_000_000, 40_000_000_000, 10**12])
def test_apply_and_read_back_rates(pair: Pair, rate: int) -> None:
    ops = plan_direction(DirectionSpec(rate_bps=rate), netem=False)
    tc.apply_plan(pair.a, "va", ops)
    entries = tc.read_qdiscs(pair.a, "va")
    assert [e["kind"] for e in entries] == ["htb", "htb-class"]
    for entry, op in zip(entries, ops, strict=True):
        _assert_matches(entry, op)
    tc.clear(pair.a, "va")


@pytest.mark.netns
def test_netem_plan_applies_where_the_kernel_has_netem_and_fails_clearly_where_not(pair: Pair) -> None:
    ops = plan_direction(DirectionSpec(rate_bps=10**8, delay_us=5000, jitter_us=1000, loss_ppm=1000), netem=True)
    if _netem_available(pair):
        tc.apply_plan(pair.a, "va", ops)
        entries = tc.read_qdiscs(pair.a, "va")
        netem = [e for e in entries if e["kind"] == "netem"]
        assert len(netem) == 1
        _assert_matches(netem[0], ops[-1])
        tc.update_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=10**8, delay_us=7000), netem=True))
        assert [e["delay_us"] for e in tc.read_qdiscs(pair.a, "va") if e["kind"] == "netem"] == [7000]
        tc.clear(pair.a, "va")
    else:
        with pytest.raises(LinkError) as info:
            tc.apply_plan(pair.a, "va", ops)
        message = str(info.value)
        assert "netem" in message and "ENOENT" in message and "va in netns tb-t-tc-" in message
        assert "delay line" in message
        assert _root_kinds(pair) == [], "a failed plan leaves the interface cleared, not half-shaped"


@pytest.mark.netns
def test_clear_is_idempotent(pair: Pair) -> None:
    tc.clear(pair.a, "va")
    tc.clear(pair.a, "va")
    tc.apply_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=10**7), netem=False))
    assert _root_kinds(pair) == ["htb"]
    tc.clear(pair.a, "va")
    assert _root_kinds(pair) == []
    tc.clear(pair.a, "va")
    tc.apply_plan(pair.a, "va", [])  # an empty plan just clears
    assert _root_kinds(pair) == []


@pytest.mark.netns
def test_apply_replaces_what_was_there(pair: Pair) -> None:
    tc.apply_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=10**7), netem=False))
    tc.apply_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=2 * 10**7), netem=False))
    rates = [e["rate_bps"] for e in tc.read_qdiscs(pair.a, "va") if e["kind"] == "htb-class"]
    assert rates == [2 * 10**7]
    tc.clear(pair.a, "va")


@pytest.mark.netns
def test_update_changes_rates_in_place(pair: Pair) -> None:
    tc.update_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=10**8), netem=False))  # nothing yet: applies
    tc.update_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=5 * 10**7), netem=False))
    entries = tc.read_qdiscs(pair.a, "va")
    assert [(e["kind"], e.get("rate_bps")) for e in entries] == [("htb", None), ("htb-class", 5 * 10**7)]
    tc.update_plan(pair.a, "va", [])  # a different shape: rebuilt (here: cleared)
    assert _root_kinds(pair) == []


@pytest.mark.netns
def test_errors_name_the_interface_and_namespace(pair: Pair) -> None:
    with pytest.raises(LinkError, match=f"no interface nope0 in netns {pair.a}"):
        tc.apply_plan(pair.a, "nope0", [])
    missing = f"tb-t-tc-{os.getpid()}-missing"
    with pytest.raises(LinkError, match=f"network namespace '{missing}' does not exist"):
        tc.clear(missing, "va")
    assert missing not in netns.listnetns(), "looking at a namespace must never create it"


def _goodput_mbit(p: Pair, seconds: float) -> float:
    """Bytes per second received in p.b from a TCP stream sent from p.a for `seconds`, in Mbit/s."""
    server = netns.create_socket(p.b, flags=0)
    result: dict[str, float] = {}
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("198.18.0.2", 0))
        server.listen(1)
        server.settimeout(5)
        port = server.getsockname()[1]

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                total, first = 0, 0.0
                for _ in range(1_000_000):  # bounded: a 2-s stream at 100 Mbit/s is far fewer reads
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    if not first:
                        first = time.monotonic()
                    total += len(data)
                result["mbit"] = total * 8 / (time.monotonic() - first) / 1e6

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        client = netns.create_socket(p.a, flags=0)
        with client:
            client.settimeout(5)
            client.connect(("198.18.0.2", port))
            chunk = b"\0" * (1 << 16)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                client.sendall(chunk)
        thread.join(10)
    finally:
        server.close()
    return result["mbit"]


@pytest.mark.netns
@pytest.mark.slow
def test_goodput_through_htb_at_100mbit(pair: Pair) -> None:
    tc.apply_plan(pair.a, "va", plan_direction(DirectionSpec(rate_bps=100_000_000), netem=False))
    try:
        goodput = _goodput_mbit(pair, 1.5)
    finally:
        tc.clear(pair.a, "va")
    # TCP/IP headers take 66 of every 1514 bytes on the wire: ~95.6 Mbit/s at most
    assert 85 <= goodput <= 97, goodput


@needs_netns
@pytest.mark.netns
def test_scratch_pair_cleans_up_after_a_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), scratch_pair("fail") as p:
        assert p.a in netns.listnetns()
        raise RuntimeError("boom")
    assert not [n for n in netns.listnetns() if n.startswith(f"tb-t-fail-{os.getpid()}-")]
