"""Benchmark: U-shaped PSL vs SFL, vanilla SL and centralized training (accuracy and wall-clock per epoch).

Runs each experiment file in turn (a fresh run directory each), then writes a comparison into the output
directory: ``comparison.md`` (a Markdown table for the Training section of docs/BENCHMARKS.md), ``comparison.json``,
``accuracy.png`` (test accuracy per round, all schemes) and ``time_breakdown.png``.

    .venv/bin/python bench/training_bench.py experiments/*.yaml --out runs/bench-training
    .venv/bin/python bench/training_bench.py experiments/psl-iid.yaml experiments/sl-iid.yaml \\
        --set training.epochs=1 --set data.train_samples=6000   # a quicker look

``--set KEY=VALUE`` overrides a key of every experiment (VALUE is parsed as YAML); overrides that do not
apply to a scheme (``training.fedavg_every`` for sl) are skipped for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from testbed.errors import TestbedError
from testbed.training.experiment import parse_experiment
from testbed.training.results import write_plots
from testbed.training.schemes import run_experiment


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    scheme = doc.get("scheme")
    for item in overrides:
        key, _, raw = item.partition("=")
        path = key.split(".")
        if scheme != "psl" and path[-1] in ("fedavg_every", "mode", "fedavg_optimizer"):
            continue
        if scheme not in ("psl", "sfl") and path[-1] == "batch_sizes":
            continue
        if scheme == "centralized" and (path[0] in ("devices", "split") or path[-1] in ("partition", "alpha")):
            continue
        node = doc
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw)
    return doc


def row(res: dict[str, Any], ref_acc: float | None) -> str:
    exp = res["experiment"]
    t = exp["training"]
    data = exp["data"]
    part = "-" if res["scheme"] == "centralized" else (
        data["partition"] + (f" α={data['alpha']}" if data["partition"] == "dirichlet" else ""))
    fedavg = {"psl": f"every {t['fedavg_every']} steps" if t["fedavg_every"] else "never", "sfl": "every round",
              "sl": "relay", "centralized": "-"}[res["scheme"]]
    if t.get("fedavg_optimizer"):
        fedavg += " + optimizer state"
    batch = str(t["batch_size"])
    if t.get("batch_sizes") == "by_shard":
        batch += f" (by shard, ≤ {'/'.join(map(str, res.get('batch_sizes') or []))})"
    devices = "-" if res["scheme"] == "centralized" else str(exp["devices"])
    acc = 100 * res["final"]["test_acc"]
    delta = f"{acc - 100 * ref_acc:+.2f}" if ref_acc is not None else ""
    per_epoch = " / ".join(f"{s:.0f}" for s in res["epoch_train_s"])
    mb = sum(d["bytes_up"] + d["bytes_down"] for d in res["devices"].values()) / 1e6 if res["scheme"] != "centralized" \
        else 0.0
    return (f"| {res['name']} | {res['scheme']} | {devices} | {part} | {batch} | {fedavg} | "
            f"{acc:.2f} | {delta} | {per_epoch} | {mb:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/bench-training"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="", help="appended to every run's name (e.g. the overrides' gist)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = []
    for path in args.experiments:
        doc = apply_overrides(yaml.safe_load(path.read_text()), args.overrides)
        doc.setdefault("name", path.stem)
        if args.tag:
            doc["name"] = f"{doc['name']}-{args.tag}"
        try:
            spec = parse_experiment(doc, source=str(path))
        except TestbedError as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        print(f"== {spec.name} ({spec.scheme}) ...", flush=True)
        t0 = time.perf_counter()

        def on_event(kind: str, _name: str = spec.name, **event: Any) -> None:
            if kind == "round_done":
                rec = event["record"]
                print(f"   round {event['round']}/{event['total']}: loss {rec['train_loss']:.4f} "
                      f"test acc {100 * rec['test_acc']:.2f}% train {rec['train_s']:.1f} s "
                      f"(eval {rec['eval_s']:.1f} s)", flush=True)

        res = run_experiment(spec, args.out / spec.name, fresh=True, on_event=on_event)
        res["bench_wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"   done in {res['bench_wall_s']:.0f} s: test accuracy {100 * res['final']['test_acc']:.2f}%, "
              f"training per epoch {res['epoch_train_s']}", flush=True)
    ref = next((r["final"]["test_acc"] for r in results if r["scheme"] == "centralized"), None)
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg_at_start']:.1f} at the start; "
        f"Python {info['python']}, torch {info['torch']}; {info['date']}.",
        "",
        "| run | scheme | devices | data | batch/device | device-side averaging | test acc (%) | vs centralized "
        "(points) | training s per epoch | data-plane MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row(r, ref) for r in results),
    ]
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    (args.out / "comparison.json").write_text(json.dumps({"machine": info, "runs": results}, indent=1))
    write_plots(args.out, results)
    print("\n".join(lines))
    print(f"\nwritten: {args.out}/comparison.md, comparison.json, accuracy.png, time_breakdown.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
