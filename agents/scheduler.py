"""Weighted fair sharing of the edge's compute among devices (pure: no threads, no clock).

Start-time fair queuing on measured compute time: each device has a virtual clock that advances by
the body time it used divided by its share; the backlogged device with the earliest virtual clock
runs next. Devices that saturate the edge therefore get compute in the ratio of their shares, an
idle device's share goes to the others (work-conserving), and a device returning from idleness
starts at the current virtual time instead of cashing in credit it did not use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class SharesError(ValueError):
    """Shares that cannot be used: negative, zero or not numbers."""


def parse_shares(text: str) -> dict[str, float]:
    """`dev1=0.7,dev2=0.3` -> {"dev1": 0.7, "dev2": 0.3}; weights are relative (they need not sum to 1)."""
    shares: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SharesError(f"share {item!r} is not DEVICE=WEIGHT")
        try:
            shares[name] = float(value)
        except ValueError as exc:
            raise SharesError(f"share of {name} is not a number: {value!r}") from exc
    check_shares(shares)
    return shares


def check_shares(shares: Mapping[str, float]) -> None:
    for name, share in shares.items():
        if not share > 0 or share == float("inf"):
            raise SharesError(f"share of {name} must be a positive number, got {share}")


class FairScheduler(Generic[T]):
    def __init__(self, shares: Mapping[str, float] | None = None, default_share: float = 1.0) -> None:
        self.shares: dict[str, float] = {}
        self.default_share = default_share
        self.set_shares(shares or {})
        self.queues: dict[str, deque[T]] = {}
        self.vtime: dict[str, float] = {}
        self.now = 0.0  # virtual time of the job that ran last
        self.used_s: dict[str, float] = {}

    def set_shares(self, shares: Mapping[str, float]) -> None:
        check_shares(shares)
        self.shares = dict(shares)

    def share(self, device: str) -> float:
        return self.shares.get(device, self.default_share)

    def push(self, device: str, job: T) -> None:
        queue = self.queues.setdefault(device, deque())
        if not queue:  # becomes backlogged: no credit for the time it was idle
            self.vtime[device] = max(self.vtime.get(device, 0.0), self.now)
        queue.append(job)

    def pop(self) -> tuple[str, T] | None:
        backlogged = [d for d, q in self.queues.items() if q]
        if not backlogged:
            return None
        device = min(backlogged, key=lambda d: (self.vtime[d], d))
        self.now = self.vtime[device]
        return device, self.queues[device].popleft()

    def charge(self, device: str, seconds: float) -> None:
        """Account `seconds` of edge compute to `device` once its job has run."""
        self.vtime[device] = self.vtime.get(device, self.now) + seconds / self.share(device)
        self.used_s[device] = self.used_s.get(device, 0.0) + seconds

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())
