"""Benchmark the planner: N devices x P split points, solved end to end (profiles in, plan out).

Not a test. For each scenario it times, over ``--repeats`` runs each on a fresh random instance:

* ``per-device``: :func:`testbed.planning.lscra.plan_per_device` (Pareto-pruned bisection; the LSCRA planner
  for inference);
* ``per-device (no pruning)``: the same bisection over every split of every device (the ablation);
* ``common``: :func:`testbed.planning.lscra.plan_common_split` (one split for all, for training);
* ``baselines``: every baseline of :mod:`testbed.planning.baselines` together.

Every time includes building the cost tensor from the profiles and timing the final plan stage by stage.
``--split-points 50`` means split points 1..50 for the head/tail boundaries (L = 51 blocks, min_head = min_tail = 1),
so 50·51/2 = 1275 candidate ``(a, b)`` per device. Two scenarios: ``heterogeneous`` (the tests' generator:
speeds 0.25-4x, links 1 Mbit/s-1 Gbit/s, the whole edge 5-50x a speed-1 device; the slowest devices set the round
and few need the edge) and ``fleet`` (similar devices and an edge N/4 times a device, so most of them offload and
the bisection has real work to do).

    python bench/planner_bench.py --devices 1000 --split-points 50 --repeats 7 --json runs/planner_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.planning.baselines import all_baselines
from testbed.planning.instances import random_problem
from testbed.planning.lscra import plan_common_split, plan_per_device
from testbed.planning.model import DeviceProfile, Plan, PlanningProblem

SOLVERS: dict[str, Callable[[PlanningProblem], Any]] = {
    "per-device": plan_per_device,
    "per-device (no pruning)": lambda p: plan_per_device(p, prune=False),
    "common": plan_common_split,
    "baselines": all_baselines,
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fleet(seed: int, n: int, points: int, mode: str) -> PlanningProblem:
    """Similar devices (speed 0.8-1.2, 50-200 Mbit/s up, 5-10 ms) and an edge N/4 times a device: most offload."""
    base = random_problem(seed, 1, points + 1, mode, edge_speedup=n / 4)
    rng = np.random.default_rng(seed + 10**6)
    devices = tuple(
        DeviceProfile(name=f"dev{i}", speed=float(rng.uniform(0.8, 1.2)), uplink_bps=float(rng.uniform(5e7, 2e8)),
                      downlink_bps=float(rng.uniform(2e8, 8e8)), delay_s=float(rng.uniform(0.005, 0.01)))
        for i in range(n))
    return replace(base, devices=devices)


def instance(scenario: str, seed: int, n: int, points: int, mode: str) -> PlanningProblem:
    if scenario == "fleet":
        return fleet(seed, n, points, mode)
    return random_problem(seed, n, points + 1, mode)


def run(n: int, points: int, repeats: int, mode: str, scenario: str, seed: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in SOLVERS}
    quality: dict[str, list[float]] = {}
    edge_users: list[int] = []
    for r in range(repeats):
        prob = instance(scenario, seed + r, n, points, mode)
        results: dict[str, Any] = {}
        for name, fn in SOLVERS.items():
            dt, results[name] = timed(lambda fn=fn, prob=prob: fn(prob))
            times[name].append(dt)
        best: Plan = results["per-device"]
        assert abs(results["per-device (no pruning)"].round_s - best.round_s) <= 1e-9 * best.round_s
        edge_users.append(sum(d.share > 0 for d in best.devices))
        others = {"common": results["common"], **results["baselines"]}
        for name, p in others.items():
            quality.setdefault(name, []).append(p.round_s / best.round_s)
    return {
        "devices": n, "split_points": points, "splits_per_device": points * (points + 1) // 2, "mode": mode,
        "scenario": scenario, "repeats": repeats,
        "seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
        "round_vs_per_device": {k: statistics.median(v) for k, v in quality.items()},
        "edge_users_median": statistics.median(edge_users),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--split-points", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", default="inference,training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_avg": os.getloadavg()}
    print(f"# {args.devices} devices x {args.split_points} split points; {info}")
    rows = []
    for mode in args.modes.split(","):
        for scenario in ("heterogeneous", "fleet"):
            row = run(args.devices, args.split_points, args.repeats, mode, scenario, args.seed)
            rows.append(row)
            users = f"median edge users {row['edge_users_median']:.0f} of {args.devices}"
            print(f"\n## {mode}, {row['scenario']} ({users})")
            print("| solver | median s | min s | max s |")
            print("|---|---:|---:|---:|")
            for k, v in row["seconds"].items():
                print(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
            print("round time / per-device LSCRA (median): " + ", ".join(
                f"{k} {v:.3f}" for k, v in row["round_vs_per_device"].items()))
    info["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
