"""The Ansible YAML inventory, read into frozen descriptions: hosts are written down once, for Ansible and for us.

Groups that give a host its role: `devices` (split-inference devices: Pis, Jetsons), `edge` (the GPU server),
`monitoring` (Prometheus and Grafana). Groups may nest (`devices: children: {pis: ..., jetsons: ...}`); a host's
variables are `all.vars`, then its groups' vars from the outside in, then its own. The variables read here:

  ansible_host, ansible_user, ansible_port, ansible_ssh_private_key_file, ansible_python_interpreter
  testbed_device_class   the device class (profiles/devices/NAME.yaml)
  testbed_interface      the interface that carries the device's link (shaping applies there)
  testbed_root           where the testbed lives on the host (venv, partitions, agents' pid files and logs)
  testbed_known_hosts    (all.vars) the known_hosts file for these hosts
  testbed_netns          (lab only) the network namespace to dial the host from
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.remote.errors import InventoryError

ROLE_GROUPS = {"devices": "device", "edge": "edge", "monitoring": "monitoring"}
DEFAULT_ROOT = "/opt/testbed"
DEFAULT_KNOWN_HOSTS = Path("~/.config/testbed/known_hosts")
MAX_GROUP_DEPTH = 16


@dataclass(frozen=True)
class RemoteHost:
    name: str
    address: str
    user: str
    port: int = 22
    key_path: Path | None = None
    roles: tuple[str, ...] = ()
    device_class: str | None = None
    interface: str | None = None
    python: str = "/usr/bin/python3"
    root: str = DEFAULT_ROOT
    netns: str | None = None

    @property
    def role(self) -> str:
        """The main role: device, edge, monitoring (in that order), or "" for a host in no role group."""
        return self.roles[0] if self.roles else ""

    @property
    def needs_sudo(self) -> bool:
        return self.user != "root"

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH (and paramiko) file this host's key under."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class Inventory:
    path: Path
    hosts: tuple[RemoteHost, ...]
    known_hosts: Path

    def host(self, name: str) -> RemoteHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InventoryError(f"no host {name!r} in {self.path}; hosts: {', '.join(h.name for h in self.hosts)}")

    def with_role(self, role: str) -> tuple[RemoteHost, ...]:
        return tuple(h for h in self.hosts if role in h.roles)

    @property
    def devices(self) -> tuple[RemoteHost, ...]:
        return self.with_role("device")

    @property
    def edge(self) -> RemoteHost | None:
        found = self.with_role("edge")
        return found[0] if found else None

    def select(self, pattern: str) -> tuple[RemoteHost, ...]:
        """A host name, a role group name (devices, edge, monitoring) or `all`."""
        if pattern == "all":
            return self.hosts
        if pattern in ROLE_GROUPS:
            return self.with_role(ROLE_GROUPS[pattern])
        return (self.host(pattern),)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InventoryError(f"{where} must be a mapping, not {type(value).__name__}")
    return value


def _walk(name: str, group: Mapping[str, Any], inherited: dict[str, Any], roles: tuple[str, ...], depth: int,
          where: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...], int]]:
    """(host, its group vars, its own vars, roles, depth) for every host entry under this group."""
    if depth > MAX_GROUP_DEPTH:
        raise InventoryError(f"{where}: groups nest deeper than {MAX_GROUP_DEPTH}")
    unknown = set(group) - {"hosts", "vars", "children"}
    if unknown:
        raise InventoryError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (hosts, vars, children)")
    merged = {**inherited, **_mapping(group.get("vars"), f"{where}.vars")}
    if name in ROLE_GROUPS:
        roles = (*roles, ROLE_GROUPS[name])
    for host, host_vars in _mapping(group.get("hosts"), f"{where}.hosts").items():
        yield str(host), merged, dict(_mapping(host_vars, f"{where}.hosts.{host}")), roles, depth
    for child, sub in _mapping(group.get("children"), f"{where}.children").items():
        yield from _walk(str(child), _mapping(sub, f"{where}.children.{child}"), merged, roles, depth + 1,
                         f"{where}.children.{child}")


def _text(value: Any, key: str, host: str) -> str:
    text = str(value)
    if "{{" in text or "{%" in text:
        raise InventoryError(f"host {host}: {key} is a Jinja template ({text!r}); testbed needs a plain value")
    return text


def _host(name: str, hv: Mapping[str, Any], roles: tuple[str, ...], base: Path) -> RemoteHost:
    def get(key: str) -> str | None:
        return _text(hv[key], key, name) if hv.get(key) is not None else None

    key = get("ansible_ssh_private_key_file")
    key_path = None
    if key:
        key_path = Path(os.path.expanduser(key))
        key_path = key_path if key_path.is_absolute() else base / key_path
    port_text = get("ansible_port") or "22"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InventoryError(f"host {name}: ansible_port {port_text!r} is not a port number")
    order = [r for r in ("device", "edge", "monitoring") if r in roles]
    return RemoteHost(
        name=name, address=get("ansible_host") or name, user=get("ansible_user") or os.environ.get("USER", "root"),
        port=int(port_text), key_path=key_path, roles=tuple(order), device_class=get("testbed_device_class"),
        interface=get("testbed_interface"), python=get("ansible_python_interpreter") or "/usr/bin/python3",
        root=get("testbed_root") or DEFAULT_ROOT, netns=get("testbed_netns"),
    )


def parse_inventory(data: Any, path: Path) -> Inventory:
    """The inventory from its parsed YAML (pure: no files read but the path's folder for relative keys)."""
    top = _mapping(data, str(path))
    if set(top) != {"all"}:
        raise InventoryError(f"{path}: a YAML inventory has one top-level group, `all`")
    entries: dict[str, list[tuple[int, dict[str, Any], dict[str, Any], tuple[str, ...]]]] = {}
    for name, group_vars, own, roles, depth in _walk("all", _mapping(top["all"], "all"), {}, (), 0, "all"):
        entries.setdefault(name, []).append((depth, group_vars, own, roles))
    merged: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for name, found in entries.items():  # as Ansible: deeper groups' vars win over shallower, host vars over all
        host_vars: dict[str, Any] = {}
        for _, group_vars, _, _ in sorted(found, key=lambda e: e[0]):
            host_vars.update(group_vars)
        for _, _, own, _ in found:
            host_vars.update(own)
        merged[name] = (host_vars, {r for e in found for r in e[3]})
    if not merged:
        raise InventoryError(f"{path}: no hosts")
    all_vars = _mapping(_mapping(top["all"], "all").get("vars"), "all.vars")
    known = Path(os.path.expanduser(str(all_vars.get("testbed_known_hosts") or DEFAULT_KNOWN_HOSTS)))
    hosts = tuple(_host(n, hv, tuple(r), path.parent) for n, (hv, r) in merged.items())
    return Inventory(path, hosts, known if known.is_absolute() else path.parent / known)


def load_inventory(path: Path) -> Inventory:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"inventory {path} not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryError(f"inventory {path} is unreadable: {exc}") from exc
    return parse_inventory(data, path)


def lab_inventory(topology: Any, client_key: Path, known_hosts: Path, run_dir: Path,
                  python: str = "/usr/bin/python3") -> dict[str, Any]:
    """The Ansible inventory of an emulated lab (pure; `topology` is a testbed.lab.topology.Topology).

    Lab hosts are namespaces sharing this machine's file system, so each gets its own testbed_root under the
    lab's run directory, no packages and no systemd (the agent is started with `testbed remote start`)."""
    def host_vars(host: Any) -> dict[str, Any]:
        iface = "tun0" if host.role == "device" and topology.backend == "delay-line" else "eth0"
        out: dict[str, Any] = {"ansible_host": host.address, "testbed_interface": iface,
                               "testbed_root": str(run_dir / "hosts" / host.name)}
        if host.device_class:
            out["testbed_device_class"] = host.device_class
        return out

    return {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_port": 22,
            "ansible_ssh_private_key_file": str(client_key),
            "ansible_python_interpreter": python,
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes",
            "testbed_known_hosts": str(known_hosts),
            "testbed_netns": topology.switch_ns,
            "testbed_python": python,
            "testbed_service_manager": "none",
            "testbed_manage_packages": False,
            "testbed_service_user": "root",
            "testbed_create_user": False,
        },
        "children": {
            "devices": {"hosts": {h.name: host_vars(h) for h in topology.devices}},
            "edge": {"hosts": {topology.edge.name: host_vars(topology.edge)}},
        },
    }}


def dump_inventory(data: Mapping[str, Any]) -> str:
    return "# Generated by `testbed lab up --ssh`; run Ansible from the lab's switch namespace (see docs/lab.md).\n" + \
        yaml.safe_dump(dict(data), sort_keys=False)
