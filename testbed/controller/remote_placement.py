"""`placement: {kind: inventory}` / `testbed run --inventory`: the run's edge and device agents on real hosts.

The controller runs here; the hosts come from the Ansible inventory (testbed.remote.inventory), written down once
for Ansible and for the run. Over SSH (paramiko, key only, known hosts checked; testbed.remote.ssh) the placement

* binds the device ids to inventory hosts: by name when every spec id names an inventory device host, else in
  order (spec device i on the inventory's device host i); ids and classes are then the inventory's;
* uploads the edge's weights and the devices' data shards by SFTP, each checked by sha256 on the host
  (testbed.remote.deploy); partitions travel over the control plane, hash-checked by the agent, as everywhere;
* starts the edge (`<testbed_root>/venv/bin/testbed-edge`, the Ansible `edge` role's venv) and one agent per
  device (`testbed-agent serve` from the `agent` role's venv) detached, with pid files (testbed.remote.agents),
  the edge on port 5555 and the metrics on 9102 (edge) and 9101 (agents), the roles' defaults;
* shapes a device's uplink on its `testbed_interface` with tc (testbed.remote.shaping) when its link profile
  is not `unshaped`, and again at every `link_changes` entry; the downlink is not shaped on real hosts (the edge's
  interface is shared by every device and is never shaped), so the planner's downlink is the profile's, not the
  wire's;
* stops what it started by pid file, removes the qdiscs it added and keeps the remote logs in `logs/`.

The hosts must reach the controller: it binds `testbed_controller` (inventory `all.vars`, tcp://ADDRESS:PORT)
when set, else the address of this host on the route to the edge, port chosen by the system.
"""

from __future__ import annotations

import dataclasses
import posixpath
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import yaml

from testbed.controller.runspec import DeviceSpec, LinkChange, RunSpec
from testbed.errors import TestbedError
from testbed.net.link import LinkProfile, LinkSpec

Say = Callable[[str], None]
EDGE_PORT: Final = 5555
AGENT_METRICS_PORT: Final = 9101
EDGE_METRICS_PORT: Final = 9102
EDGE_NAME, AGENT_NAME = "edge", "agent"  # pid-file names on the hosts (`testbed remote stop HOST --name ...`)


class InventoryPlacementError(TestbedError):
    """The inventory cannot carry this run."""


def bind_devices(spec: RunSpec, inventory: Any) -> RunSpec:
    """The spec with its devices renamed to inventory hosts and their classes from the inventory (pure).

    ``inventory``: a testbed.remote.inventory.Inventory. Link changes follow the renamed devices."""
    from testbed.lab.devices import load_device_class

    hosts = inventory.devices
    if len(hosts) < len(spec.devices):
        raise InventoryPlacementError(
            f"the run has {len(spec.devices)} device(s), the inventory {inventory.path} {len(hosts)} device host(s) "
            f"({', '.join(h.name for h in hosts) or 'none'}): add hosts to its `devices` group")
    by_name = {h.name: h for h in hosts}
    if all(d.id in by_name for d in spec.devices):
        chosen = [by_name[d.id] for d in spec.devices]
    else:
        chosen = list(hosts[:len(spec.devices)])
    renamed: dict[str, str] = {}
    devices: list[DeviceSpec] = []
    for dev, host in zip(spec.devices, chosen, strict=True):
        cls = load_device_class(host.device_class) if host.device_class else dev.device_class
        devices.append(dataclasses.replace(dev, id=host.name, device_class=cls))
        renamed[dev.id] = host.name
    changes = tuple(LinkChange(c.at_s, renamed[c.device], c.link) for c in spec.link_changes)
    return dataclasses.replace(spec, devices=tuple(devices), link_changes=changes)


def controller_address(inventory_path: Path, edge_address: str) -> tuple[str, str]:
    """(address, port or "*") the controller binds: `testbed_controller` from the inventory, else the local
    address on the route to the edge (a UDP connect sends nothing; it only picks the route)."""
    try:
        data = yaml.safe_load(inventory_path.read_text()) or {}
        given = (((data.get("all") or {}).get("vars")) or {}).get("testbed_controller")
    except (OSError, yaml.YAMLError, AttributeError):
        given = None
    if given:
        text = str(given)
        host, sep, port = text.removeprefix("tcp://").rpartition(":")
        if not text.startswith("tcp://") or not sep or not port.isdigit():
            raise InventoryPlacementError(f"testbed_controller {text!r} in {inventory_path} is not tcp://ADDRESS:PORT")
        return host, port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((edge_address, 9))
        except OSError as exc:
            raise InventoryPlacementError(f"no route from here to the edge at {edge_address}: {exc.strerror or exc}; "
                                          f"set testbed_controller in {inventory_path}") from None
        return str(probe.getsockname()[0]), "*"


class InventoryPlacement:
    """Edge and agents on the inventory's hosts, driven over SSH; the controller here, reachable over TCP."""

    metrics_netns: str | None = None  # Prometheus runs here, where the hosts' exporters are reachable
    remote = True

    def __init__(self, spec: RunSpec, say: Say = print, *, connect_timeout_s: float = 10.0) -> None:
        from testbed.remote.inventory import load_inventory

        assert spec.placement.inventory is not None
        self.say = say
        self.inventory = load_inventory(spec.placement.inventory)
        edge = self.inventory.edge
        if edge is None:
            raise InventoryPlacementError(f"the inventory {self.inventory.path} has no host in its `edge` group")
        self.edge = edge
        self.hosts = {d.id: self.inventory.host(d.id) for d in spec.devices}
        address, port = controller_address(self.inventory.path, edge.address)
        self.controller_address = address
        self.controller_bind = f"tcp://{address}:{port}"
        self.edge_bind = f"tcp://{edge.address}:{EDGE_PORT}"
        self.description = f"inventory {self.inventory.path} (edge {edge.name}; controller {address})"
        self.timeout_s = connect_timeout_s
        self._conns: dict[str, Any] = {}
        self._started: list[tuple[str, str]] = []  # (host, process name), in start order
        self._shaped: dict[str, str] = {}  # host -> interface with our qdisc
        self._netem: dict[str, bool] = {}
        self.logs_dir: Path | None = None
        try:
            for name in [edge.name, *(h.name for h in self.hosts.values())]:
                self._conn(name)  # every host reachable, keys trusted, before anything starts
            for dev in spec.devices:
                if dev.link.spec != LinkSpec.unlimited():
                    self.set_link(dev.id, dev.link)
        except BaseException:
            self.close()
            raise

    # ---- hosts ----
    def _conn(self, name: str) -> Any:
        from testbed.remote.ssh import connect

        if name not in self._conns:
            host = self.inventory.host(name)
            self._conns[name] = connect(host, self.inventory.known_hosts, timeout_s=self.timeout_s)
        return self._conns[name]

    def host_of(self, device: str) -> str:
        return device

    def metrics_bind(self, host: str) -> str:
        return self.controller_address if host == "controller" else self.inventory.host(host).address

    def agent_args(self, device: DeviceSpec) -> list[str]:
        return []  # a real device runs at its own speed

    def stage(self, device: str, path: Path) -> str:
        """Upload a device's data file (sha256 checked on the host); the path the agent reads it from."""
        from testbed.remote.deploy import deploy_files

        host = self.hosts[device]
        (done,) = deploy_files(self._conn(device), [path], posixpath.join(host.root, "work", "data"))
        return done.remote_path

    # ---- processes ----
    def launch(self, controller: str, weights: Path, *, device: str, threads: int, heartbeat_s: float,
               probe_interval_s: float, metrics: bool, classes: dict[str, str]) -> tuple[str, str | None]:
        """Upload the weights, start the edge and every agent; (edge endpoint, edge metrics URL or None)."""
        from testbed.remote import agents
        from testbed.remote.deploy import deploy_files

        edge, conn = self.edge, self._conn(self.edge.name)
        exe = posixpath.join(edge.root, "venv", "bin", "testbed-edge")
        if conn.run(["test", "-x", exe], check=False).returncode != 0:
            raise InventoryPlacementError(f"{edge.name}: no {exe}: provision the edge first (ansible-playbook -i "
                                          f"{self.inventory.path} ansible/edge.yml)")
        (remote_weights,) = deploy_files(conn, [weights], posixpath.join(edge.root, "work"))
        self.say(f"{edge.name}: weights {remote_weights.remote_path} (sha256 {remote_weights.sha256[:16]}, verified)")
        argv = [exe, "--weights", remote_weights.remote_path, "--bind", self.edge_bind, "--device", device,
                "--threads", str(threads), "--controller", controller, "--heartbeat-s", str(heartbeat_s)]
        metrics_url = None
        if metrics:
            argv += ["--metrics-port", str(EDGE_METRICS_PORT), "--metrics-bind", edge.address]
            metrics_url = f"http://{edge.address}:{EDGE_METRICS_PORT}/metrics"
        self._start(edge.name, EDGE_NAME, argv, posixpath.join(edge.root, "work"))
        for device_id, host in self.hosts.items():
            argv = agents.agent_argv(host.root, controller, device_id, classes.get(device_id) or None,
                                     metrics_port=AGENT_METRICS_PORT if metrics else None,
                                     metrics_bind=host.address if metrics else None, heartbeat_s=heartbeat_s)
            self._start(device_id, AGENT_NAME, [*argv, "--probe-interval-s", str(probe_interval_s)])
        return self.edge_bind, metrics_url

    def _start(self, host: str, name: str, argv: list[str], work_dir: str | None = None) -> None:
        from testbed.remote import agents

        pid = agents.start(self._conn(host), self.inventory.host(host).root, name, argv, work_dir)
        self._started.append((host, name))
        self.say(f"{host}: {name} started over SSH, pid {pid}")

    # ---- links ----
    def set_link(self, device: str, link: LinkProfile) -> None:
        from testbed.remote import facts, shaping

        host = self.hosts.get(device)
        if host is None:
            raise InventoryPlacementError(f"unknown device {device!r}")
        if not host.interface:
            raise InventoryPlacementError(f"{device}: no testbed_interface in {self.inventory.path}, so its link "
                                          f"cannot be shaped to {link.name}")
        conn = self._conn(device)
        if device not in self._netem:
            self._netem[device] = facts.gather(conn).netem
        plan = shaping.plan_commands(host.interface, link.spec.uplink, netem=self._netem[device])
        shaping.apply(conn, plan)
        self._shaped[device] = host.interface
        note = f"; {plan.dropped}" if plan.dropped else ""
        self.say(f"{device}: uplink on {host.interface} shaped to {link.name} (downlink not shaped on real hosts)"
                 f"{note}")

    # ---- the end ----
    def close(self) -> None:
        """Stop what this run started (by pid file), keep the remote logs, remove its qdiscs, hang up."""
        from testbed.remote import agents
        from testbed.remote.errors import RemoteError

        problems = []
        for host, name in reversed(self._started):
            try:
                conn, root = self._conn(host), self.inventory.host(host).root
                agents.stop(conn, root, name, grace_s=10)
                if self.logs_dir is not None:  # after the stop: the log ends with how the process ended
                    self.logs_dir.mkdir(parents=True, exist_ok=True)
                    (self.logs_dir / f"{host}-{name}.log").write_text(agents.logs(conn, root, name, lines=500))
            except (RemoteError, OSError) as exc:
                problems.append(f"{host}: {name}: {exc}")
        self._started = []
        for device, ifname in list(self._shaped.items()):
            try:
                self._conn(device).run(["tc", "qdisc", "del", "dev", ifname, "root"], sudo=True, check=False)
            except RemoteError as exc:
                problems.append(f"{device}: removing the qdisc on {ifname}: {exc}")
        self._shaped = {}
        for conn in self._conns.values():
            conn.close()
        self._conns = {}
        for line in problems:
            self.say(f"cleanup: {line} (check with `testbed remote logs/stop -i {self.inventory.path}`)")
