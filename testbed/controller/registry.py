"""Who is connected to the controller, and who is up: registration, heartbeats, down detection, re-admission.

Pure: no sockets, no threads, no clock of its own. Every call takes ``now`` (seconds on a monotonic clock the
caller chooses), so down detection is tested by moving a number instead of sleeping. Each change of membership
is returned as :class:`Change` events (and kept in a bounded history) so the planner can be re-run on them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from testbed.errors import TestbedError

ROLES: Final = ("device", "edge")
#: Change kinds: a first registration, a node marked down, a down (or restarted) node admitted again.
CHANGE_KINDS: Final = ("registered", "down", "readmitted")
_HISTORY: Final = 256


class UnknownNode(TestbedError):
    """A heartbeat or command for a node that has not registered (e.g. after a controller restart)."""


@dataclass(frozen=True)
class Change:
    """One membership change; ``at`` is on the registry's clock."""

    kind: str
    node: str
    role: str
    at: float


@dataclass(frozen=True)
class NodeView:
    """A read-only picture of one node for callers outside the registry."""

    name: str
    role: str
    device_class: str
    up: bool
    registered_at: float
    last_seen: float
    facts: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)  # the last heartbeat's status object
    incarnation: int = 1  # counts registrations: a restarted agent registers again


@dataclass
class _Node:
    name: str
    role: str
    device_class: str
    facts: dict[str, Any]
    registered_at: float
    last_seen: float
    up: bool = True
    status: dict[str, Any] = field(default_factory=dict)
    incarnation: int = 1


class Registry:
    """Nodes keyed by name; a node that is silent for ``missed_beats`` heartbeat intervals is down."""

    def __init__(self, heartbeat_s: float = 1.0, missed_beats: int = 3) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        if missed_beats < 1:
            raise ValueError(f"missed_beats must be at least 1, got {missed_beats}")
        self.heartbeat_s = heartbeat_s
        self.missed_beats = missed_beats
        self._nodes: dict[str, _Node] = {}
        self.history: deque[Change] = deque(maxlen=_HISTORY)

    @property
    def down_after_s(self) -> float:
        return self.heartbeat_s * self.missed_beats

    def register(self, name: str, role: str, now: float, *, device_class: str = "",
                 facts: Mapping[str, Any] | None = None) -> list[Change]:
        """Admit a node (again); a node that registers while up was restarted and counts as re-admitted."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        old = self._nodes.get(name)
        node = _Node(name, role, device_class, dict(facts or {}), registered_at=now, last_seen=now)
        if old is None:
            kind = "registered"
        else:
            kind = "readmitted"
            node.incarnation = old.incarnation + 1
        self._nodes[name] = node
        return self._emit(kind, node, now)

    def heartbeat(self, name: str, now: float, status: Mapping[str, Any] | None = None) -> list[Change]:
        """Record that ``name`` is alive; a down node that heartbeats again is re-admitted."""
        node = self._nodes.get(name)
        if node is None:
            raise UnknownNode(f"node {name!r} has not registered")
        node.last_seen = max(node.last_seen, now)
        if status is not None:
            node.status = dict(status)
        if not node.up:
            node.up = True
            return self._emit("readmitted", node, now)
        return []

    def check(self, now: float) -> list[Change]:
        """Mark down every up node silent for longer than :attr:`down_after_s`."""
        changes: list[Change] = []
        for node in self._nodes.values():
            if node.up and now - node.last_seen > self.down_after_s:
                node.up = False
                changes += self._emit("down", node, now)
        return changes

    def get(self, name: str) -> NodeView:
        node = self._nodes.get(name)
        if node is None:
            raise UnknownNode(f"no node named {name!r} (known: {', '.join(sorted(self._nodes)) or 'none'})")
        return self._view(node)

    def nodes(self) -> tuple[NodeView, ...]:
        return tuple(self._view(n) for n in sorted(self._nodes.values(), key=lambda n: (n.role, n.name)))

    def up(self, role: str | None = None) -> tuple[str, ...]:
        return tuple(v.name for v in self.nodes() if v.up and (role is None or v.role == role))

    def _emit(self, kind: str, node: _Node, now: float) -> list[Change]:
        change = Change(kind, node.name, node.role, now)
        self.history.append(change)
        return [change]

    @staticmethod
    def _view(node: _Node) -> NodeView:
        return NodeView(node.name, node.role, node.device_class, node.up, node.registered_at, node.last_seen,
                        MappingProxyType(dict(node.facts)), MappingProxyType(dict(node.status)), node.incarnation)
