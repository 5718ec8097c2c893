"""Check that a device class's CPU quota slows real work by the intended factor.

The work is the zoo CNN's head under onnxruntime with one thread (what a device agent runs), timed
over enough iterations to span many quota periods; the same run without a quota is the reference.
`python -m testbed.lab.calibrate --worker HEAD.onnx SECONDS` is the timed worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.lab.cgroups import CpuGroup, find_cpu_cgroup_root, quota_for
from testbed.lab.devices import host_speed_vs_pi4, load_device_class, slowdown

HEAD_SPLIT = 5  # the CNN's first five blocks: convolutions, the bulk of a device's work


def _worker(head: str, iterations: int) -> None:
    import numpy as np

    from testbed.onnx_runtime import cpu_session

    session = cpu_session(head, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28), dtype=np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(iterations):
        session.run(None, {"x": x})
    elapsed = time.perf_counter() - start
    print(json.dumps({"iterations": iterations, "seconds": elapsed, "ms_per_run": 1000 * elapsed / iterations}))


def _timed_run(head: Path, iterations: int, cgroup: Path | None) -> float:
    argv = [sys.executable, "-m", "testbed.lab.enter"]
    if cgroup is not None:
        argv += ["--cgroup", str(cgroup)]
    argv += ["--", sys.executable, "-m", "testbed.lab.calibrate", "--worker", str(head), str(iterations)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"calibration worker failed: {proc.stderr.strip()[-500:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_run"])


def export_cnn_head(directory: Path) -> Path:
    import torch

    from testbed.models import build_model
    from testbed.partition import export_head

    torch.manual_seed(0)
    return export_head(build_model("cnn").eval(), HEAD_SPLIT, directory / "head.onnx")


def correction_path(state_dir: Path) -> Path:
    return state_dir / "cpu-calibration.json"


def load_correction(state_dir: Path) -> float:
    """The quota correction saved by the last `testbed lab calibrate --save` on this host (1.0 if none)."""
    try:
        return float(json.loads(correction_path(state_dir).read_text())["correction"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0


def calibrate(device_class: str, host_speed: float | None = None, seconds: float = 2.0,
              prefix: str = "tb", rounds: int = 2, repeats: int = 3) -> dict[str, Any]:
    """Measure the slowdown a class's quota really gives; each further round corrects the quota by the error.

    Creates and removes its own cgroup (`<prefix>-calibrate-<pid>`).
    """
    cls = load_device_class(device_class)
    speed = host_speed if host_speed is not None else host_speed_vs_pi4()
    target = slowdown(cls, speed)
    steps: list[dict[str, Any]] = []
    correction = 1.0
    with tempfile.TemporaryDirectory(prefix="tb-calibrate-") as tmp:
        head = export_cnn_head(Path(tmp))
        probe_ms = _timed_run(head, 200, None)
        iterations = max(200, int(seconds * 1000 / probe_ms))
        group = CpuGroup(find_cpu_cgroup_root(), f"{prefix}-calibrate-{os.getpid()}")
        group.create(None)
        try:
            for _ in range(rounds if target > 1.0 else 1):
                quota = quota_for(target, cores=1, correction=correction)
                group.set_quota(quota)
                # Interleaved pairs, median ratio: the host's other load shifts both sides of a pair alike.
                pairs = []
                for _ in range(repeats):
                    free = _timed_run(head, iterations, None)
                    slow = _timed_run(head, max(50, int(iterations / max(target, 1.0))), group.path)
                    pairs.append((slow / free, free, slow))
                measured, free_ms, slow_ms = sorted(pairs)[len(pairs) // 2]
                steps.append({
                    "correction": round(correction, 4),
                    "quota": None if quota is None else {"quota_us": quota.quota_us, "period_us": quota.period_us},
                    "head_ms_unthrottled": round(free_ms, 4), "head_ms_throttled": round(slow_ms, 4),
                    "measured_slowdown": round(measured, 3),
                    "relative_error": round(measured / max(target, 1.0) - 1, 4),
                })
                correction *= measured / max(target, 1.0)
        finally:
            group.remove()
    return {"device_class": cls.name, "host_speed_vs_pi4": speed, "target_slowdown": round(target, 3),
            "steps": steps, "final": steps[-1], "correction": steps[-1]["correction"]}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        print("usage: python -m testbed.lab.calibrate --worker HEAD.onnx ITERATIONS", file=sys.stderr)
        sys.exit(2)
