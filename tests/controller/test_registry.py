"""The registry's membership rules, on a clock the test moves by hand."""

from __future__ import annotations

import pytest

from testbed.controller.registry import Registry, UnknownNode


def test_a_node_is_down_only_after_missing_three_heartbeats() -> None:
    reg = Registry(heartbeat_s=1.0, missed_beats=3)
    assert [c.kind for c in reg.register("dev1", "device", 0.0, device_class="pi4", facts={"cpu": "x"})] == [
        "registered"]
    assert reg.heartbeat("dev1", 1.0, {"partition": "p"}) == []
    assert reg.check(4.0) == []  # silent for exactly 3 intervals: not yet
    [change] = reg.check(4.01)
    assert (change.kind, change.node, change.role, change.at) == ("down", "dev1", "device", 4.01)
    assert reg.check(10.0) == []  # reported once
    view = reg.get("dev1")
    assert not view.up and view.device_class == "pi4" and view.facts["cpu"] == "x"
    assert view.status == {"partition": "p"}


def test_a_down_node_that_heartbeats_again_is_readmitted() -> None:
    reg = Registry(heartbeat_s=0.5)
    reg.register("dev1", "device", 0.0)
    reg.register("edge", "edge", 0.0)
    reg.heartbeat("edge", 1.4)
    assert [c.node for c in reg.check(1.6)] == ["dev1"]
    assert reg.up() == ("edge",)
    [change] = reg.heartbeat("dev1", 2.0)
    assert change.kind == "readmitted"
    assert reg.up("device") == ("dev1",)
    assert [c.kind for c in reg.history] == ["registered", "registered", "down", "readmitted"]


def test_registering_again_counts_as_a_restart() -> None:
    reg = Registry()
    reg.register("dev1", "device", 0.0)
    [change] = reg.register("dev1", "device", 5.0)
    assert change.kind == "readmitted"
    assert reg.get("dev1").incarnation == 2 and reg.get("dev1").registered_at == 5.0


def test_unknown_nodes_and_bad_settings_are_refused() -> None:
    reg = Registry()
    with pytest.raises(UnknownNode, match="has not registered"):
        reg.heartbeat("ghost", 0.0)
    with pytest.raises(UnknownNode, match="known: none"):
        reg.get("ghost")
    with pytest.raises(ValueError, match="role"):
        reg.register("x", "router", 0.0)
    with pytest.raises(ValueError):
        Registry(heartbeat_s=0.0)
    with pytest.raises(ValueError):
        Registry(missed_beats=0)


def test_a_late_heartbeat_never_moves_last_seen_backwards() -> None:
    reg = Registry()
    reg.register("dev1", "device", 10.0)
    reg.heartbeat("dev1", 9.0)
    assert reg.get("dev1").last_seen == 10.0
