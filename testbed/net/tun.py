"""TUN devices inside network namespaces: open them, give them an MTU, an address and routes (pyroute2).

This module holds the side effects of the userspace delay line (`testbed.net.delayline`).

- A TUN device is created in the network namespace of the task that opens `/dev/net/tun`, so each one is opened
  while the calling *thread* is inside its namespace (`in_netns`, a per-thread `setns(2)` that always returns to
  where it came from: Python 3.11 has no `os.setns`, and pyroute2's `pushns` saves `/proc/self/ns/net`, which is
  the main thread's namespace, not necessarily the caller's).
- The devices are not persistent (no `IFF_PERSIST`): the kernel removes a device, and its addresses and routes,
  when the last file descriptor on it closes — also when the process is killed with SIGKILL.
- Netlink sockets stay bound to the namespace they were created in, so the configuration runs inside the same
  `in_netns` block.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import struct
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
VNET_HDR_LEN = 10  # struct virtio_net_hdr, the kernel's default vnet header size

IFNAMSIZ = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A namespace could not be entered or left."""


def check_ifname(name: str) -> str:
    if not _NAME_RE.match(name) or len(name) >= IFNAMSIZ or name in (".", ".."):
        raise ValueError(f"bad interface name {name!r} (letters, digits, _ . -; at most {IFNAMSIZ - 1} characters)")
    return name


def check_netns_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"bad network namespace name {name!r}")
    return name


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside the named network namespace (`ip netns` name; None: stay).

    Affects only the calling thread; returns to the original namespace even when the body raises.
    """
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, check_netns_name(name))
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NetnsError(errno.ENOENT, f"no network namespace {name!r} ({path})") from exc
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)  # if this fails the thread is in the wrong namespace: let it propagate
    finally:
        os.close(original)


def open_tun(ifname: str, *, vnet_hdr: bool = False) -> int:
    """Create a non-persistent layer-3 TUN device in the calling thread's namespace; return its non-blocking fd.

    Packets read and written are bare IP packets (`IFF_NO_PI`). With `vnet_hdr`, each one is preceded by a
    10-byte virtio-net header and the device takes checksum and TSO offloads, so TCP can hand over 64 KiB segments.
    """
    check_ifname(ifname)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        try:
            got = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise OSError(exc.errno, f"TUN {ifname!r} exists and is in use (another delay line?)") from exc
            if exc.errno == errno.EINVAL:
                raise OSError(exc.errno, f"cannot create TUN {ifname!r}: a non-TUN device has that name?") from exc
            raise
        actual = got[:IFNAMSIZ].rstrip(b"\0").decode()
        if actual != ifname:
            raise OSError(errno.EEXIST, f"asked for TUN {ifname!r}, got {actual!r}")
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _disable_ipv6(ifname: str) -> None:
    """Keep IPv6 router solicitations and MLD reports off the delay line (and out of its packet counts)."""
    with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
        f.write("1")


def configure_tun(
    ifname: str,
    mtu: int,
    *,
    address: str | None = None,
    routes: Sequence[str] = (),
    default_route: bool = False,
    loopback_up: bool = False,
) -> None:
    """In the calling thread's namespace: set the MTU, add `address`/32, bring the link up, add routes via it.

    `routes` are destinations ("10.0.0.5/32"); `default_route` adds "default dev IFNAME".
    """
    from pyroute2 import IPRoute, NetlinkError  # imported here: the pure scheduling core must not need pyroute2

    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise OSError(errno.ENODEV, f"no interface {ifname!r} in this namespace")
            index = found[0]
            if loopback_up:
                lo = ipr.link_lookup(ifname="lo")
                if lo:
                    ipr.link("set", index=lo[0], state="up")
            ipr.link("set", index=index, mtu=mtu)
            if address is not None:
                ipr.addr("add", index=index, address=address, prefixlen=32)
            ipr.link("set", index=index, state="up")
            for dst in routes:
                ipr.route("replace", dst=dst, oif=index)
            if default_route:
                ipr.route("replace", dst="0.0.0.0/0", oif=index)
    except NetlinkError as exc:  # not an OSError: give callers one exception type, with the errno kept
        raise OSError(exc.code, f"configuring {ifname!r}: {os.strerror(exc.code)}") from exc


def create_tun(
    netns: str | None,
    ifname: str,
    mtu: int,
    *,
    address: str | None = None,
    routes: Sequence[str] = (),
    default_route: bool = False,
    loopback_up: bool = False,
    vnet_hdr: bool = False,
) -> int:
    """Open and configure a TUN inside `netns`; return its fd. Closing the fd removes the device and its routes."""
    with in_netns(netns):
        fd = open_tun(ifname, vnet_hdr=vnet_hdr)
        try:
            _disable_ipv6(ifname)
            configure_tun(
                ifname, mtu, address=address, routes=routes, default_route=default_route, loopback_up=loopback_up
            )
        except BaseException:
            os.close(fd)
            raise
    return fd


def link_exists(netns: str | None, ifname: str) -> bool:
    """Whether an interface of that name exists in `netns` (for checks after a delay line stops)."""
    from pyroute2 import IPRoute

    with in_netns(netns), IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))
