"""A link profile on a remote host's interface: the lab's pure tc plan, as `tc` command lines run with sudo.

The plan (testbed.net.tcplan) is the same one the emulated lab applies by netlink; here it becomes the `tc`
commands a real Pi or server runs. Uplink is shaped on the device's own interface (its egress); the edge's
interface is never shaped. Without netem on the host, only the rate is applied, and the caller is told.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from testbed.net.link import DirectionSpec
from testbed.net.tcplan import TC_H_ROOT, TcOp, format_handle, plan_direction
from testbed.remote.errors import RemoteError

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")


def _check_ifname(ifname: str) -> str:
    if not _IFNAME_RE.match(ifname):
        raise RemoteError(f"bad interface name {ifname!r}")
    return ifname


def _where(op: TcOp) -> list[str]:
    return ["root"] if op.parent == TC_H_ROOT else ["parent", format_handle(op.parent)]


def tc_argv(ifname: str, op: TcOp) -> list[str]:
    """One `tc ... add` command for a plan operation (pure)."""
    dev = ["dev", _check_ifname(ifname)]
    p = dict(op.params)
    if op.kind == "htb":
        return ["tc", "qdisc", "add", *dev, *_where(op), "handle", format_handle(op.handle), "htb",
                "default", f"{p['default_class']:x}"]
    if op.kind == "htb-class":
        return ["tc", "class", "add", *dev, *_where(op), "classid", format_handle(op.handle), "htb",
                "rate", f"{p['rate_bps']}bit", "ceil", f"{p['ceil_bps']}bit", "burst", f"{p['burst_bytes']}b",
                "cburst", f"{p['cburst_bytes']}b", "quantum", str(p["quantum_bytes"])]
    if op.kind == "netem":
        argv = ["tc", "qdisc", "add", *dev, *_where(op), "handle", format_handle(op.handle), "netem",
                "limit", str(p["limit_packets"])]
        if p["delay_us"] or p["jitter_us"]:
            argv += ["delay", f"{p['delay_us']}us"]
            if p["jitter_us"]:
                argv += [f"{p['jitter_us']}us"]
        if p["loss_ppm"]:
            argv += ["loss", f"{p['loss_ppm'] / 10_000:.4f}%"]
        return argv
    raise RemoteError(f"no tc command for plan operation {op.kind}")


@dataclass(frozen=True)
class ShapingPlan:
    ifname: str
    commands: tuple[tuple[str, ...], ...]
    dropped: str  # what the host cannot do (delay/jitter/loss without netem), "" when nothing


def plan_commands(ifname: str, spec: DirectionSpec, *, netem: bool, mtu: int = 1500) -> ShapingPlan:
    """Clear the interface's root qdisc, then add the plan's objects in order (pure)."""
    ops = plan_direction(spec, netem=netem, mtu=mtu)
    dropped = "" if netem or not spec.needs_delay_line_or_netem() else \
        "delay, jitter and loss (the host has no sch_netem; only the rate is shaped)"
    clear = ("tc", "qdisc", "del", "dev", _check_ifname(ifname), "root")
    return ShapingPlan(ifname, (clear, *(tuple(tc_argv(ifname, op)) for op in ops)), dropped)


def script(plan: ShapingPlan) -> str:
    """The commands as one script: clearing may fail (nothing to clear), every add must succeed."""
    first, *rest = plan.commands
    return "\n".join([f"{shlex.join(first)} 2>/dev/null || true", "set -e", *(shlex.join(c) for c in rest)])


def apply(conn: Any, plan: ShapingPlan) -> None:
    """Run the plan on the host as root (sudo -n when the inventory user is not root)."""
    conn.run(["sh", "-c", script(plan)], sudo=True, timeout_s=30)


def show(conn: Any, ifname: str) -> str:
    return conn.run(["tc", "qdisc", "show", "dev", _check_ifname(ifname)], timeout_s=30).stdout
