"""The planner's round time against each baseline's, measured in the emulated lab (needs root).

One `testbed run` per algorithm (``planner.algorithm``: lscra, fixed-middle, neurosurgeon, device-only), the
same four devices on four links sharing one CPU edge, the same profiles: the device's onnxruntime blocks back to
back, the edge's torch body as served (after a 20 ms idle wait; docs/profiling.md, "Served timings"), both
measured here first; every run measures its devices' links over ZeroMQ before it plans (``profile_links``) and
keeps its first plan (``resplit: false``). Every device sends its requests closed loop, all four at once.

Measured round time = the slowest device's median end-to-end delay; predicted = the plan's round time. Edge-only
(raw inputs leave the device) is not run: the device agents are U-shaped. Prints a table, writes JSON.

    sudo .venv/bin/python bench/planner_vs_baselines_lab.py --json docs/planner_vs_baselines_lab.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.lifecycle import unwind_on_signals  # noqa: E402
from testbed.models import build_model  # noqa: E402
from testbed.models.weights import save_weights  # noqa: E402
from testbed.profiling.blocks import profile_blocks  # noqa: E402
from testbed.profiling.store import save_profile  # noqa: E402

ALGORITHMS = ("lscra", "fixed-middle", "neurosurgeon", "device-only")
DEVICES = "raspberry-pi-4:5g-mmwave,raspberry-pi-4:6g-vision,raspberry-pi-5:5g-sub6,raspberry-pi-5:lte"


def parse_devices(text: str) -> list[dict[str, str]]:
    """``CLASS:LINK,CLASS:LINK,...`` -> the run spec's devices (dev1, dev2, ...)."""
    out = []
    for i, item in enumerate(text.split(","), 1):
        cls, sep, link = item.partition(":")
        if not sep or not cls or not link:
            raise SystemExit(f"--devices: expected CLASS:LINK, got {item!r}")
        out.append({"id": f"dev{i}", "class": cls, "link": link})
    return out


def run_one(algorithm: str, tmp: Path, weights: Path, profiles: dict[str, str], args: argparse.Namespace
            ) -> dict[str, Any]:
    out = tmp / f"run-{algorithm}"
    spec = {
        "name": f"baseline-{algorithm}", "mode": "inference", "model": {"name": "cnn"}, "weights": str(weights),
        "placement": {"kind": "lab", "prefix": "tbb"}, "edge": {"device": "cpu", "threads": 1},
        "devices": [{**d, "data": "synthetic"} for d in parse_devices(args.devices)],
        "planner": {"algorithm": algorithm, "splits": "per-device", "resplit": False, "profile_links": True,
                    "probe_interval": "0s", **profiles},
        "workload": {"batch_size": args.batch, "requests": args.requests},
        "metrics": {"enabled": False}, "output": str(out),
    }
    path = tmp / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "testbed.cli.main", "run", str(path), "--json", "--cache-dir",
                           str(tmp / "cache")], cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{algorithm}: testbed run failed: {proc.stderr[-1500:]}")
    summary = json.loads(proc.stdout)
    records = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("event") == "evaluation")  # after the link measurements
    devices = {}
    for name, plan in first["plan"].items():
        measured = summary["devices"][name]
        devices[name] = {"split": plan["split"], "share": plan["share"], "predicted_ms": plan["predicted_ms"],
                         "measured_p50_ms": measured["p50_ms"], "measured_p99_ms": measured["p99_ms"],
                         "requests": measured["requests"], "failed": measured["failed"]}
    measured_round = max(d["measured_p50_ms"] for d in devices.values())
    predicted_round = first["fresh_round_s"] * 1e3
    return {"algorithm": algorithm, "predicted_round_ms": round(predicted_round, 3),
            "measured_round_ms": round(measured_round, 3), "error": round(measured_round / predicted_round - 1, 4),
            "failed": summary["failed"], "requests": summary["requests"], "devices": devices}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="requests per device")
    p.add_argument("--devices", default=DEVICES, help="CLASS:LINK per device, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--edge-idle-ms", type=float, default=20.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (the emulated lab)", file=sys.stderr)
        return 2
    unwind_on_signals()  # SIGTERM unwinds like Ctrl-C: the runs take their labs down
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tb-baselines-") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        model = build_model("cnn").eval()
        weights = tmp / "cnn.safetensors"
        digest = save_weights(model, weights)
        print(f"profiling cnn at batch {args.batch} (device back to back, edge served)", flush=True)
        device = profile_blocks(model, [args.batch], repeats=30, warmup=5, weights_hash=digest)
        edge = profile_blocks(model, [args.batch], runtime="torch", repeats=30, warmup=5, weights_hash=digest,
                              idle_s=args.edge_idle_ms * 1e-3)
        profiles = {"device_profile": str(save_profile(device, tmp / "device.yaml")),
                    "edge_profile": str(save_profile(edge, tmp / "edge.yaml"))}
        for algorithm in ALGORITHMS:
            row = run_one(algorithm, tmp, weights, profiles, args)
            rows.append(row)
            splits = ", ".join(f"{n} {d['split'][0]}:{d['split'][1]} ({d['share']:.2f})"
                               for n, d in row["devices"].items())
            print(f"{algorithm:13} predicted round {row['predicted_round_ms']:8.2f} ms, measured "
                  f"{row['measured_round_ms']:8.2f} ms ({100 * row['error']:+.1f}%), failed {row['failed']}; "
                  f"{splits}", flush=True)
    lscra = next(r for r in rows if r["algorithm"] == "lscra")
    for r in rows:
        r["measured_vs_lscra"] = round(r["measured_round_ms"] / lscra["measured_round_ms"], 3)
        r["predicted_vs_lscra"] = round(r["predicted_round_ms"] / lscra["predicted_round_ms"], 3)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "devices": parse_devices(args.devices),
               "loadavg_start": [round(x, 2) for x in load_start],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "args": vars(args) | {"json": str(args.json)}}
    print(json.dumps({"summary": summary, "ratios": {r["algorithm"]: (r["predicted_vs_lscra"],
                                                                       r["measured_vs_lscra"]) for r in rows}}))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
