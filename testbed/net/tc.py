"""Apply tc plans to an interface, clear it, read it back: the thin pyroute2 shell around :mod:`tcplan`.

Every call names a network namespace (``None`` is the caller's own namespace: on a real Pi, the host)
and an interface; a namespace that does not exist is an error, never created. Failures raise
:class:`~testbed.net.link.LinkError` naming the interface, the operation and the kernel's errno, and
leave the interface cleared rather than half-shaped.

pyroute2 facts this module relies on (0.9.7, read from its source):
- rates are passed as int bytes/s; HTB sends TCA_HTB_RATE64/CEIL64 above 2**32-1 bytes/s (~34.4 Gbit/s);
  TBF has no RATE64 and cannot encode more (struct.error), which is one reason the plans use HTB;
- HTB burst and netem delay/jitter are given in bytes and microseconds and sent as 64-ns ticks;
- netem loss is given in percent (a float) and sent as a u32 fraction of 2**32-1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from testbed.net.link import LinkError
from testbed.net.tcplan import TC_H_ROOT, TcOp, describe, format_handle

__all__ = ["apply_plan", "clear", "format_entry", "open_ipr", "read_qdiscs", "update_plan"]

_U32_MAX: Final[int] = 2**32 - 1
_SUPPORTED_KINDS: Final[frozenset[str]] = frozenset({"htb", "htb-class", "netem"})
#: The ingress/clsact qdiscs hang off this parent; they are not egress shaping and clear() keeps them.
_TC_H_INGRESS: Final[int] = 0xFFFF_FFF1


def _where(netns: str | None, ifname: str) -> str:
    return f"{ifname} in netns {netns}" if netns else f"{ifname} (current namespace)"


def _errno_text(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        code = abs(int(exc.code))
        return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, f'errno {exc.errno}')} ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def open_ipr(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute in ``netns`` (never creating it), closed on exit."""
    try:
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except FileNotFoundError:
        raise LinkError(f"network namespace {netns!r} does not exist (see `ip netns list`)") from None
    except PermissionError:
        raise LinkError(f"opening network namespace {netns!r} needs root (CAP_SYS_ADMIN)") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, netns: str | None, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LinkError(f"no interface {_where(netns, ifname)}")
    return int(found[0])


def _pyroute2_call(op: TcOp, command: str) -> tuple[str, str, dict[str, Any]]:
    """(command, kind, kwargs) for ``IPRoute.tc``; pure, so the netem path is tested without sch_netem."""
    p = dict(op.params)
    if op.kind == "htb":
        return command, "htb", {"parent": op.parent, "default": p["default_class"]}
    if op.kind == "htb-class":
        return f"{command}-class", "htb", {
            "parent": op.parent,
            "rate": p["rate_bps"] // 8,
            "ceil": p["ceil_bps"] // 8,
            "burst": p["burst_bytes"],
            "cburst": p["cburst_bytes"],
            "quantum": p["quantum_bytes"],
        }
    if op.kind == "netem":
        return command, "netem", {
            "parent": op.parent,
            "delay": p["delay_us"],
            "jitter": p["jitter_us"],
            "loss": p["loss_ppm"] / 10_000,  # pyroute2 takes percent
            "limit": p["limit_packets"],
        }
    raise LinkError(f"unsupported tc operation kind {op.kind!r}; supported: {sorted(_SUPPORTED_KINDS)}")


def _hint(op: TcOp, exc: BaseException) -> str:
    if isinstance(exc, NetlinkError) and abs(int(exc.code)) == errno.ENOENT and not op.is_class:
        return (
            f" — the kernel has no sch_{op.kind} module"
            + ("; plan with netem=False and use the userspace delay line" if op.kind == "netem" else "")
        )
    if isinstance(exc, struct.error):
        return " — pyroute2 cannot encode this value (too large for the attribute)"
    return ""


def _run(ipr: IPRoute, index: int, op: TcOp, command: str, where: str) -> None:
    cmd, kind, kwargs = _pyroute2_call(op, command)
    try:
        ipr.tc(cmd, kind, index, op.handle, **kwargs)
    except (NetlinkError, OSError, struct.error, ValueError) as exc:
        raise LinkError(f"{where}: {cmd} {describe([op])[0]} failed: {_errno_text(exc)}{_hint(op, exc)}") from exc


def _clear(ipr: IPRoute, index: int, where: str) -> None:
    for msg in ipr.get_qdiscs(index=index):
        if msg["parent"] == TC_H_ROOT and msg["handle"] != 0:
            try:
                ipr.tc("del", index=index, handle=msg["handle"], parent=TC_H_ROOT)
            except NetlinkError as exc:
                if abs(int(exc.code)) not in (errno.ENOENT, errno.EINVAL):  # gone meanwhile
                    raise LinkError(f"{where}: deleting the root qdisc failed: {_errno_text(exc)}") from exc


def clear(netns: str | None, ifname: str) -> None:
    """Remove the root egress qdisc (and everything under it); the kernel puts its default back. Idempotent.

    An ingress qdisc is left alone: it is not part of any plan.
    """
    with open_ipr(netns) as ipr:
        _clear(ipr, _index(ipr, netns, ifname), _where(netns, ifname))


def _check(ops: list[TcOp]) -> None:
    for op in ops:
        if op.kind not in _SUPPORTED_KINDS:
            raise LinkError(f"unsupported tc operation kind {op.kind!r}; supported: {sorted(_SUPPORTED_KINDS)}")


def apply_plan(netns: str | None, ifname: str, ops: list[TcOp]) -> None:
    """Replace whatever shapes the interface's egress with ``ops`` (clear, then add in order).

    On failure the interface is cleared again (best effort) and LinkError names the operation and errno.
    """
    _check(ops)
    where = _where(netns, ifname)
    with open_ipr(netns) as ipr:
        index = _index(ipr, netns, ifname)
        _clear(ipr, index, where)
        try:
            for op in ops:
                _run(ipr, index, op, "add", where)
        except LinkError:
            with contextlib.suppress(LinkError):  # the original error is the one to report
                _clear(ipr, index, where)
            raise


def _shape(entries: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
    return {(str(e["kind"]), int(e["handle"]), int(e["parent"])) for e in entries}


def update_plan(netns: str | None, ifname: str, ops: list[TcOp]) -> None:
    """Change parameters in place when the interface already has this plan's shape; else :func:`apply_plan`.

    In place means queued packets survive a rate change — what trace replay needs every step.
    """
    _check(ops)
    current = [e for e in read_qdiscs(netns, ifname) if e["parent"] != _TC_H_INGRESS and e["handle"] != 0]
    if not ops or _shape(current) != _shape([op.as_dict() for op in ops]):
        apply_plan(netns, ifname, ops)
        return
    where = _where(netns, ifname)
    with open_ipr(netns) as ipr:
        index = _index(ipr, netns, ifname)
        for op in ops:
            if op.kind != "htb":  # the root's only parameter (the default class) never changes
                _run(ipr, index, op, "change", where)


def _ticks_to_us(ticks: int) -> float:
    return ticks / tick_in_usec


def _decode(msg: Any, is_class: bool) -> dict[str, Any]:
    kind = str(msg.get_attr("TCA_KIND"))
    parent = int(msg["parent"])
    handle = int(msg["handle"])
    if is_class and parent == TC_H_ROOT:
        parent = handle & 0xFFFF_0000  # a top-level class: report the qdisc it was added under
    entry: dict[str, Any] = {"kind": f"{kind}-class" if is_class else kind, "handle": handle, "parent": parent}
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return entry
    if kind == "htb" and is_class:
        parms = opts.get_attr("TCA_HTB_PARMS")
        rate = (opts.get_attr("TCA_HTB_RATE64") or parms["rate"]) * 8
        ceil = (opts.get_attr("TCA_HTB_CEIL64") or parms["ceil"]) * 8
        entry.update(
            rate_bps=rate,
            ceil_bps=ceil,
            burst_bytes=round(_ticks_to_us(parms["buffer"]) * rate / 8 / 1e6),
            cburst_bytes=round(_ticks_to_us(parms["cbuffer"]) * ceil / 8 / 1e6),
            quantum_bytes=parms["quantum"],
        )
    elif kind == "htb":
        init = opts.get_attr("TCA_HTB_INIT")
        if init is not None:
            entry["default_class"] = init["defcls"]
    elif kind == "tbf":
        parms = opts.get_attr("TCA_TBF_PARMS")
        rate = parms["rate"] * 8
        entry.update(
            rate_bps=rate,
            burst_bytes=round(_ticks_to_us(parms["buffer"]) * rate / 8 / 1e6),
            limit_bytes=parms["limit"],
        )
    elif kind == "netem":
        entry.update(
            delay_us=round(_ticks_to_us(opts["delay"])),
            jitter_us=round(_ticks_to_us(opts["jitter"])),
            loss_ppm=round(opts["loss"] * 1_000_000 / _U32_MAX),
            limit_packets=opts["limit"],
        )
    return entry


def read_qdiscs(netns: str | None, ifname: str) -> list[dict[str, Any]]:
    """The interface's qdiscs and classes as the kernel reports them, in the plan's vocabulary.

    Each entry has kind ("htb", "htb-class", "netem", "tbf", ...), handle and parent (32-bit ints, as in
    :class:`TcOp`; see :func:`format_handle`) and, for the kinds we plan, the parameters in named units:
    htb-class rate_bps, ceil_bps, burst_bytes, cburst_bytes, quantum_bytes; netem delay_us, jitter_us,
    loss_ppm, limit_packets; tbf rate_bps, burst_bytes, limit_bytes. Qdiscs come first, then classes.
    """
    with open_ipr(netns) as ipr:
        index = _index(ipr, netns, ifname)
        qdiscs = [_decode(m, False) for m in ipr.get_qdiscs(index=index)]
        classes = [_decode(m, True) for m in ipr.get_classes(index=index)]
    return qdiscs + classes


def format_entry(entry: dict[str, Any]) -> str:
    """One read-back entry as a line: "htb-class 1:1 parent 1: rate_bps=100000000 ..."."""
    params = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("kind", "handle", "parent"))
    return f"{entry['kind']} {format_handle(entry['handle'])} parent {format_handle(entry['parent'])} {params}".rstrip()
