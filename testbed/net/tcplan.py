"""From a DirectionSpec to the list of tc operations that shape one interface's egress. Pure: no netlink.

The layout is Mininet's, which has worked for a decade::

    htb 1: (root, default class 1:1)
     └─ class htb 1:1  rate = ceil = rate_bps          rate, when the spec has one
         └─ netem 10:  delay, jitter, loss, limit      when netem is used and the spec needs it

Without a rate, netem (if used) is the root qdisc 1:. Without netem, delay/jitter/loss are left to the
userspace delay line and the plan holds only the rate. A spec needing nothing gives an empty plan: the
interface is just cleared.

Every number in a :class:`TcOp` is what the kernel will hold: rates are rounded to whole bytes per
second (the kernel's resolution), so reading the qdiscs back gives the plan's values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from testbed.net.link import DirectionSpec
from testbed.net.units import format_ppm, format_rate, format_us

__all__ = [
    "DEFAULT_ASSUMED_RATE_BPS",
    "DEFAULT_BURST_US",
    "HTB_CLASS",
    "HTB_ROOT",
    "NETEM_LEAF",
    "TC_H_ROOT",
    "TcOp",
    "describe",
    "format_handle",
    "kernel_rate_bps",
    "make_handle",
    "plan_direction",
]

#: The parent of a root qdisc.
TC_H_ROOT: Final[int] = 0xFFFF_FFFF


def make_handle(major: int, minor: int = 0) -> int:
    """tc's "major:minor" as the kernel's 32-bit handle (numbers are hexadecimal in tc's notation)."""
    if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
        raise ValueError(f"handle {major:x}:{minor:x} out of range")
    return (major << 16) | minor


def format_handle(handle: int) -> str:
    """The kernel's 32-bit handle in tc's notation: "root", "1:" or "1:1" (hexadecimal, as tc prints)."""
    if handle == TC_H_ROOT:
        return "root"
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:" if minor == 0 else f"{major:x}:{minor:x}"


HTB_ROOT: Final[int] = make_handle(1)
HTB_CLASS: Final[int] = make_handle(1, 1)
NETEM_LEAF: Final[int] = make_handle(0x10)

#: Token bucket depth as time at the shaped rate. Whatever fits in the bucket passes unshaped, so a
#: shallow one keeps message transfer times honest (100 µs at 1 Gbit/s is 12.5 kB). Measured on veth
#: with hrtimers: 100 µs and 1 ms give the same goodput from 5 Mbit/s to 10 Gbit/s. See docs/links.md.
DEFAULT_BURST_US: Final[int] = 100
#: The bucket never holds fewer than this many full-size packets.
MIN_BURST_PACKETS: Final[int] = 2
#: The kernel clamps HTB's quantum to this when it computes one itself (and warns); we set it explicitly.
MAX_QUANTUM_BYTES: Final[int] = 200_000
#: netem's default queue limit, in packets; we only ever raise it.
MIN_NETEM_LIMIT: Final[int] = 1000
#: For a netem limit on an unlimited link: a veth pair moves at most about this much.
DEFAULT_ASSUMED_RATE_BPS: Final[int] = 10_000_000_000
_U32_MAX: Final[int] = 2**32 - 1


@dataclass(frozen=True)
class TcOp:
    """One tc object to create: a qdisc or a class, with its parameters as (key, int) pairs in named units.

    kinds: "htb" (root qdisc; params: default_class), "htb-class" (rate_bps, ceil_bps, burst_bytes,
    cburst_bytes, quantum_bytes), "netem" (delay_us, jitter_us, loss_ppm, limit_packets).
    """

    kind: str
    handle: int
    parent: int
    params: tuple[tuple[str, int], ...] = ()

    @property
    def is_class(self) -> bool:
        return self.kind.endswith("-class")

    def get(self, key: str, default: int | None = None) -> int | None:
        for name, value in self.params:
            if name == key:
                return value
        return default

    def __getitem__(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise KeyError(f"{self.kind} {format_handle(self.handle)} has no parameter {key!r}")
        return value

    def as_dict(self) -> dict[str, int | str]:
        return {"kind": self.kind, "handle": self.handle, "parent": self.parent, **dict(self.params)}

    def __str__(self) -> str:
        return _describe_op(self)


def kernel_rate_bps(rate_bps: int) -> int:
    """The rate the kernel will hold: whole bytes per second (rounded to the nearest, at least 1 byte/s)."""
    return max(8, (rate_bps + 4) // 8 * 8)


def _htb_ops(rate_bps: int, mtu: int, burst_us: int) -> list[TcOp]:
    rate = kernel_rate_bps(rate_bps)
    rate_bytes = rate // 8
    burst = max(MIN_BURST_PACKETS * mtu, math.ceil(rate_bytes * burst_us / 1_000_000))
    quantum = max(mtu, min(rate_bytes // 10, MAX_QUANTUM_BYTES))
    return [
        TcOp("htb", HTB_ROOT, TC_H_ROOT, (("default_class", HTB_CLASS & 0xFFFF),)),
        TcOp(
            "htb-class",
            HTB_CLASS,
            HTB_ROOT,
            (
                ("rate_bps", rate),
                ("ceil_bps", rate),
                ("burst_bytes", burst),
                ("cburst_bytes", burst),
                ("quantum_bytes", quantum),
            ),
        ),
    ]


def _netem_limit(rate_bps: int, spec: DirectionSpec, mtu: int) -> int:
    """Twice the bandwidth-delay product in packets (netem's queue holds every packet still being delayed)."""
    in_flight_bytes = rate_bps / 8 * (spec.delay_us + spec.jitter_us) / 1_000_000
    return min(max(MIN_NETEM_LIMIT, math.ceil(2 * in_flight_bytes / mtu)), _U32_MAX)  # a u32 in the kernel


def plan_direction(
    spec: DirectionSpec,
    *,
    netem: bool,
    mtu: int = 1500,
    burst_us: int = DEFAULT_BURST_US,
    assumed_rate_bps: int = DEFAULT_ASSUMED_RATE_BPS,
) -> list[TcOp]:
    """The tc operations, in creation order, that give one interface's egress this direction's behaviour.

    ``netem`` says whether delay/jitter/loss go to netem (True) or are left to the userspace delay line
    (False: only the rate ops). ``assumed_rate_bps`` sizes netem's queue when the spec has no rate.
    """
    if not 576 <= mtu <= 65535:
        raise ValueError(f"mtu {mtu} out of range [576, 65535]")
    if burst_us <= 0:
        raise ValueError(f"burst_us must be positive, got {burst_us}")
    ops: list[TcOp] = []
    if spec.rate_bps is not None:
        ops = _htb_ops(spec.rate_bps, mtu, burst_us)
    if netem and spec.needs_delay_line_or_netem():
        rate = spec.rate_bps if spec.rate_bps is not None else assumed_rate_bps
        handle, parent = (NETEM_LEAF, HTB_CLASS) if ops else (HTB_ROOT, TC_H_ROOT)
        ops.append(
            TcOp(
                "netem",
                handle,
                parent,
                (
                    ("delay_us", spec.delay_us),
                    ("jitter_us", spec.jitter_us),
                    ("loss_ppm", spec.loss_ppm),
                    ("limit_packets", _netem_limit(rate, spec, mtu)),
                ),
            )
        )
    return ops


def _where(op: TcOp) -> str:
    handle = format_handle(op.handle)
    return f"{handle} root" if op.parent == TC_H_ROOT else f"{handle} parent {format_handle(op.parent)}"


def _describe_op(op: TcOp) -> str:
    p = dict(op.params)
    if op.kind == "htb":
        return f"qdisc htb {_where(op)} default {p['default_class']:x}"
    if op.kind == "htb-class":
        return (
            f"class htb {_where(op)} rate {format_rate(p['rate_bps'])} ceil {format_rate(p['ceil_bps'])} "
            f"burst {p['burst_bytes']}b cburst {p['cburst_bytes']}b quantum {p['quantum_bytes']}"
        )
    if op.kind == "netem":
        text = f"qdisc netem {_where(op)} limit {p['limit_packets']}"
        if p["delay_us"] or p["jitter_us"]:
            text += f" delay {format_us(p['delay_us'])}"
            if p["jitter_us"]:
                text += f" {format_us(p['jitter_us'])}"
        if p["loss_ppm"]:
            text += f" loss {format_ppm(p['loss_ppm'])}"
        return text
    params = " ".join(f"{k} {v}" for k, v in op.params)
    kind = "class" if op.is_class else "qdisc"
    return f"{kind} {op.kind.removesuffix('-class')} {_where(op)} {params}".rstrip()


def describe(ops: Iterable[TcOp]) -> list[str]:
    """tc-like one-liners (what follows "tc qdisc/class add dev X"), for `testbed link show` and the docs."""
    return [_describe_op(op) for op in ops]
