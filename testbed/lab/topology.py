"""Describe the lab first (pure): names, addresses, which interface shapes which direction.

Everything the lab creates carries the prefix (default `tb`), so `lab down` can remove exactly that:
  <prefix>-lab    the switch: a bridge `br0` (router address .254, proxy ARP), one port per host
  <prefix>-edge   the edge server, address .1, interface eth0 on the bridge
  <prefix>-devN   device N, address .(10+N); on the bridge by a veth (netem backend) or behind a
                  userspace delay line on a TUN pair (delay-line backend, for kernels without netem)
Uplink (device → edge) is shaped where it leaves the device's namespace; downlink where it leaves
the switch towards the device. The edge's own interface is never shaped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from testbed.errors import TestbedError

Backend = Literal["netem", "delay-line"]
DEFAULT_PREFIX = "tb"
DEFAULT_SUBNET = "10.254.77.0/24"
MAX_DEVICES = 200
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}\Z")


class LabError(TestbedError):
    """The lab cannot be built, changed or removed as asked."""


@dataclass(frozen=True)
class LabHost:
    name: str  # "edge", "dev1", ...
    netns: str  # "tb-edge", "tb-dev1", ...
    address: str
    role: Literal["edge", "device"]
    device_class: str | None = None

    @property
    def index(self) -> int:
        return int(self.name[3:]) if self.role == "device" else 0


@dataclass(frozen=True)
class ShapedPort:
    """Where one direction of one device's link is shaped."""

    netns: str
    ifname: str


@dataclass(frozen=True)
class Topology:
    prefix: str
    subnet: str
    backend: Backend
    link_profile: str
    hosts: tuple[LabHost, ...]

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-lab"

    @property
    def router_address(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[254])

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def edge(self) -> LabHost:
        return next(h for h in self.hosts if h.role == "edge")

    @property
    def devices(self) -> tuple[LabHost, ...]:
        return tuple(h for h in self.hosts if h.role == "device")

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name or h.netns == name:
                return h
        raise LabError(f"no lab host {name!r}; hosts: {', '.join(h.name for h in self.hosts)}")

    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(h.netns for h in self.hosts)]

    def switch_port(self, host: LabHost) -> str:
        """The bridge-side veth of a host, or the switch-side TUN of a delay-line device."""
        if host.role == "device" and self.backend == "delay-line":
            return f"{host.name}-dl"
        return f"{host.name}-p"

    def uplink_port(self, host: LabHost) -> ShapedPort:
        return ShapedPort(host.netns, "tun0" if self.backend == "delay-line" else "eth0")

    def downlink_port(self, host: LabHost) -> ShapedPort:
        return ShapedPort(self.switch_ns, self.switch_port(host))


def build_topology(
    devices: int,
    link_profile: str,
    backend: Backend,
    device_class: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    subnet: str = DEFAULT_SUBNET,
) -> Topology:
    if not 1 <= devices <= MAX_DEVICES:
        raise LabError(f"--devices must be between 1 and {MAX_DEVICES}, got {devices}")
    if _PREFIX_RE.match(prefix) is None:
        raise LabError(f"lab prefix {prefix!r} must be 1-6 lowercase letters or digits, starting with a letter")
    net = ipaddress.ip_network(subnet)
    if net.version != 4 or net.prefixlen != 24 or not net.is_private:
        raise LabError(f"lab subnet {subnet} must be a private IPv4 /24")
    hosts = [LabHost("edge", f"{prefix}-edge", str(net[1]), "edge")]
    hosts += [
        LabHost(f"dev{i}", f"{prefix}-dev{i}", str(net[10 + i]), "device", device_class)
        for i in range(1, devices + 1)
    ]
    return Topology(prefix, str(net), backend, link_profile, tuple(hosts))
