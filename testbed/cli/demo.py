"""`testbed demo`: the U-shaped split inference demo on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.demo import STAGES, DemoConfig, Placement, run_demo
from testbed.errors import TestbedError
from testbed.training.centralized import TrainConfig


def lab_placement(prefix: str, state_dir: Path | None = None) -> Placement:
    """Edge and agents in the lab's namespaces (and the devices' CPU quotas), over the shaped links."""
    from testbed.lab.devices import host_speed_vs_pi4, load_device_class, slowdown
    from testbed.lab.lab import Lab
    from testbed.lab.state import StateStore

    lab = Lab(StateStore(state_dir) if state_dir else StateStore(), prefix)
    state = lab.require_state()
    topo = state.topology
    agent_args: dict[str, list[str]] = {}
    for dev in topo.devices:
        if dev.device_class:
            factor = slowdown(load_device_class(dev.device_class), host_speed_vs_pi4())
            agent_args[dev.name] = ["--slowdown", f"{max(1.0, factor):.4f}"]
    return Placement(
        edge_bind=f"tcp://{topo.edge.address}:*",
        wrap=lambda host, argv: lab.command_in(host, argv),
        max_devices=len(topo.devices),
        agent_args=agent_args,
        description=f"lab {topo.prefix}, link {topo.link_profile}, backend {topo.backend}"
                    + (f", class {topo.devices[0].device_class}" if topo.devices[0].device_class else ""),
    )


def _parse_split(text: str) -> tuple[int, int]:
    try:
        a, b = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise TestbedError(f"--split expects A:B with integers, got {text!r}") from exc
    return a, b


def render(report: dict[str, Any], console: Console) -> None:
    """One column per device, one row per stage, so the table fits a terminal for a handful of devices."""
    devices = report["devices"]
    table = Table(title=f"U-shaped split inference: {report['model']} on {report['dataset']}, "
                        f"batch {report['batch_size']} (latency in ms, p50 / p95)")
    table.add_column("stage")
    for dev in devices:
        table.add_column(f"{dev['device']} split {dev['split'][0]}:{dev['split'][1]}", justify="right")
    for stage in STAGES:
        table.add_row(stage, *(f"{d['stages'][stage]['p50_ms']:.2f} / {d['stages'][stage]['p95_ms']:.2f}"
                               for d in devices))
    table.add_row("end to end", *(f"{d['e2e']['p50_ms']:.2f} / {d['e2e']['p95_ms']:.2f}" for d in devices),
                  style="bold")
    table.add_row("requests/s", *(f"{d['throughput_rps']:.1f}" for d in devices))
    table.add_row("accuracy", *(f"{d['accuracy']:.4f}" for d in devices))
    table.add_row("unsplit model", *(f"{d['reference_accuracy']:.4f}" for d in devices))
    console.print(table)
    same = all(d["accuracy"] == d["reference_accuracy"] for d in devices)
    verdict = "[green]equal[/green]" if same else "[red]DIFFERENT[/red]"
    console.print(f"accuracy through the split pipeline {report['accuracy']:.4f}; "
                  f"unsplit model on the same images {report['reference_accuracy']:.4f}: {verdict}")


def demo(
    devices: Annotated[int, typer.Option(min=1, max=64, help="number of device agents")] = 3,
    split: Annotated[list[str] | None, typer.Option(help="A:B per device (repeat); default: spread")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per request")] = 10,
    limit: Annotated[int | None, typer.Option(min=1, help="classify only the first N test images")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs (the result is cached)")] = 2,
    train_samples: Annotated[int | None, typer.Option(min=1, help="train on the first N images only")] = None,
    dataset: Annotated[str, typer.Option(help="auto, fashion-mnist or digits")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="trained weights and ONNX files")] = None,
    run_dir: Annotated[Path, typer.Option(help="logs, device data and results of this run")] = Path("runs/demo"),
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
    lab: Annotated[bool, typer.Option("--lab", help="run the edge and the agents inside the emulated lab")] = False,
    lab_prefix: Annotated[str, typer.Option(help="prefix of the lab to use with --lab")] = "tb",
    lab_state_dir: Annotated[Path | None, typer.Option(help="where that lab's record is kept")] = None,
) -> None:
    """Train (once) a small CNN, then classify the test set through head (ONNX) -> body (torch) -> tail (ONNX)."""
    config = DemoConfig(
        devices=devices,
        dataset=dataset,
        batch_size=batch_size,
        limit=limit,
        splits=tuple(_parse_split(s) for s in split) if split else None,
        train=TrainConfig(epochs=epochs, max_train_samples=train_samples),
        run_dir=run_dir,
        **({"cache_dir": cache_dir} if cache_dir else {}),
    )
    console = Console()
    placement = lab_placement(lab_prefix, lab_state_dir) if lab else None
    report = run_demo(config, say=lambda line: console.print(line, highlight=False), placement=placement)
    render(report, console)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_path}")
    if any(d["accuracy"] != d["reference_accuracy"] for d in report["devices"]):
        raise typer.Exit(1)
