"""Where a run's processes go: on this host over loopback, or in the emulated lab's namespaces over shaped links.

(Real hosts of an inventory: testbed.controller.remote_placement.) A placement says where the controller and
the edge bind, how to wrap a process's argv for its host, which extra arguments a device agent takes (its class's
compute slowdown in the lab), and how to change a device's link.
The lab placement brings a lab up when none is running (and takes it down at the end only then), gives every
device the link its spec names, and restores the links it changed on a lab it did not create.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from testbed.controller.runspec import DeviceSpec, RunSpec
from testbed.errors import TestbedError
from testbed.net.link import LinkProfile, LinkSpec

Say = Callable[[str], None]
_IPC_MAX = 100  # a Unix socket path is at most 107 bytes


class PlacementError(TestbedError):
    """The run cannot be placed as its spec asks."""


class LoopbackPlacement:
    """Every process on this host; no shaping (a link change is refused by the spec already)."""

    description = "loopback"
    controller_bind = "tcp://127.0.0.1:*"
    edge_bind = "tcp://127.0.0.1:*"
    metrics_netns: str | None = None  # where Prometheus and the controller's exporter run (None: here)

    def __init__(self, metrics_bind: str = "127.0.0.1") -> None:
        self._metrics_bind = metrics_bind

    def metrics_bind(self, host: str) -> str:
        """The address a process on `host` serves its metrics on (reachable from metrics_netns)."""
        return self._metrics_bind

    def stage(self, device: str, path: Path) -> str:
        """The path a device agent reads a file of this host from (here: the same)."""
        return str(path)

    def wrap(self, host: str, argv: list[str]) -> list[str]:
        return argv

    def host_of(self, device: str) -> str:
        return device

    def agent_args(self, device: DeviceSpec) -> list[str]:
        return []

    def set_link(self, device: str, link: LinkProfile) -> None:
        raise PlacementError("loopback has no shaped links to change")

    def close(self) -> None:
        pass


class LabPlacement:
    """The edge in `<prefix>-edge`, spec device i in lab host `dev{i+1}`; the control plane over a Unix socket
    (namespaces share the file system, not the network), so it is never shaped."""

    def __init__(self, spec: RunSpec, state_dir: Path | None, say: Say = print) -> None:
        from testbed.lab.lab import Lab
        from testbed.lab.state import StateStore

        self.lab = Lab(StateStore(state_dir) if state_dir else StateStore(), spec.placement.lab_prefix)
        self.created = False
        self._restore: dict[str, LinkSpec] = {}
        self._ipc_dir: Path | None = None
        state = self.lab.store.load(self.lab.prefix)
        devices = spec.devices
        if state is None:
            first = devices[0].link
            say(f"bringing up lab {self.lab.prefix} with {len(devices)} device(s), link {first.name}")
            self.lab.up(len(devices), first.name, first.spec)
            self.created = True
            state = self.lab.require_state()
        topo = state.topology
        if len(topo.devices) < len(devices):
            raise PlacementError(f"lab {topo.prefix} has {len(topo.devices)} device host(s), the run needs "
                                 f"{len(devices)}: `testbed lab down --prefix {topo.prefix}` and bring one up "
                                 f"with --devices {len(devices)} (or let `testbed run` do it)")
        self.topology = topo
        self._hosts = {d.id: topo.devices[i].name for i, d in enumerate(devices)}
        self.edge_bind = f"tcp://{topo.edge.address}:*"
        self.description = f"lab {topo.prefix} ({topo.backend})"
        self._ipc_dir = Path(tempfile.mkdtemp(prefix=f"{topo.prefix}-ctl-", dir="/tmp"))
        self.controller_bind = f"ipc://{self._ipc_dir / 'control.sock'}"
        if len(self.controller_bind) > _IPC_MAX:
            raise PlacementError(f"control socket path {self.controller_bind} is too long")
        try:
            for dev in devices:
                if self.lab.link_of(state, topo.host(self._hosts[dev.id])) != dev.link.spec:
                    self.set_link(dev.id, dev.link)
        except BaseException:
            self.close()
            raise

    def host_of(self, device: str) -> str:
        return self._hosts[device]

    def wrap(self, host: str, argv: list[str]) -> list[str]:
        return self.lab.command_in(host, argv)

    @property
    def metrics_netns(self) -> str:
        """The switch namespace routes to every host: Prometheus and the controller's exporter go there."""
        return self.topology.switch_ns

    def metrics_bind(self, host: str) -> str:
        return "127.0.0.1" if host == "controller" else self.topology.host(host).address

    def stage(self, device: str, path: Path) -> str:
        return str(path)  # lab hosts share this machine's file system

    def agent_args(self, device: DeviceSpec) -> list[str]:
        """A device class slows the agent's head and tail to the class's speed (as `testbed demo --lab`)."""
        if device.device_class is None:
            return []
        from testbed.lab.devices import host_speed_vs_pi4, slowdown

        return ["--slowdown", f"{max(1.0, slowdown(device.device_class, host_speed_vs_pi4())):.4f}"]

    def set_link(self, device: str, link: LinkProfile) -> None:
        if device not in self._hosts:
            raise PlacementError(f"unknown device {device!r}")
        if not self.created and device not in self._restore:  # put a borrowed lab back as it was
            state = self.lab.require_state()
            self._restore[device] = self.lab.link_of(state, state.topology.host(self._hosts[device]))
        self.lab.set_link(self._hosts[device], link.spec.uplink, link.spec.downlink)

    def close(self) -> None:
        """Restore links of a lab this run did not create; take down one it did; remove the socket dir."""
        try:
            if self.created:
                self.lab.down()
            else:
                for device, spec in self._restore.items():
                    self.lab.set_link(self._hosts[device], spec.uplink, spec.downlink)
        finally:
            self._restore = {}
            self.created = False
            if self._ipc_dir is not None:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)
                self._ipc_dir = None


if TYPE_CHECKING:
    from testbed.controller.remote_placement import InventoryPlacement

Placement = Union[LoopbackPlacement, LabPlacement, "InventoryPlacement"]


def placement_for(spec: RunSpec, state_dir: Path | None = None, say: Say = print) -> Placement:
    kind = spec.placement.kind
    if kind == "loopback":
        return LoopbackPlacement(spec.metrics.bind)
    if kind == "lab":
        return LabPlacement(spec, state_dir, say)
    from testbed.controller.remote_placement import InventoryPlacement

    return InventoryPlacement(spec, say)


def hosts_of(placement: Placement, devices: Sequence[DeviceSpec]) -> dict[str, str]:
    return {d.id: placement.host_of(d.id) for d in devices}
