"""Training results: per-round and per-device tables (CSV and JSON), a summary, and PNG plots.

Files written into a run directory:

* ``rounds.csv`` / ``rounds.json``: one row per round: loss and accuracy (train: on the devices'
  batches of the round; test: the models the devices hold at the end of the round), time split into
  training, synchronisation (FedAvg, relay, body averaging), evaluation and checkpointing, and the
  edge's compute.
* ``devices.csv``: one row per (round, device): samples, loss, accuracy, seconds per stage of the
  U-shaped step, bytes up and down on the data plane (activations and gradients) and on the control
  plane (model state for FedAvg, relays and checkpoints).
* ``results.json``: the experiment, the final figures, wall-clock per epoch, totals per device.
* ``accuracy.png`` (test accuracy per round) and ``time_breakdown.png`` (mean seconds per round and
  stage, per device), drawn with matplotlib when it is installed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.models.weights import atomic_write_bytes
from testbed.training.experiment import ExperimentSpec

__all__ = ["STAGES", "summarise", "write_plots", "write_tables"]

#: Stages of one U-shaped step as the device sees them (see agents/train_device.py), then centralized's one.
STAGES = ("head_fwd", "up_a1", "edge_wait_fwd", "body_fwd", "down_a2", "tail", "up_g2", "edge_wait_bwd",
          "body_bwd", "down_g1", "head_bwd", "other", "compute")

ROUND_COLUMNS = ("round", "epoch", "epoch_progress", "scheme", "train_loss", "train_acc", "test_loss", "test_acc",
                 "steps", "samples", "train_s", "sync_s", "eval_s", "collect_s", "checkpoint_s", "wall_s",
                 "edge_body_fwd_s", "edge_body_bwd_s", "edge_update_s", "edge_batches", "edge_max_batch")
DEVICE_COLUMNS = ("round", "device", "split", "samples", "steps", "loss", "acc", "bytes_up", "bytes_down",
                  "control_bytes_up", "control_bytes_down", *(f"{s}_s" for s in STAGES))


def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return buf.getvalue().encode()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return ""
    return value


def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in history:
        row = {k: rec.get(k) for k in ROUND_COLUMNS}
        edge = rec.get("edge") or {}
        times = edge.get("times") or {}
        row.update(edge_body_fwd_s=times.get("body_fwd"), edge_body_bwd_s=times.get("body_bwd"),
                   edge_update_s=times.get("update"), edge_batches=edge.get("batches"),
                   edge_max_batch=edge.get("max_batch"))
        rows.append(row)
    return rows


def device_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in history:
        for dev in rec.get("devices", []):
            row = {k: dev.get(k) for k in DEVICE_COLUMNS}
            row["round"] = rec["round"]
            row["split"] = ":".join(map(str, dev["split"])) if dev.get("split") else ""
            for stage in STAGES:
                row[f"{stage}_s"] = dev.get("times", {}).get(stage)
            rows.append(row)
    return rows


def write_tables(run_dir: Path, spec: ExperimentSpec, history: list[dict[str, Any]]) -> None:
    """rounds.csv, rounds.json and devices.csv (each written atomically)."""
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / "rounds.csv", _csv(round_rows(history), ROUND_COLUMNS))
    atomic_write_bytes(run_dir / "devices.csv", _csv(device_rows(history), DEVICE_COLUMNS))
    atomic_write_bytes(run_dir / "rounds.json", json.dumps(history, indent=1).encode())


def summarise(spec: ExperimentSpec, history: list[dict[str, Any]], sizes: list[int], dataset: str,
              exported: dict[str, Any], resumed: bool = False, session_s: float | None = None,
              batch_sizes: list[int] | None = None, steps: list[int] | None = None) -> dict[str, Any]:
    """The run's summary (``results.json``)."""
    per_epoch: dict[int, float] = {}
    for rec in history:
        per_epoch[rec["epoch"]] = per_epoch.get(rec["epoch"], 0.0) + rec["train_s"]
    totals: dict[str, dict[str, Any]] = {}
    for rec in history:
        for dev in rec.get("devices", []):
            t = totals.setdefault(dev["device"], {"samples": 0, "bytes_up": 0, "bytes_down": 0,
                                                  "control_bytes_up": 0, "control_bytes_down": 0, "times": {}})
            for key in ("samples", "bytes_up", "bytes_down", "control_bytes_up", "control_bytes_down"):
                t[key] += dev.get(key) or 0
            for stage, sec in dev.get("times", {}).items():
                t["times"][stage] = t["times"].get(stage, 0.0) + sec
    last = history[-1] if history else {}
    return {
        "name": spec.name,
        "scheme": spec.scheme,
        "dataset": dataset,
        "experiment": spec.to_dict(),
        "shard_sizes": sizes,
        "batch_sizes": batch_sizes,  # the largest batch of each device
        "device_steps": steps,  # each device's steps per epoch
        "rounds": len(history),
        "final": {k: last.get(k) for k in ("test_acc", "test_loss", "train_loss", "train_acc", "test_acc_by_model")},
        "best_test_acc": max((r["test_acc"] for r in history), default=None),
        "epoch_train_s": [per_epoch[e] for e in sorted(per_epoch)],
        "train_s": sum(r["train_s"] for r in history),
        "wall_s": sum(r.get("wall_s", 0.0) for r in history),
        "devices": totals,
        "exported": exported,
        "resumed": resumed,
        "session_s": session_s,
        "history": history,
    }


def write_plots(out_dir: Path, results: Sequence[dict[str, Any]], prefix: str = "") -> list[Path]:
    """accuracy.png and time_breakdown.png for one or more runs; returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for res in results:
        rounds = [r["round"] for r in res["history"]]
        accs = [100 * r["test_acc"] for r in res["history"]]
        ax.plot(rounds, accs, marker="o", markersize=3, label=f"{res['name']} ({res['scheme']})")
    ax.set_xlabel("round (same share of an epoch in every scheme)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{prefix}accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    labels, stacks = [], []
    for res in results:
        n_rounds = max(res.get("rounds") or 1, 1)
        for dev, tot in sorted(res["devices"].items()):
            labels.append(f"{res['name']}/{dev}" if len(results) > 1 else dev)
            stacks.append({s: tot["times"].get(s, 0.0) / n_rounds for s in STAGES})
    if stacks:
        fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(labels) + 1.6))
        left = [0.0] * len(labels)
        cmap = plt.get_cmap("tab20")
        for i, stage in enumerate(STAGES):
            widths = [s[stage] for s in stacks]
            if not any(widths):
                continue
            ax.barh(labels, widths, left=left, label=stage, color=cmap(i))
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("seconds per round")
        ax.invert_yaxis()
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(labels) < 6 else -0.1))
        ax.set_title("time per stage of the U-shaped step")
        fig.tight_layout()
        path = out_dir / f"{prefix}time_breakdown.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

