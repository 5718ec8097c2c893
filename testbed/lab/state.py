"""What the lab created, written down before it is created, so `lab down` removes exactly that.

The record is rewritten atomically after every step, so even a controller killed with SIGKILL in
the middle of `lab up` leaves a record from which `lab down` can finish the job.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.lab.topology import LabError, LabHost, Topology

DEFAULT_STATE_DIR = Path(os.environ.get("TESTBED_LAB_STATE", "/run/testbed"))


@dataclass
class ProcessRecord:
    """A long-running process of the lab (a delay line); its start time guards against pid reuse."""

    name: str
    pid: int
    start_ticks: int
    control: str = ""
    mtu: int = 0  # a delay line's TUN MTU (the HTB on its TUNs plans its burst with it)


@dataclass
class LabState:
    topology: Topology
    namespaces: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> {"uplink": {...}, "downlink": {...}}
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["topology"]["hosts"] = [asdict(h) for h in self.topology.hosts]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        topo = dict(data["topology"])
        topo["hosts"] = tuple(LabHost(**h) for h in topo["hosts"])
        return cls(
            topology=Topology(**topo),
            namespaces=list(data.get("namespaces", [])),
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            cgroups=list(data.get("cgroups", [])),
            links=dict(data.get("links", {})),
            complete=bool(data.get("complete", False)),
        )


class StateStore:
    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.dir = state_dir

    def path(self, prefix: str) -> Path:
        return self.dir / f"lab-{prefix}.json"

    def run_dir(self, prefix: str) -> Path:
        return self.dir / f"lab-{prefix}"

    def save(self, state: LabState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(state.topology.prefix)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=1))
        os.replace(tmp, path)

    def load(self, prefix: str) -> LabState | None:
        path = self.path(prefix)
        try:
            return LabState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"the lab record {path} is unreadable ({exc}); remove it after checking `ip netns`") from exc

    def forget(self, prefix: str) -> None:
        self.path(prefix).unlink(missing_ok=True)
