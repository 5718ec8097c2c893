"""What a host is: CPU, cores, memory, OS, kernel, whether it has netem, and its accelerator.

One POSIX shell script runs on the host (no Python needed there) and prints sections; parsing them is pure.
Accelerators: a Raspberry Pi names itself in /proc/device-tree/model, a Jetson has /etc/nv_tegra_release,
a GPU server answers nvidia-smi.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

FACTS_SCRIPT = r"""
s() { printf '\n@@%s\n' "$1"; }
s cpu_model; (grep -m1 -iE '^(model name|Hardware|cpu model)' /proc/cpuinfo | cut -d: -f2-) 2>/dev/null
s lscpu_model; (LC_ALL=C lscpu 2>/dev/null | grep -m1 '^Model name' | cut -d: -f2-)
s cores; (getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null)
s mem_kb; (grep -m1 '^MemTotal' /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
s os; (. /etc/os-release 2>/dev/null && printf '%s' "$PRETTY_NAME")
s kernel; uname -r
s arch; uname -m
s netem_module; (test -d /sys/module/sch_netem && echo loaded) || (modinfo sch_netem >/dev/null 2>&1 && echo modinfo) \
  || (find "/lib/modules/$(uname -r)" -name 'sch_netem.ko*' 2>/dev/null | head -n1 | grep -q . && echo file) \
  || (grep -qs 'sch_netem' "/lib/modules/$(uname -r)/modules.builtin" && echo builtin) || echo no
s device_tree_model; (tr -d '\000' < /proc/device-tree/model) 2>/dev/null
s tegra_release; head -n1 /etc/nv_tegra_release 2>/dev/null
s nvidia_smi; (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n4)
s python; (python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)
s tc; (command -v tc 2>/dev/null)
s end
"""


@dataclass(frozen=True)
class HostFacts:
    cpu_model: str
    cores: int
    memory_bytes: int
    os: str
    kernel: str
    arch: str
    netem: bool
    netem_source: str  # loaded, modinfo, file, builtin or no
    accelerator: str  # "" when none found
    accelerator_source: str  # device-tree, nv_tegra_release, nvidia-smi or ""
    python: str
    tc: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current = line[2:].strip()
            out[current] = ""
        elif current is not None:
            out[current] = (out[current] + "\n" + line) if out[current] else line
    return {k: v.strip() for k, v in out.items()}


def _int(text: str) -> int:
    match = re.match(r"\d+", text)
    return int(match.group()) if match else 0


def parse_facts(text: str) -> HostFacts:
    """The facts from the script's output (pure)."""
    s = _sections(text)
    cpu = s.get("cpu_model") or s.get("lscpu_model") or ""
    if s.get("device_tree_model"):
        accel, source = s["device_tree_model"], "device-tree"
    elif s.get("tegra_release"):
        accel, source = "NVIDIA Jetson (" + s["tegra_release"].lstrip("# ").strip() + ")", "nv_tegra_release"
    elif s.get("nvidia_smi"):
        accel, source = "; ".join(line.strip() for line in s["nvidia_smi"].splitlines()), "nvidia-smi"
    else:
        accel, source = "", ""
    netem = s.get("netem_module", "no") or "no"
    return HostFacts(
        cpu_model=" ".join(cpu.split()), cores=_int(s.get("cores", "")), memory_bytes=_int(s.get("mem_kb", "")) * 1024,
        os=s.get("os", ""), kernel=s.get("kernel", ""), arch=s.get("arch", ""), netem=netem != "no",
        netem_source=netem, accelerator=accel, accelerator_source=source, python=s.get("python", ""),
        tc=bool(s.get("tc")),
    )


def gather(conn: Any) -> HostFacts:
    """Run the facts script on a connected host (a testbed.remote.ssh.Connection)."""
    return parse_facts(conn.run(["sh", "-c", FACTS_SCRIPT], timeout_s=60).stdout)
