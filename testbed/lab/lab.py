"""Build, change, inspect and remove the emulated lab (the thin shell around topology + state)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testbed.lab import hosts, sshd
from testbed.lab.calibrate import load_correction
from testbed.lab.cgroups import CpuGroup, find_cpu_cgroup_root, quota_for
from testbed.lab.delaylines import DelayLineControl, start_delay_line, tun_mtu
from testbed.lab.devices import host_speed_vs_pi4, load_device_class, slowdown
from testbed.lab.state import LabState, ProcessRecord, StateStore
from testbed.lab.topology import Backend, LabError, LabHost, build_topology
from testbed.net.link import DirectionSpec, LinkSpec
from testbed.net.tc import read_qdiscs, update_plan
from testbed.net.tcplan import plan_direction

DIRECTIONS = ("uplink", "downlink")


#: TCP congestion control of every lab host, first that the kernel accepts. A new namespace inherits the host's
#: default, which on some machines (this CI VM) is BBR: BBR paces each reply at ~2.9 × a bandwidth estimate that
#: request/response traffic keeps far below the link rate (app-limited samples of about one reply per RTT), so
#: every reply above BBR's ~1 ms send quantum took ≈ RTT/2.9 longer (+2.2 ms at a 6.7 ms RTT) than the link
#: gives. Linux's default (cubic) and the Raspberry Pi's do not pace; reno is the fallback where only
#: "allowed" algorithms may be set outside the initial namespace. See docs/delayline.md.
CONGESTION_CONTROLS = ("cubic", "reno")


def pin_congestion_control(netns: str, choices: tuple[str, ...] = CONGESTION_CONTROLS) -> str:
    """Set the namespace's default TCP congestion control to the first of `choices` it takes; return it."""
    refused: list[str] = []
    for name in choices:
        try:
            hosts.write_sysctl(netns, "net.ipv4.tcp_congestion_control", name)
        except OSError as exc:  # ENOENT: not built; EPERM: not in tcp_allowed_congestion_control
            refused.append(f"{name}: {exc.strerror or exc}")
            continue
        return name
    raise LabError(f"{netns}: no TCP congestion control out of {', '.join(choices)} could be set "
                   f"({'; '.join(refused)})")


def netem_available() -> bool:
    from testbed.net.capabilities import backend_for, probe

    return backend_for(probe()).get("delay") == "netem"


class Lab:
    """Operations on the lab named by `prefix`; the state store is passed in (tests use their own)."""

    def __init__(self, store: StateStore, prefix: str = "tb") -> None:
        self.store = store
        self.prefix = prefix

    # ---- up ----
    def up(self, devices: int, link_name: str, link: LinkSpec, backend: Backend | None = None,
           device_class: str | None = None, agent_threads: int = 1, ssh: bool = False) -> LabState:
        hosts.require_root()
        existing = self.store.load(self.prefix)
        if existing is not None or any(ns.startswith(f"{self.prefix}-") for ns in hosts.list_namespaces()):
            raise LabError(f"a lab with prefix {self.prefix!r} exists already: run `testbed lab down` first")
        if device_class is not None:
            load_device_class(device_class)  # fail before building anything
        chosen: Backend = backend or ("netem" if netem_available() else "delay-line")
        topo = build_topology(devices, link_name, chosen, device_class, prefix=self.prefix)
        state = LabState(topo)
        self.store.save(state)
        try:
            self._build(state, link, agent_threads)
            if ssh:
                self._start_sshd(state)
        except BaseException:
            self.down()
            raise
        state.complete = True
        self.store.save(state)
        return state

    def _build(self, state: LabState, link: LinkSpec, agent_threads: int) -> None:
        topo = state.topology
        for ns in topo.namespaces():
            state.namespaces.append(ns)  # written down before it exists
            self.store.save(state)
            hosts.create_namespace(ns)
        for host in topo.hosts:
            # A request after an idle gap must not restart from a slow-start window: the latency model (and a
            # long-lived split-inference connection on a real device, tuned the same way) assumes the link rate.
            hosts.write_sysctl(host.netns, "net.ipv4.tcp_slow_start_after_idle", "0")
            pin_congestion_control(host.netns)
        hosts.build_switch(topo)
        # The edge's veth carries the delay lines' TUN MTU: with 1500 there, TCP would cut every reply to a
        # mmWave device into 1.5 KB segments, each paying the Python delay line's per-packet cost (~+1 ms per
        # 300 KB). Each connection's MSS still follows the smaller end (an LTE TUN stays at 1500).
        hosts.attach_by_veth(topo, topo.edge, mtu=1500 if topo.backend == "netem" else tun_mtu(link))
        for dev in topo.devices:
            if topo.backend == "netem":
                hosts.attach_by_veth(topo, dev)
            else:
                record = start_delay_line(topo, dev, link, self.store.run_dir(self.prefix))
                state.processes.append(record)
                self.store.save(state)
            self._shape(state, dev, link)
        if topo.devices and topo.devices[0].device_class:
            self._limit_cpu(state, agent_threads)

    def _limit_cpu(self, state: LabState, agent_threads: int) -> None:
        root = find_cpu_cgroup_root()
        host_speed = host_speed_vs_pi4()
        for dev in state.topology.devices:
            assert dev.device_class is not None
            cls = load_device_class(dev.device_class)
            group = CpuGroup(root, self.cgroup_relative(dev))
            state.cgroups.append(str(group.path))
            self.store.save(state)
            group.create(quota_for(slowdown(cls, host_speed), cores=min(cls.cores, agent_threads),
                                   correction=load_correction(self.store.dir)))

    def ssh_access(self) -> sshd.SshAccess:
        return sshd.access_for(self.store.run_dir(self.prefix), self.prefix)

    def _start_sshd(self, state: LabState) -> None:
        """A real sshd in every host but the switch, each written to the record before it starts."""
        access = self.ssh_access()
        sshd.prepare(access, state.topology)
        for host in state.topology.hosts:
            state.processes.append(ProcessRecord(sshd.record_name(host), 0, 0, str(access.pidfile(host))))
            self.store.save(state)
            state.processes[-1] = sshd.start(access, host, lambda argv, h=host: self.command_in(h.name, argv))
            self.store.save(state)

    def cgroup_relative(self, dev: LabHost) -> str:
        return f"{self.prefix}-lab/{dev.name}"

    # ---- links ----
    def _shape(self, state: LabState, dev: LabHost, link: LinkSpec) -> None:
        topo = state.topology
        netem = topo.backend == "netem"
        mtu = 1500 if netem else next(p.mtu for p in state.processes if p.name == f"delayline-{dev.name}")
        for direction, spec, port in (
            ("uplink", link.uplink, topo.uplink_port(dev)),
            ("downlink", link.downlink, topo.downlink_port(dev)),
        ):
            ops = plan_direction(spec, netem=netem, mtu=mtu)
            update_plan(port.netns, port.ifname, ops)  # in place where it can: queued packets survive
            state.links.setdefault(dev.name, {})[direction] = asdict(spec)
        if not netem:
            record = next(p for p in state.processes if p.name == f"delayline-{dev.name}")
            DelayLineControl(record.control).set(link.uplink, link.downlink)
        self.store.save(state)

    def set_link(self, device: str, uplink: DirectionSpec | None, downlink: DirectionSpec | None) -> LinkSpec:
        state = self.require_state()
        dev = state.topology.host(device)
        if dev.role != "device":
            raise LabError("links are set per device; the edge's own interface is never shaped")
        current = self.link_of(state, dev)
        new = LinkSpec(uplink or current.uplink, downlink or current.downlink)
        self._shape(state, dev, new)
        return new

    @staticmethod
    def link_of(state: LabState, dev: LabHost) -> LinkSpec:
        links = state.links.get(dev.name, {})
        return LinkSpec(DirectionSpec(**links.get("uplink", {})), DirectionSpec(**links.get("downlink", {})))

    # ---- status ----
    def require_state(self) -> LabState:
        state = self.store.load(self.prefix)
        if state is None:
            raise LabError(f"no lab with prefix {self.prefix!r} is up: run `testbed lab up` first")
        return state

    def status(self) -> dict[str, Any]:
        state = self.require_state()
        topo = state.topology
        present = set(hosts.list_namespaces())
        out: dict[str, Any] = {"prefix": topo.prefix, "subnet": topo.subnet, "backend": topo.backend,
                               "link_profile": topo.link_profile, "complete": state.complete, "hosts": []}
        for host in topo.hosts:
            entry: dict[str, Any] = {"name": host.name, "netns": host.netns, "address": host.address,
                                     "role": host.role, "device_class": host.device_class,
                                     "present": host.netns in present}
            if entry["present"]:
                entry["interfaces"] = hosts.addresses(host.netns)
                entry["processes"] = [{"pid": p, "command": hosts.command_line(p)}
                                      for p in hosts.pids_in_namespace(host.netns)]
            if host.role == "device" and entry["present"]:
                entry["link"] = state.links.get(host.name, {})
                up, down = topo.uplink_port(host), topo.downlink_port(host)
                entry["qdiscs"] = {"uplink": _safe_qdiscs(up.netns, up.ifname),
                                   "downlink": _safe_qdiscs(down.netns, down.ifname)}
            out["hosts"].append(entry)
        out["delay_lines"] = [
            {"name": p.name, "pid": p.pid, "alive": _same_process(p)} for p in state.processes
            if not p.name.startswith("sshd-")
        ]
        out["sshd"] = [{"name": p.name, "pid": p.pid, "alive": _same_process(p)} for p in state.processes
                       if p.name.startswith("sshd-")]
        out["cgroups"] = state.cgroups
        return out

    # ---- down ----
    def down(self) -> list[str]:
        """Remove what the record names (or, without one, this prefix's lab namespaces); idempotent."""
        hosts.require_root()
        removed: list[str] = []
        state = self.store.load(self.prefix)
        pattern = re.compile(rf"{re.escape(self.prefix)}-(lab|edge|dev\d+)\Z")
        namespaces = set(state.namespaces if state else [])
        namespaces |= {ns for ns in hosts.list_namespaces() if pattern.match(ns)}
        for recorded in state.processes if state else []:
            record = sshd.resolve(recorded)  # an sshd written down before its pid was known
            if _same_process(record):
                _terminate([record.pid])
                removed.append(f"process {record.name} ({record.pid})")
        for ns in sorted(namespaces):
            pids = hosts.pids_in_namespace(ns)
            if pids:
                _terminate(pids)
                removed.append(f"{len(pids)} process(es) in {ns}")
            if hosts.remove_namespace(ns):
                removed.append(f"netns {ns}")
        for path in state.cgroups if state else []:
            group_path = Path(path)
            if group_path.exists():
                group = CpuGroup.at(group_path)
                _terminate(group.pids())
                group.remove()
                removed.append(f"cgroup {path}")
        self.store.forget(self.prefix)
        return removed

    # ---- processes in hosts ----
    def command_in(self, host_name: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside a lab host's namespace (and its device's CPU quota)."""
        state = self.require_state()
        host = state.topology.host(host_name)
        netns_exec = ["ip", "netns", "exec", host.netns, *argv]
        if host.role != "device" or not state.cgroups:
            return netns_exec
        # Join the cgroup first: `ip netns exec` remounts /sys, hiding /sys/fs/cgroup from the command.
        cgroup = find_cpu_cgroup_root().path / self.cgroup_relative(host)
        return [sys.executable, "-m", "testbed.lab.enter", "--cgroup", str(cgroup), "--", *netns_exec]


def _safe_qdiscs(netns: str, ifname: str) -> list[dict[str, Any]]:
    try:
        return read_qdiscs(netns, ifname)
    except Exception as exc:  # status must show what it can, whatever one interface does
        return [{"error": str(exc)}]


def _same_process(record: ProcessRecord) -> bool:
    return hosts.process_start_ticks(record.pid) == record.start_ticks


def _terminate(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left; only pids the caller identified as the lab's."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(hosts.process_start_ticks(p) is not None for p in pids):
        _reap(pids)
        time.sleep(0.05)
    for pid in pids:
        if hosts.process_start_ticks(pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _reap(pids)


def _reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):  # not our child: init reaps it
            os.waitpid(pid, os.WNOHANG)


def run_in(lab: Lab, host: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a short command inside a lab host and wait for it (tests and probes)."""
    return subprocess.run(lab.command_in(host, argv), capture_output=True, text=True, **kwargs)
