"""CPU quotas that slow a lab device to its class's speed: cgroup v2 (cpu.max) or v1 (cfs quota).

Debian 12 and current Raspberry Pi OS mount the unified v2 hierarchy; some container hosts still
mount the cpu controller as v1 (this CI machine: /sys/fs/cgroup/cpu). Both are supported; the
group is named with the lab prefix and removed by name.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.lab.topology import LabError

MIN_QUOTA_US = 1000  # the kernel refuses smaller quotas
BASE_PERIOD_US = 20_000  # shorter periods slow short bursts too; longer ones hit the mean factor better


@dataclass(frozen=True)
class CpuQuota:
    quota_us: int
    period_us: int

    @property
    def cores(self) -> float:
        return self.quota_us / self.period_us


def quota_for(slowdown: float, cores: float = 1.0, correction: float = 1.0) -> CpuQuota | None:
    """Quota that runs `cores` threads at 1/slowdown of a host core; None when no slowdown is needed.

    `correction` (from `testbed lab calibrate`) scales the quota: throttling itself costs time (cold
    caches after each throttled stretch), so the raw quota slows work by somewhat more than asked.
    """
    if slowdown <= 1.0:
        return None
    period = max(BASE_PERIOD_US, math.ceil(MIN_QUOTA_US * slowdown / cores))
    quota = min(period * cores, period * cores * correction / slowdown)
    return CpuQuota(max(MIN_QUOTA_US, round(quota)), period)


def _mounts() -> list[tuple[str, str, str]]:
    rows = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append((parts[1], parts[2], parts[3]))
    return rows


@dataclass(frozen=True)
class CgroupRoot:
    path: Path
    version: int  # 1 or 2


def find_cpu_cgroup_root() -> CgroupRoot:
    for mountpoint, fstype, _options in _mounts():
        if fstype == "cgroup2":
            controllers = Path(mountpoint) / "cgroup.controllers"
            if controllers.exists() and "cpu" in controllers.read_text().split():
                return CgroupRoot(Path(mountpoint), 2)
    for mountpoint, fstype, options in _mounts():
        if fstype == "cgroup" and "cpu" in options.split(","):
            return CgroupRoot(Path(mountpoint), 1)
    raise LabError("no cgroup with the cpu controller is mounted: device classes cannot slow lab hosts")


class CpuGroup:
    """One lab device's cgroup: create, set the quota, add processes, remove."""

    def __init__(self, root: CgroupRoot, relative: str) -> None:
        self.root = root
        self.path = root.path / relative

    @classmethod
    def at(cls, path: Path) -> CpuGroup:
        root = find_cpu_cgroup_root()
        try:
            return cls(root, str(path.relative_to(root.path)))
        except ValueError as exc:
            raise LabError(f"{path} is not under the cpu cgroup hierarchy {root.path}") from exc

    def create(self, quota: CpuQuota | None) -> None:
        if self.root.version == 2:
            parent = self.path.parent
            parent.mkdir(exist_ok=True)
            subtree = parent / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
        self.path.mkdir(parents=True, exist_ok=True)
        self.set_quota(quota)

    def set_quota(self, quota: CpuQuota | None) -> None:
        if self.root.version == 2:
            (self.path / "cpu.max").write_text("max 100000" if quota is None else f"{quota.quota_us} {quota.period_us}")
        else:
            if quota is None:
                (self.path / "cpu.cfs_quota_us").write_text("-1")
                return
            # The period must be set first when the new quota would not fit the old period.
            (self.path / "cpu.cfs_quota_us").write_text("-1")
            (self.path / "cpu.cfs_period_us").write_text(str(quota.period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota.quota_us))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self, timeout_s: float = 5.0) -> bool:
        """rmdir the group (its processes must have exited); also the prefix directory when empty."""
        if not self.path.exists():
            return False
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise LabError(f"cannot remove cgroup {self.path}: {exc.strerror}") from exc
                time.sleep(0.05)
        with contextlib.suppress(OSError):  # other devices' groups are still there
            self.path.parent.rmdir()
        return True
