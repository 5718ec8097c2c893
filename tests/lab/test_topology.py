"""Pure parts of the lab: naming, addresses, ports, device classes, quotas, the state record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.lab import hosts
from testbed.lab.cgroups import MIN_QUOTA_US, quota_for
from testbed.lab.devices import PROFILES_DIR, load_device_class, slowdown
from testbed.lab.state import LabState, ProcessRecord, StateStore
from testbed.lab.topology import LabError, build_topology


def test_names_and_addresses_follow_the_prefix() -> None:
    topo = build_topology(3, "5g-sub6", "delay-line", "raspberry-pi-4", prefix="tbx")
    assert topo.namespaces() == ["tbx-lab", "tbx-edge", "tbx-dev1", "tbx-dev2", "tbx-dev3"]
    assert topo.edge.address == "10.254.77.1" and topo.router_address == "10.254.77.254"
    assert [d.address for d in topo.devices] == ["10.254.77.11", "10.254.77.12", "10.254.77.13"]
    dev2 = topo.host("dev2")
    assert topo.uplink_port(dev2).netns == "tbx-dev2" and topo.uplink_port(dev2).ifname == "tun0"
    assert topo.downlink_port(dev2).netns == "tbx-lab" and topo.downlink_port(dev2).ifname == "dev2-dl"
    veth = build_topology(1, "lte", "netem", prefix="tbx")
    assert veth.uplink_port(veth.devices[0]).ifname == "eth0"
    assert veth.downlink_port(veth.devices[0]).ifname == "dev1-p"
    assert all(len(topo.switch_port(h)) <= 15 for h in build_topology(200, "lte", "netem").hosts)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"devices": 0}, "between 1 and 200"),
    ({"devices": 201}, "between 1 and 200"),
    ({"prefix": "Bad-Prefix"}, "lowercase"),
    ({"subnet": "8.8.8.0/24"}, "private IPv4 /24"),
    ({"subnet": "10.0.0.0/16"}, "private IPv4 /24"),
])
def test_bad_topologies_are_refused(kwargs: dict, message: str) -> None:
    args = {"devices": 2, "link_profile": "lte", "backend": "netem", **kwargs}
    with pytest.raises(LabError, match=message):
        build_topology(**args)
    with pytest.raises(LabError, match="no lab host 'dev9'"):
        build_topology(2, "lte", "netem").host("dev9")


def test_every_shipped_device_class_loads_with_a_source() -> None:
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin", "edge-gpu"} <= set(names)
    for name in names:
        cls = load_device_class(name)
        assert cls.source and cls.cores >= 1 and cls.speed_vs_pi4 > 0
    assert load_device_class("raspberry-pi-4").speed_vs_pi4 == 1.0
    with pytest.raises(LabError, match=r"known: .*raspberry-pi-4"):
        load_device_class("raspberry-pi-9")


def test_bad_device_class_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\ncores: 2\nspeed_vs_pi4: fast\nsource: me\n")
    (tmp_path / "extra.yaml").write_text("name: x\ncores: 2\nspeed_vs_pi4: 1\nsource: me\ncolour: red\n")
    with pytest.raises(LabError, match=r"bad\.yaml"):
        load_device_class("bad", tmp_path)
    with pytest.raises(LabError, match="expected keys"):
        load_device_class("extra", tmp_path)


def test_quota_matches_the_slowdown() -> None:
    pi4 = load_device_class("raspberry-pi-4")
    assert slowdown(pi4, host_speed=6.0) == 6.0
    q = quota_for(6.0)
    assert q is not None and q.cores == pytest.approx(1 / 6, rel=0.01)
    assert quota_for(1.0) is None and quota_for(0.5) is None
    huge = quota_for(100.0)
    assert huge is not None and huge.quota_us >= MIN_QUOTA_US and huge.cores == pytest.approx(0.01, rel=0.01)
    two = quota_for(4.0, cores=2)
    assert two is not None and two.cores == pytest.approx(0.5, rel=0.01)
    corrected = quota_for(6.0, correction=1.2)
    assert corrected is not None and corrected.cores == pytest.approx(0.2, rel=0.01)


def test_state_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = LabState(build_topology(2, "lte", "delay-line", "raspberry-pi-5", prefix="tbq"))
    state.namespaces = ["tbq-lab", "tbq-edge"]
    state.processes.append(ProcessRecord("delayline-dev1", 123, 456, "/run/x.sock"))
    state.links["dev1"] = {"uplink": {"rate_bps": 1000000, "delay_us": 5000, "jitter_us": 0, "loss_ppm": 0}}
    store.save(state)
    loaded = store.load("tbq")
    assert loaded == state
    assert store.load("nope") is None
    store.path("bad").write_text("{not json")
    with pytest.raises(LabError, match="unreadable"):
        store.load("bad")


def test_process_facts_of_a_process_that_is_gone_are_none_even_mid_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab down` polls /proc/PID/stat while the processes it stopped exit; one that is reaped between the open and
    the read fails the read with ESRCH (a CI run's `lab down` died of it): that is a process gone, not an error."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert hosts.process_start_ticks(proc.pid) is None and hosts.command_line(proc.pid) == ""  # reaped: no /proc
    assert hosts.process_start_ticks(1) is not None  # init is there

    def reaped_mid_read(self: Path, *args: object, **kwargs: object) -> str:  # the kernel's answer in that race
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(Path, "read_text", reaped_mid_read)
    monkeypatch.setattr(Path, "read_bytes", reaped_mid_read)
    assert hosts.process_start_ticks(1) is None and hosts.command_line(1) == ""
