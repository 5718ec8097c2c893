"""Thin shell over netlink (pyroute2): namespaces, veth pairs, the bridge, addresses, routes, sysctls."""

from __future__ import annotations

import os
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, netns

from testbed.lab.topology import LabError, LabHost, Topology

NETNS_DIR = Path("/var/run/netns")


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the emulated lab needs root (network namespaces, qdiscs, cgroups): run it with sudo")


def list_namespaces() -> list[str]:
    return sorted(netns.listnetns())


def create_namespace(name: str) -> None:
    if name in netns.listnetns():
        raise LabError(f"network namespace {name} already exists: run `testbed lab down` first")
    netns.create(name)
    with IPRoute(netns=name, flags=0) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def remove_namespace(name: str) -> bool:
    if name not in netns.listnetns():
        return False
    netns.remove(name)
    return True


def write_sysctl(namespace: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (net.*) from inside the namespace."""
    path = Path("/proc/sys") / key.replace(".", "/")
    netns.pushns(namespace)
    try:
        path.write_text(value)
    finally:
        netns.popns()


def _index(ip: IPRoute, ifname: str, where: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found in {where}")
    return int(found[0])


def build_switch(topo: Topology) -> None:
    """The switch namespace: bridge br0 with the router address; forwards and answers ARP by proxy."""
    ns = topo.switch_ns
    with IPRoute(netns=ns, flags=0) as ip:
        ip.link("add", ifname="br0", kind="bridge")
        br = _index(ip, "br0", ns)
        ip.addr("add", index=br, address=topo.router_address, prefixlen=topo.prefixlen)
        ip.link("set", index=br, state="up")
    write_sysctl(ns, "net.ipv4.ip_forward", "1")
    # Delay-line devices sit behind TUN devices, not on the bridge: the switch answers ARP for them.
    write_sysctl(ns, "net.ipv4.conf.br0.proxy_arp", "1")


def attach_by_veth(topo: Topology, host: LabHost, mtu: int = 1500) -> None:
    """eth0 in the host's namespace, its peer on the bridge; address and default route via the switch.

    ``mtu`` is both ends' (the bridge follows its ports): the edge's veth gets the delay lines' TUN MTU, so its
    TCP segments to a device are as large as the device's link carries (docs/delayline.md).
    """
    if not 576 <= mtu <= 65535:
        raise LabError(f"veth MTU {mtu} out of range [576, 65535]")
    port = topo.switch_port(host)
    try:
        with IPRoute(netns=host.netns, flags=0) as ip:
            ip.link("add", ifname="eth0", kind="veth", mtu=mtu,
                    peer={"ifname": port, "net_ns_fd": topo.switch_ns, "mtu": mtu})
            eth0 = _index(ip, "eth0", host.netns)
            ip.addr("add", index=eth0, address=host.address, prefixlen=topo.prefixlen)
            ip.link("set", index=eth0, state="up")
            ip.route("add", dst="default", gateway=topo.router_address)
        with IPRoute(netns=topo.switch_ns, flags=0) as ip:
            ip.link("set", index=_index(ip, port, topo.switch_ns), master=_index(ip, "br0", topo.switch_ns),
                    state="up")
    except NetlinkError as exc:
        raise LabError(f"cannot cable {host.name} to the switch: {exc}") from exc


def namespace_inode(name: str) -> int | None:
    try:
        return (NETNS_DIR / name).stat().st_ino
    except FileNotFoundError:
        return None


def pids_in_namespace(name: str) -> list[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` does)."""
    inode = namespace_inode(name)
    if inode is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "ns" / "net").stat().st_ino == inode:
                pids.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return sorted(pids)


def process_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, field 22 of /proc/PID/stat), None when it is gone.

    A process that exits between the open and the read makes the read fail with ESRCH (ProcessLookupError)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return ""


def addresses(namespace: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with IPRoute(netns=namespace, flags=0) as ip:  # flags=0: never create a missing namespace
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        for addr in ip.get_addr(family=2):
            out.setdefault(names.get(addr["index"], "?"), []).append(
                f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
    return out
