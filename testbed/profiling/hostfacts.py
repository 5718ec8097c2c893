"""Facts about the machine a profile was measured on: CPU, cores, memory, accelerator, OS, library versions.

Every fact is best effort: a missing file, library or permission gives ``None`` for that fact and never an
exception, so recording the host can never make a measurement fail. Library versions come from the installed
distributions' metadata (no import); only the accelerator probe imports torch, and only when asked to.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["LIBRARIES", "accelerator", "cgroup_cpu_limit", "cpu_model", "host_facts", "library_versions",
           "memory_bytes"]

#: Distributions whose versions a profile records (absent ones are recorded as None).
LIBRARIES: tuple[str, ...] = ("numpy", "torch", "onnxruntime", "onnx", "pyzmq")

T = TypeVar("T")


def _safe(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:
        return None


def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""

    def from_cpuinfo() -> str | None:
        for line in _read("/proc/cpuinfo").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                return value.strip()
        return None

    return _safe(from_cpuinfo) or _safe(platform.processor) or None


def memory_bytes() -> int | None:
    """Total physical memory (``MemTotal`` on Linux, else ``sysconf``)."""

    def from_meminfo() -> int | None:
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
        return None

    def from_sysconf() -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    return _safe(from_meminfo) or _safe(from_sysconf)


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by this process's cgroup v2 quota (``cpu.max``), or None when unlimited or unknown.

    A lab device host runs under such a quota, so a profile measured inside the lab records how slow it was made.
    """

    def read() -> float | None:
        rel = ""
        for line in _read("/proc/self/cgroup").splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip()
        quota, period = _read(f"/sys/fs/cgroup{rel}/cpu.max").split()[:2]
        return None if quota == "max" else int(quota) / int(period)

    return _safe(read)


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions (from package metadata, without importing), ``python`` first; None if absent."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        out[name] = _safe(lambda n=name: metadata.version(n))  # type: ignore[misc]
    return out


def accelerator() -> dict[str, Any] | None:
    """The CUDA devices torch sees (name, memory, capability), or None (no torch, no CUDA, or an error)."""

    def probe() -> dict[str, Any] | None:
        import torch

        if not torch.cuda.is_available():
            return None
        devices = []
        for k in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(k)
            devices.append({"name": props.name, "memory_bytes": int(props.total_memory),
                            "capability": f"{props.major}.{props.minor}"})
        return {"kind": "cuda", "cuda": torch.version.cuda, "devices": devices}

    return _safe(probe)


def host_facts(*, probe_accelerator: bool = True) -> dict[str, Any]:
    """Everything above as one JSON/YAML-ready mapping; never raises."""
    uname = _safe(platform.uname)
    return {
        "hostname": _safe(socket.gethostname),
        "os": _safe(platform.system),
        "kernel": uname.release if uname else None,
        "os_version": uname.version if uname else None,
        "distribution": _safe(lambda: platform.freedesktop_os_release().get("PRETTY_NAME")),
        "machine": _safe(platform.machine),
        "cpu": cpu_model(),
        "logical_cores": _safe(os.cpu_count),
        "usable_cores": _safe(lambda: len(os.sched_getaffinity(0))),
        "cgroup_cpus": cgroup_cpu_limit(),
        "memory_bytes": memory_bytes(),
        "accelerator": accelerator() if probe_accelerator else None,
        "python_implementation": _safe(platform.python_implementation),
        "libraries": library_versions(),
    }
