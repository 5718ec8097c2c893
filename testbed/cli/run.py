"""`testbed run EXPERIMENT.yaml`: a whole experiment (plan, deploy, workload, re-split, results) with a live view."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def _table(p: Any) -> Group:  # p: testbed.controller.run.Progress
    total = f" / {p.duration_s:.0f} s" if p.duration_s else " s"
    table = Table(title=f"{p.phase}: {p.elapsed_s:.0f}{total}, {p.replans} re-plan(s)", title_justify="left")
    for col in ("device", "health", "split", "p50 e2e", "requests", "failed"):
        table.add_column(col, justify="left" if col in ("device", "health") else "right")
    for d in p.devices:
        table.add_row(d.device, "up" if d.up else "[red]DOWN[/red]", "{}:{}".format(*d.split) if d.split else "-",
                      f"{d.p50_ms:.2f} ms" if d.p50_ms is not None else "-", str(d.requests),
                      f"[red]{d.failed}[/red]" if d.failed else "0")
    return Group(table, Text(f"planner: {p.reason}" if p.reason else "", overflow="ellipsis", no_wrap=True))


def render_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['name']}: end-to-end latency (ms)")
    for col in ("device", "requests", "failed", "p50", "p99", "partitions"):
        table.add_column(col)
    for d, s in summary["devices"].items():
        table.add_row(d, str(s["requests"]), str(s["failed"]), _ms(s["p50_ms"]), _ms(s["p99_ms"]),
                      ", ".join(f"{':'.join(k.rsplit(':', 2)[1:])} x{n}" for k, n in s["by_partition"].items()))
    console.print(table)
    for c in summary["link_changes"]:
        line = (f"t={c['t_s']:.1f} s {c['device']} link -> {c['link']}: p50 before {_ms(c['before']['p50_ms'])} ms, "
                f"after {_ms(c['after']['p50_ms'])} ms")
        if c["resplit_s"] is not None:
            line += (f"; split -> {c['split']} {c['resplit_s']:.1f} s later, recovered "
                     f"{_ms(c['recovered']['p50_ms'])} ms")
        else:
            line += "; split unchanged"
        console.print(line, highlight=False)
    console.print(f"{summary['requests']} requests, {summary['failed']} failed, {summary['replans']} re-plan(s)",
                  highlight=False)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run(
    experiment: Annotated[Path, typer.Argument(help="the experiment file (docs/resplitting.md lists every key)")],
    output: Annotated[Path | None, typer.Option(help="results directory (default: the file's output)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON, no live view")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="trained weights and ONNX partitions")] = None,
    lab_state_dir: Annotated[Path | None, typer.Option(help="where the lab's record is kept")] = None,
    inventory: Annotated[Path | None, typer.Option(help="run on the real hosts of this Ansible inventory (edge and "
                                                        "devices over SSH): placement: {kind: inventory}")] = None,
    probe_interval_s: Annotated[float | None, typer.Option(
        help="device agents probe their link to the edge this often while they send (0: never); "
             "default: the experiment's planner.probe_interval")] = None,
) -> None:
    """Run an experiment: plan, deploy, send requests, re-split when links change; results in the output dir."""
    from testbed.controller.run import run_experiment
    from testbed.controller.runspec import load_runspec

    spec = load_runspec(experiment)  # every problem of the file, before anything starts
    if output is not None:
        spec = dataclasses.replace(spec, output=output)
    if inventory is not None:
        from testbed.controller.runspec import PlacementSpec

        if not inventory.is_file():
            from testbed.remote.errors import InventoryError

            raise InventoryError(f"--inventory {inventory}: no such file")
        spec = dataclasses.replace(spec, placement=PlacementSpec("inventory", inventory=inventory))
    console = Console(stderr=as_json)
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "state_dir": lab_state_dir, "probe_interval_s": probe_interval_s,
                              "say": lambda line: console.print(line, highlight=False)}
    if as_json or not console.is_terminal:
        summary = run_experiment(spec, **kwargs)
    else:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            summary = run_experiment(spec, progress=lambda p: live.update(_table(p)), **kwargs)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        render_summary(summary, console)
        console.print(f"results in {spec.output}: requests.csv, decisions.jsonl, summary.json, latency.png",
                      highlight=False)
    if summary["failed"]:
        raise typer.Exit(1)
