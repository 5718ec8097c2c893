"""Predicted against measured end-to-end delay of split inference in the emulated lab (needs root).

For every link profile × device class × zoo model × sampled split (a, b): the latency model
(testbed.planning.model.device_time, fed by profiles measured on this host with testbed.profiling and the
device class's slowdown) predicts one device's end-to-end delay with the whole edge (share 1); the lab measures
it: a one-device lab with that link and class, the edge server in its namespace, the device agent in the device's
namespace (CPU quota + --slowdown), median over the requests. Prints a table, the fraction within 10%, and writes
JSON and (with matplotlib) a predicted-vs-measured plot.

Two predictions per point: from the nominal link profile (rates and delays as configured), and — the one the
planner is meant to use — from the link as the profiler measures it over the real ZeroMQ path from inside the
device's namespace and CPU quota (`testbed profile --no-blocks --edge ...`): goodput after TCP/IP headers, and a
round trip that includes the per-message software cost of the stack, and the edge's fixed handling of a request
(empty-body inference echo less PING echo, `--weights`). Both predictions charge the device runtime's per-call
cost of the tail session (`call` in the onnxruntime profile, measured after an idle wait, scaled by the class).
The edge's body is profiled as served (``--edge-idle-ms``, default 20: each run after an idle wait, on a
thread of its own, with the body's wake-up apart; docs/profiling.md, "Served timings"); the device's blocks back
to back (its head follows its tail at once; the tail's call after the wait is the profile's ``call``).
The verdict counts the measured-link prediction; the JSON also has the nominal one, the measured-link one
without the fixed costs (`predicted_base_ms`: no edge request handling, tail call or body wake-up) and the
measured-link one from a back-to-back edge profile (`predicted_b2b_edge_ms`, the model before served timings).

    sudo .venv/bin/python bench/plan_vs_lab.py --json docs/plan_vs_lab.json --plot docs/plan_vs_lab.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.lab.devices import host_speed_vs_pi4, load_device_class, slowdown  # noqa: E402
from testbed.lab.lab import Lab  # noqa: E402
from testbed.lab.state import StateStore  # noqa: E402
from testbed.lifecycle import unwind_on_signals  # noqa: E402
from testbed.models import build_model  # noqa: E402
from testbed.models.weights import save_weights  # noqa: E402
from testbed.net.link import load_link_profile  # noqa: E402
from testbed.partition import ArtifactCache, PartitionId, valid_splits  # noqa: E402
from testbed.planning.model import device_time  # noqa: E402
from testbed.profiling.blocks import profile_blocks  # noqa: E402
from testbed.profiling.problem import build_problem  # noqa: E402
from testbed.profiling.store import load_link_measurement  # noqa: E402

PREFIX = "tbv"
MODELS = {"cnn": {}, "resnet18": {"width": 16}}


def sample_splits(num_blocks: int, count: int, seed: int) -> list[tuple[int, int]]:
    candidates = [(a, b) for a, b in valid_splits(num_blocks) if a < b]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return sorted(candidates[i] for i in picks)


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} appeared")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear in {timeout_s} s")


def measure(lab: Lab, edge: str, head: Path, tail: Path, pid: str, data: Path, batch: int, factor: float,
            out: Path) -> dict[str, float]:
    argv = [sys.executable, "-m", "agents.device", "infer", "--edge", edge, "--device-id", "dev1",
            "--head", str(head), "--tail", str(tail), "--partition", pid, "--data", str(data),
            "--batch-size", str(batch), "--threads", "1", "--slowdown", f"{factor:.4f}", "--out", str(out)]
    proc = subprocess.run(lab.command_in("dev1", argv), capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"agent failed: {proc.stderr[-800:]}")
    stages = json.loads(out.read_text())["stages_ms"]
    # The first requests warm the connection up.
    return {k: round(float(np.median(v[2:])), 3) for k, v in stages.items()}


def measure_lab_link(lab: Lab, endpoint: str, weights: Path, out: Path, count: int) -> Path:
    """The profiler's link measurement from inside dev1's namespace and cgroup, to the lab's edge (with the
    edge's weights: the empty-body request that measures the edge's request handling)."""
    argv = [sys.executable, "-m", "testbed.cli.main", "profile", "--no-blocks", "--edge", endpoint,
            "--weights", str(weights),
            "--link-out", str(out), "--link-count", str(count), "--link-budget", "120",
            "--link-size", "16KiB", "--link-size", "128KiB", "--link-size", "512KiB"]
    proc = subprocess.run(lab.command_in("dev1", argv), capture_output=True, text=True, timeout=300, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"link measurement failed: {proc.stderr[-800:]}")
    return out


def _link_summary(path: Path) -> dict[str, Any]:
    link = load_link_measurement(path)
    return {"rtt_ms": round(link.rtt.median * 1e3, 3), "uplink_mbps": round(link.uplink_bps / 1e6, 1),
            "downlink_mbps": None if link.downlink_bps is None else round(link.downlink_bps / 1e6, 1),
            "edge_request_ms": None if link.edge_request_s is None else round(link.edge_request_s * 1e3, 3),
            "uplink_burst_bytes": link.uplink_burst_bytes, "downlink_burst_bytes": link.downlink_burst_bytes,
            # The same cost as the difference of the two round trips (the measurement before the edge's clock).
            "edge_request_rtt_diff_ms": None if link.request_rtt is None or link.request_echo_rtt is None else
            round((link.request_rtt.median - link.request_echo_rtt.median) * 1e3, 3),
            "notes": link.notes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", default="lte,5g-mmwave")
    p.add_argument("--classes", default="raspberry-pi-4,raspberry-pi-5")
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument("--splits", type=int, default=6, help="sampled splits per model")
    p.add_argument("--requests", type=int, default=14)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--link-count", type=int, default=10, help="rounds of link probes per lab")
    p.add_argument("--edge-idle-ms", type=float, default=20.0,
                   help="idle wait before every timed body run of the edge's profile (0: back to back)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    link_info: dict[tuple[str, str], dict[str, Any]] = {}
    load_start = os.getloadavg()
    if os.geteuid() != 0:
        print("needs root (the emulated lab)", file=sys.stderr)
        return 2
    unwind_on_signals()  # SIGTERM unwinds like Ctrl-C: the finally blocks stop the edge, take the lab down
    torch.set_num_threads(1)
    host_speed = host_speed_vs_pi4()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tb-planlab-") as tmp_name:
        tmp = Path(tmp_name)
        cache = ArtifactCache(tmp / "onnx")
        prepared = {}
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = build_model(name, **MODELS.get(name, {})).eval()
            weights = tmp / f"{name}.safetensors"
            weights_hash = save_weights(model, weights)
            print(f"profiling {name} (onnxruntime for the device, torch for the edge), batch {args.batch}", flush=True)
            # The device's head follows its tail at once (back to back; the tail's call after the wait is the
            # profile's `call`); the edge's body follows an idle wait for the next request (served timings).
            device_prof = profile_blocks(model, [args.batch], runtime="onnxruntime", repeats=30, warmup=5,
                                         weights_hash=weights_hash)
            edge_prof = profile_blocks(model, [args.batch], runtime="torch", repeats=30, warmup=5,
                                       weights_hash=weights_hash, idle_s=args.edge_idle_ms * 1e-3)
            edge_b2b = profile_blocks(model, [args.batch], runtime="torch", repeats=30, warmup=5,
                                      weights_hash=weights_hash)
            x = np.random.default_rng(1).standard_normal((args.batch * args.requests, *model.input_shape),
                                                         dtype=np.float32)
            data = tmp / f"{name}-data.npz"
            np.savez(data, x=x, y=np.zeros(len(x), np.int64))
            prepared[name] = (model, weights, weights_hash, device_prof, edge_prof, data,
                              sample_splits(model.num_blocks, args.splits, seed=len(name)), edge_b2b)
        store = StateStore(tmp / "state")
        for link_name in args.links.split(","):
            link = load_link_profile(link_name)
            for cls_name in args.classes.split(","):
                factor = max(1.0, slowdown(load_device_class(cls_name), host_speed))
                lab = Lab(store, PREFIX)
                lab.down()
                lab.up(1, link.name, link.spec, device_class=cls_name)
                try:
                    measured_link: Path | None = None
                    for name, (model, weights, weights_hash, dprof, eprof, data, splits, eb2b) in prepared.items():
                        nominal = build_problem(dprof, [link.name], devices=1, device_classes=[cls_name],
                                                edge_profile=eprof, batch_size=args.batch)
                        ready = tmp / f"edge-{link_name}-{cls_name}-{name}.json"
                        edge = subprocess.Popen(lab.command_in("edge", [
                            sys.executable, "-m", "agents.edge", "--weights", str(weights), "--threads", "1",
                            "--bind", f"tcp://{lab.require_state().topology.edge.address}:*",
                            "--ready-file", str(ready)]), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
                        try:
                            endpoint = wait_file(ready, edge)["endpoint"]
                            if measured_link is None:
                                measured_link = measure_lab_link(lab, endpoint, weights,
                                                                 tmp / f"link-{link_name}-{cls_name}.yaml",
                                                                 args.link_count)
                                link_info[(link_name, cls_name)] = _link_summary(measured_link)
                            problem = build_problem(dprof, [measured_link], devices=1, device_classes=[cls_name],
                                                    edge_profile=eprof, batch_size=args.batch)
                            b2b = build_problem(dprof, [measured_link], devices=1, device_classes=[cls_name],
                                                edge_profile=eb2b, batch_size=args.batch)
                            no_burst = dataclasses.replace(problem, devices=tuple(
                                dataclasses.replace(d, uplink_burst_bytes=0, downlink_burst_bytes=0)
                                for d in problem.devices))
                            base = dataclasses.replace(
                                problem, model=dataclasses.replace(problem.model, tail_call_s=0.0, body_call_s=0.0),
                                devices=tuple(dataclasses.replace(d, edge_request_s=0.0) for d in problem.devices))
                            for a, b in splits:
                                head, tail = cache.partition(model, weights_hash, a, b)
                                pid = str(PartitionId(weights_hash, a, b))
                                measured_stages = measure(lab, endpoint, head, tail, pid, data, args.batch, factor,
                                                          tmp / "result.json")
                                measured = measured_stages["e2e"]
                                predicted, stages = device_time(problem, 0, a, b, 1.0)
                                predicted_nominal, _ = device_time(nominal, 0, a, b, 1.0)
                                predicted_base, _ = device_time(base, 0, a, b, 1.0)
                                predicted_b2b, _ = device_time(b2b, 0, a, b, 1.0)
                                predicted_no_burst, _ = device_time(no_burst, 0, a, b, 1.0)
                                row = {"link": link_name, "device_class": cls_name, "model": name, "a": a, "b": b,
                                       "predicted_ms": round(predicted * 1000, 3), "measured_ms": round(measured, 3),
                                       "error": round(measured / (predicted * 1000) - 1, 4),
                                       "predicted_nominal_ms": round(predicted_nominal * 1000, 3),
                                       "error_nominal": round(measured / (predicted_nominal * 1000) - 1, 4),
                                       "predicted_base_ms": round(predicted_base * 1000, 3),
                                       "error_base": round(measured / (predicted_base * 1000) - 1, 4),
                                       "predicted_no_burst_ms": round(predicted_no_burst * 1000, 3),
                                       "error_no_burst": round(measured / (predicted_no_burst * 1000) - 1, 4),
                                       "predicted_b2b_edge_ms": round(predicted_b2b * 1000, 3),
                                       "error_b2b_edge": round(measured / (predicted_b2b * 1000) - 1, 4),
                                       "predicted_stages_ms": {k: round(v * 1000, 3) for k, v in stages.items()},
                                       "measured_stages_ms": measured_stages}
                                rows.append(row)
                                print(f"{link_name:10} {cls_name:15} {name:8} ({a},{b}): predicted "
                                      f"{row['predicted_ms']:9.2f} ms, measured {measured:9.2f} ms, "
                                      f"error {100 * row['error']:+6.1f}% (nominal link "
                                      f"{100 * row['error_nominal']:+6.1f}%, without fixed costs "
                                      f"{100 * row['error_base']:+6.1f}%, back-to-back edge "
                                      f"{100 * row['error_b2b_edge']:+6.1f}%, no burst "
                                      f"{100 * row['error_no_burst']:+6.1f}%)", flush=True)
                        finally:
                            edge.terminate()
                            edge.wait(timeout=30)
                finally:
                    lab.down()
    within = sum(abs(r["error"]) <= 0.10 for r in rows)
    within_nominal = sum(abs(r["error_nominal"]) <= 0.10 for r in rows)
    per_link = {}
    for link_name in args.links.split(","):
        sel = [r for r in rows if r["link"] == link_name]
        if sel:
            per_link[link_name] = {
                key: {"within_10pct": sum(abs(r[key]) <= 0.10 for r in sel), "pairs": len(sel),
                      "min": min(r[key] for r in sel), "max": max(r[key] for r in sel),
                      "median_abs": round(float(np.median([abs(r[key]) for r in sel])), 4)}
                for key in ("error", "error_nominal", "error_base", "error_b2b_edge", "error_no_burst")}
    summary = {"pairs": len(rows), "within_10pct": within, "fraction": round(within / max(len(rows), 1), 3),
               "within_10pct_nominal_link": within_nominal,
               "within_10pct_without_fixed_costs": sum(abs(r["error_base"]) <= 0.10 for r in rows),
               "within_10pct_back_to_back_edge": sum(abs(r["error_b2b_edge"]) <= 0.10 for r in rows),
               "within_10pct_no_burst": sum(abs(r["error_no_burst"]) <= 0.10 for r in rows),
               "per_link": per_link,
               "measured_links": {f"{k[0]}/{k[1]}": v for k, v in link_info.items()},
               "tail_call_ms": {name: round(prep[3].batch(args.batch).call.median * 1e3, 4)
                                for name, prep in prepared.items() if prep[3].batch(args.batch).call is not None},
               "body_call_ms": {name: round(prep[4].batch(args.batch).call.median * 1e3, 4)
                                for name, prep in prepared.items() if prep[4].batch(args.batch).call is not None},
               "loadavg_start": [round(x, 2) for x in load_start],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "median_abs_error": round(float(np.median([abs(r["error"]) for r in rows])), 4) if rows else None,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {
                   "json": str(args.json), "plot": str(args.plot)}, "host_speed_vs_pi4": host_speed}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(6, 6))
            for key in sorted({(r["link"], r["model"]) for r in rows}):
                sel = [r for r in rows if (r["link"], r["model"]) == key]
                ax.scatter([r["predicted_ms"] for r in sel], [r["measured_ms"] for r in sel], label=" / ".join(key))
            lim = [min(r["predicted_ms"] for r in rows) * 0.8, max(r["measured_ms"] for r in rows) * 1.2]
            ax.plot(lim, lim, "k-", lw=0.8)
            ax.plot(lim, [v * 1.1 for v in lim], "k:", lw=0.6)
            ax.plot(lim, [v * 0.9 for v in lim], "k:", lw=0.6)
            ax.set(xscale="log", yscale="log", xlabel="predicted e2e (ms)", ylabel="measured e2e (ms)",
                   title=f"latency model vs lab: {within}/{len(rows)} within 10%")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
