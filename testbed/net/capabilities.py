"""What this host can shape with, found by trying it, and which backend serves each link feature.

:func:`probe` works in a scratch namespace ``<prefix>-<pid>`` with a veth pair inside it, so it never
touches a real interface, and always removes the namespace. It tries each qdisc the way the testbed
uses it and reads the result back: a capability is available only when the kernel holds what was asked.
:func:`backend_for` is the pure decision on top: rate -> htb; delay, jitter, loss -> netem where the
kernel has it, else the userspace delay line (TUN), else nothing.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from testbed.net import tc
from testbed.net.link import DirectionSpec, LinkError
from testbed.net.tcplan import TC_H_ROOT, make_handle, plan_direction
from testbed.net.units import format_rate

__all__ = [
    "FEATURES",
    "HTB_PROBE_RATES_BPS",
    "Capability",
    "backend_for",
    "format_capabilities",
    "highest_rate_verified",
    "probe",
]

#: The link features a backend must serve.
FEATURES: Final[tuple[str, ...]] = ("rate", "delay", "jitter", "loss")
#: HTB rates tried in order; the ones above 2**32-1 bytes/s (~34.4 Gbit/s) need TCA_HTB_RATE64.
HTB_PROBE_RATES_BPS: Final[tuple[int, ...]] = (
    100_000_000, 10_000_000_000, 40_000_000_000, 100_000_000_000, 1_000_000_000_000,
)
#: TBF rates tried: one plain, one above the 32-bit bytes/s field.
TBF_PROBE_RATES_BPS: Final[tuple[int, ...]] = (100_000_000, 10_000_000_000, 40_000_000_000)
_RATE32_LIMIT_BPS: Final[int] = (2**32 - 1) * 8
_VETH: Final[str] = "probe0"
_VETH_PEER: Final[str] = "probe1"
_IFB: Final[str] = "probe-ifb"
_KERNEL_CAPS: Final[tuple[str, ...]] = ("htb", "htb-rate64", "tbf", "netem", "fq", "ingress", "ifb")


@dataclass(frozen=True)
class Capability:
    """One probed capability (htb, netem, tun, ...) or one link feature (rate, delay, ...) and its backend.

    ``value`` carries a number where one was measured: for "htb-rate64", the highest rate (bit/s)
    that was set and read back exactly.
    """

    name: str
    available: bool
    backend: str
    reason: str
    value: int | None = None


def _why(exc: BaseException) -> str:
    """"ENOENT (No such file or directory)" for kernel errors, else the exception's text."""
    cause = exc.__cause__ if isinstance(exc, LinkError) and exc.__cause__ is not None else exc
    if isinstance(cause, NetlinkError):
        code = abs(int(cause.code))
        return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"
    if isinstance(cause, OSError) and cause.errno:
        return f"{errno.errorcode.get(cause.errno, str(cause.errno))} ({cause.strerror})"
    if isinstance(cause, struct.error):
        return f"pyroute2 cannot encode it ({cause})"
    return f"{type(cause).__name__}: {cause}"


def _probe_htb(ns: str) -> list[Capability]:
    verified: list[int] = []
    failure = ""
    for rate in HTB_PROBE_RATES_BPS:
        try:
            tc.apply_plan(ns, _VETH, plan_direction(DirectionSpec(rate_bps=rate), netem=False))
            classes = [e for e in tc.read_qdiscs(ns, _VETH) if e["kind"] == "htb-class"]
        except LinkError as exc:
            failure = f"{format_rate(rate)} failed: {_why(exc)}"
            break
        got = classes[0]["rate_bps"] if classes else None
        if got != rate:
            failure = f"{format_rate(rate)} read back as {got}"
            break
        verified.append(rate)
    tc.clear(ns, _VETH)
    if not verified:
        return [
            Capability("htb", False, "htb", f"htb {failure}"),
            Capability("htb-rate64", False, "htb", "htb unavailable"),
        ]
    top = verified[-1]
    above = [r for r in verified if r > _RATE32_LIMIT_BPS]
    tail = f"; {failure}" if failure else ""
    return [
        Capability("htb", True, "htb", f"htb root + class at {format_rate(verified[0])} set and read back"),
        Capability(
            "htb-rate64",
            bool(above),
            "htb",
            (f"rates above {format_rate(_RATE32_LIMIT_BPS)} via TCA_HTB_RATE64 read back exactly up to "
             f"{format_rate(top)}{tail}") if above else f"highest rate read back {format_rate(top)}{tail}",
            value=top,
        ),
    ]


def _probe_tbf(ipr: IPRoute, index: int) -> Capability:
    verified: list[int] = []
    failure = ""
    for rate in TBF_PROBE_RATES_BPS:
        try:
            ipr.tc("replace", "tbf", index, make_handle(1), parent=TC_H_ROOT, rate=rate // 8,
                   burst=max(3000, rate // 8 // 10_000), latency="50ms")
            got = [m for m in ipr.get_qdiscs(index=index) if m.get_attr("TCA_KIND") == "tbf"]
        except (NetlinkError, OSError, struct.error) as exc:
            failure = f"{format_rate(rate)}: {_why(exc)}"
            break
        if not got or got[0].get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")["rate"] * 8 != rate:
            failure = f"{format_rate(rate)} did not read back"
            break
        verified.append(rate)
    _delete_root(ipr, index)
    if not verified:
        return Capability("tbf", False, "tbf", f"tbf {failure}")
    above_32bit = failure and len(verified) < len(TBF_PROBE_RATES_BPS) and \
        TBF_PROBE_RATES_BPS[len(verified)] > _RATE32_LIMIT_BPS
    tail = f"; {failure}" + (" (pyroute2 sends no TCA_TBF_RATE64)" if above_32bit else "") if failure else ""
    return Capability("tbf", True, "tbf", f"tbf read back up to {format_rate(verified[-1])}{tail}",
                      value=verified[-1])


def _delete_root(ipr: IPRoute, index: int) -> None:
    for msg in ipr.get_qdiscs(index=index):
        if msg["parent"] == TC_H_ROOT and msg["handle"] != 0:
            ipr.tc("del", index=index, handle=msg["handle"], parent=TC_H_ROOT)


def _probe_netem(ns: str) -> Capability:
    spec = DirectionSpec(rate_bps=100_000_000, delay_us=5000, jitter_us=1000, loss_ppm=1000)
    ops = plan_direction(spec, netem=True)
    try:
        tc.apply_plan(ns, _VETH, ops)
        got = [e for e in tc.read_qdiscs(ns, _VETH) if e["kind"] == "netem"]
    except LinkError as exc:
        why = _why(exc)
        hint = " — no sch_netem in this kernel" if why.startswith("ENOENT") else ""
        return Capability("netem", False, "netem", f"adding netem failed: {why}{hint}")
    finally:
        tc.clear(ns, _VETH)
    want = {k: v for k, v in ops[-1].params}
    if not got or any(got[0].get(k) != v for k, v in want.items()):
        return Capability("netem", False, "netem", f"netem read back as {got} instead of {want}")
    return Capability("netem", True, "netem", "netem under htb: delay, jitter, loss and limit read back")


def _probe_simple(ipr: IPRoute, index: int, kind: str) -> Capability:
    handle, parent = (make_handle(0xFFFF), 0xFFFF_FFF1) if kind == "ingress" else (make_handle(1), TC_H_ROOT)
    try:
        ipr.tc("add", kind, index, handle, parent=parent)
    except (NetlinkError, OSError) as exc:
        hint = f" — no sch_{kind} in this kernel" if isinstance(exc, NetlinkError) and exc.code == errno.ENOENT else ""
        return Capability(kind, False, kind, f"adding {kind} failed: {_why(exc)}{hint}")
    ipr.tc("del", index=index, handle=handle, parent=parent)
    return Capability(kind, True, kind, f"{kind} qdisc added and removed")


def _probe_ifb(ipr: IPRoute) -> Capability:
    try:
        ipr.link("add", ifname=_IFB, kind="ifb")
    except (NetlinkError, OSError) as exc:
        return Capability("ifb", False, "ifb", f"creating an ifb device failed: {_why(exc)} (optional)")
    ipr.link("del", ifname=_IFB)
    return Capability("ifb", True, "ifb", "ifb device created and removed (optional: ingress shaping)")


def _probe_tun() -> Capability:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        return Capability("tun", False, "delay-line", f"/dev/net/tun: {_why(exc)}")
    os.close(fd)
    return Capability("tun", True, "delay-line", "/dev/net/tun opens (userspace delay line possible)")


def _kernel_probes(ns: str) -> list[Capability]:
    with tc.open_ipr(ns) as ipr:
        ipr.link("add", ifname=_VETH, kind="veth", peer={"ifname": _VETH_PEER})
        index = int(ipr.link_lookup(ifname=_VETH)[0])
        tbf = _probe_tbf(ipr, index)
        simple = [_probe_simple(ipr, index, kind) for kind in ("fq", "ingress")]
        ifb = _probe_ifb(ipr)
    return [*_probe_htb(ns), tbf, _probe_netem(ns), *simple, ifb]


def probe(prefix: str = "tb-probe") -> list[Capability]:
    """Try every backend in a scratch namespace ``<prefix>-<pid>``; always removes it. Needs root."""
    if not prefix.startswith("tb-"):
        raise LinkError(f"probe namespace prefix must start with 'tb-', got {prefix!r}")
    name = f"{prefix}-{os.getpid()}"
    if name in netns.listnetns():
        raise LinkError(f"network namespace {name} already exists; not probing in a namespace we did not create")
    caps: list[Capability] = []
    try:
        netns.create(name)
    except Exception as exc:  # pyroute2 raises from a child process; any failure means no namespace
        if name in netns.listnetns():  # half-created (mount point made, unshare failed): it is ours
            netns.remove(name)
        reason = f"cannot create network namespace {name}: {_why(exc)} (needs root)"
        caps.append(Capability("netns", False, "kernel", reason))
        caps += [Capability(k, False, k, reason) for k in _KERNEL_CAPS]
    else:
        try:
            caps.append(Capability("netns", True, "kernel", f"scratch namespace {name} created"))
            caps += _kernel_probes(name)
        except (NetlinkError, OSError, LinkError) as exc:  # e.g. no veth: nothing else can be tried
            reason = f"probing in {name} failed: {_why(exc)}"
            caps += [Capability(k, False, k, reason) for k in _KERNEL_CAPS if k not in {c.name for c in caps}]
        finally:
            netns.remove(name)
    caps.append(_probe_tun())
    return caps + _feature_caps(caps)


def _by_name(caps: Iterable[Capability]) -> dict[str, Capability]:
    return {c.name: c for c in caps if c.name not in FEATURES}


def backend_for(caps: Iterable[Capability]) -> dict[str, str]:
    """Which backend serves each feature.

    {"rate": "htb" | "none", "delay"/"jitter"/"loss": "netem" | "delay-line" | "none"}: netem wherever the
    kernel has it (it is the primary path), the userspace delay line where only TUN is there.
    """
    found = _by_name(caps)

    def ok(name: str) -> bool:
        return name in found and found[name].available

    rate = "htb" if ok("htb") else "none"
    timing = "netem" if ok("netem") else "delay-line" if ok("tun") else "none"
    return {"rate": rate, "delay": timing, "jitter": timing, "loss": timing}


def _feature_caps(caps: list[Capability]) -> list[Capability]:
    found = _by_name(caps)
    chosen = backend_for(caps)
    out: list[Capability] = []
    for feature in FEATURES:
        backend = chosen[feature]
        if feature == "rate":
            top = found.get("htb-rate64")
            reason = (f"htb, read back exactly up to {format_rate(top.value)}" if backend == "htb" and top and top.value
                      else found["htb"].reason if backend == "htb" else f"htb unavailable: {found['htb'].reason}")
        elif backend == "netem":
            reason = "netem in the kernel"
        elif backend == "delay-line":
            reason = f"netem unavailable ({found['netem'].reason}); userspace delay line on TUN"
        else:
            reason = f"neither netem ({found['netem'].reason}) nor TUN ({found['tun'].reason})"
        out.append(Capability(feature, backend != "none", backend, reason))
    return out


def highest_rate_verified(caps: Iterable[Capability]) -> int | None:
    """The highest HTB rate (bit/s) that was set and read back exactly, if any."""
    found = _by_name(caps)
    cap = found.get("htb-rate64")
    return cap.value if cap is not None else None


def format_capabilities(caps: Iterable[Capability]) -> list[str]:
    """Lines for `testbed doctor`: "netem   no   netem   adding netem failed: ENOENT ..."."""
    return [f"{c.name:<11} {'yes' if c.available else 'no':<4} {c.backend:<10} {c.reason}" for c in caps]
