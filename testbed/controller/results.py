"""A run's results (pure except the writers): per-request rows, the summary, the CSV and the latency plot.

Times are seconds since the workloads started (wall clock: device records carry the wall time at which each
request started; the controller stamps link changes and re-splits the same way). The summary cuts every
device's requests at the run's link changes and at its own split changes, so the figures the experiment is
about — latency before a link change, between the change and the re-split, and after it (recovered) — are read
off directly.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("head", "uplink", "queue", "body", "downlink", "tail", "e2e")


@dataclass(frozen=True)
class Row:
    t_s: float
    device: str
    partition: str
    a: int
    b: int
    ok: bool
    stages_ms: Mapping[str, float]
    error: str = ""

    @property
    def e2e_ms(self) -> float:
        return float(self.stages_ms.get("e2e", math.nan))


@dataclass(frozen=True)
class Event:
    """A link change (``kind`` "link": ``detail`` the new profile) or a split change ("split": ``detail``
    "a:b", ``reason`` why) at ``t_s``."""

    t_s: float
    kind: str
    device: str
    detail: str
    reason: str = ""


def _split(partition: str) -> tuple[int, int]:
    try:
        _, a, b = partition.rsplit(":", 2)
        return int(a), int(b)
    except (ValueError, AttributeError):
        return -1, -1


def rows_from_reports(reports: Mapping[str, Mapping[str, Any]], t0_wall: float) -> list[Row]:
    """Every request record of every device's report (``report(requests=True)``), by time."""
    rows = []
    for device, report in reports.items():
        for rec in report.get("records", []):
            partition = str(rec.get("partition", ""))
            rows.append(Row(round(float(rec.get("t_s", t0_wall)) - t0_wall, 6), device, partition,
                            *_split(partition), bool(rec.get("ok")), dict(rec.get("stages_ms", {})),
                            str(rec.get("error", ""))))
    return sorted(rows, key=lambda r: (r.t_s, r.device))


def write_requests_csv(rows: Iterable[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "device", "partition", "a", "b", "ok", *(f"{s}_ms" for s in STAGES), "error"])
        for r in rows:
            w.writerow([f"{r.t_s:.6f}", r.device, r.partition, r.a, r.b, int(r.ok),
                        *(r.stages_ms.get(s, "") for s in STAGES), r.error])


def write_jsonl(items: Iterable[Mapping[str, Any]], path: Path) -> None:
    with path.open("w") as f:
        for item in items:
            f.write(json.dumps(item, sort_keys=True) + "\n")


def latency(rows: Sequence[Row]) -> dict[str, Any]:
    """Count, failures and e2e p50/p99 (ms) of some requests."""
    ok = np.array([r.e2e_ms for r in rows if r.ok], dtype=float)
    out: dict[str, Any] = {"requests": len(rows), "failed": sum(not r.ok for r in rows)}
    if ok.size:
        out.update(p50_ms=round(float(np.percentile(ok, 50)), 3), p99_ms=round(float(np.percentile(ok, 99)), 3))
    else:
        out.update(p50_ms=None, p99_ms=None)
    return out


def _between(rows: Sequence[Row], device: str, start: float, end: float) -> list[Row]:
    return [r for r in rows if r.device == device and start <= r.t_s < end]


def segments(rows: Sequence[Row], events: Sequence[Event], device: str, end_s: float) -> list[dict[str, Any]]:
    """The device's requests cut at every link change of the run and at its own split changes."""
    cuts = sorted({0.0, *(e.t_s for e in events if e.kind == "link" or e.device == device)})
    cuts = [c for c in cuts if c < end_s] + [end_s]
    out = []
    for start, stop in itertools.pairwise(cuts):
        part = _between(rows, device, start, stop)
        splits = sorted({f"{r.a}:{r.b}" for r in part})
        out.append({"from_s": round(start, 3), "to_s": round(stop, 3), "splits": splits, **latency(part)})
    return out


def link_change_figures(rows: Sequence[Row], events: Sequence[Event], end_s: float,
                        settle_s: float = 2.0) -> list[dict[str, Any]]:
    """For each link change: the device's latency before it, until its re-split, and after (recovered), and the
    time from the change to the re-split (None if its split did not move before the next change or the end)."""
    links = [e for e in events if e.kind == "link"]
    out = []
    for i, change in enumerate(links):
        nxt = min([e.t_s for e in links[i + 1:] if e.device == change.device] + [end_s])
        prev = max([e.t_s for e in links[:i] if e.device == change.device] + [0.0])
        resplit = next((e for e in events if e.kind == "split" and e.device == change.device
                        and change.t_s <= e.t_s < nxt), None)
        fig: dict[str, Any] = {"t_s": change.t_s, "device": change.device, "link": change.detail,
                               "before": latency(_between(rows, change.device, prev, change.t_s))}
        if resplit is None:
            fig.update(resplit_s=None, split=None, after=latency(_between(rows, change.device, change.t_s, nxt)))
        else:
            fig.update(resplit_s=round(resplit.t_s - change.t_s, 3), split=resplit.detail,
                       after=latency(_between(rows, change.device, change.t_s, resplit.t_s)),
                       recovered=latency(_between(rows, change.device, resplit.t_s + settle_s, nxt)))
        others = {}
        for device in sorted({r.device for r in rows} - {change.device}):
            others[device] = {"before": latency(_between(rows, device, prev, change.t_s)),
                              "after": latency(_between(rows, device, change.t_s, nxt))}
        fig["other_devices"] = others
        out.append(fig)
    return out


def summarize(rows: Sequence[Row], events: Sequence[Event], devices: Sequence[str], end_s: float,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    per_device = {}
    for d in devices:
        mine = [r for r in rows if r.device == d]
        per_device[d] = {**latency(mine), "by_partition": _count(r.partition for r in mine),
                         "segments": segments(rows, events, d, end_s)}
    return {
        **extra,
        "duration_s": round(end_s, 3),
        "requests": len(rows),
        "failed": sum(not r.ok for r in rows),
        "devices": per_device,
        "splits_over_time": [asdict(e) for e in events if e.kind == "split"],
        "link_changes": link_change_figures(rows, events, end_s),
    }


def decision_record(decision: Any, t: float) -> dict[str, Any]:
    """One evaluation (a testbed.controller.replan.Decision) as a decisions.jsonl record."""
    def num(x: float) -> float | None:
        return round(x, 6) if math.isfinite(x) else None

    return {"t_s": t, "event": "evaluation", "replan": decision.replan, "reason": decision.reason,
            "current_round_s": num(decision.current_round_s), "fresh_round_s": num(decision.fresh_round_s),
            "changed": list(decision.changed), "streak": decision.streak,
            "plan": {d.device: {"split": [d.a, d.b], "share": round(d.share, 6), "predicted_ms": num(d.total_s * 1e3)}
                     for d in decision.plan.devices}}


def estimates_record(links: Mapping[str, Any], speeds: Mapping[str, Any], edge_speed: Any) -> dict[str, Any]:
    """The live estimates an evaluation saw (LinkEstimate / ComputeEstimate values), compact, for decisions.jsonl."""
    def num(x: float | None, scale: float = 1.0, digits: int = 3) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x * scale, digits)

    out: dict[str, Any] = {}
    for device, link in links.items():
        speed = speeds.get(device)
        out[device] = {"up_mbps": num(link.uplink_bps, 1e-6), "down_mbps": num(link.downlink_bps, 1e-6),
                       "delay_ms": num(link.delay_s, 1e3, 4), "delay_source": link.delay_source,
                       "samples": link.samples, "rtt_samples": link.rtt_samples,
                       "speed": num(speed.speed if speed is not None else None)}
    out["edge_speed"] = num(edge_speed.speed)
    return out


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def plot(rows: Sequence[Row], events: Sequence[Event], devices: Sequence[str], path: Path, title: str) -> None:
    """End-to-end latency over time per device (log scale), link changes and re-splits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    start = {e.device: e.detail for e in events if e.kind == "split" and e.t_s == 0.0}
    for i, d in enumerate(devices):
        mine = [r for r in rows if r.device == d and r.ok]
        label = f"{d} (split {start[d]} at the start)" if d in start else d
        ax.scatter([r.t_s for r in mine], [r.e2e_ms for r in mine], s=4, color=colors[i % len(colors)], label=label,
                   alpha=0.7)
        bad = [r for r in rows if r.device == d and not r.ok]
        if bad:
            ax.scatter([r.t_s for r in bad], [1.0] * len(bad), marker="x", color="red", label=f"{d} failed")
    for e in events:
        if e.kind == "link":
            ax.axvline(e.t_s, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"{e.device} link -> {e.detail}", (e.t_s, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8)
        elif e.kind == "split" and e.t_s > 0.0:
            c = colors[list(devices).index(e.device) % len(colors)] if e.device in devices else "grey"
            ax.axvline(e.t_s, color=c, linestyle=":", linewidth=1.5)
            ax.annotate(f"{e.device} split -> {e.detail}", (e.t_s, 0.93), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color=c)
    ax.set_yscale("log")
    ax.set_xlabel("time since the workload started (s)")
    ax.set_ylabel("end-to-end latency per request (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
