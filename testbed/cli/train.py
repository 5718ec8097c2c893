"""`testbed train EXPERIMENT.yaml`: split learning (psl, sfl, sl) or the centralized reference, on loopback
or (``--lab``) with the edge and the devices inside the emulated lab's namespaces, over its shaped links."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.training.experiment import ExperimentSpec, load_experiment

if TYPE_CHECKING:
    from testbed.metrics.exporter import Exporter
    from testbed.training.monitor import TrainingMonitor
    from testbed.training.runners import Placement


def lab_placement(prefix: str, state_dir: Path | None = None) -> Placement:
    """The edge and each device trainer in its lab host's namespace (and CPU quota): the data plane runs over
    the shaped links to the edge's lab address; the control plane over a Unix socket (not shaped)."""
    from testbed.cli.demo import lab_placement as demo_lab_placement
    from testbed.training.runners import Placement

    lab = demo_lab_placement(prefix, state_dir)  # the lab's hosts, wrapper and edge address
    return Placement(wrap=lab.wrap, edge_bind=lab.edge_bind, control_ipc=True, max_devices=lab.max_devices,
                     description=lab.description)


def _describe(spec: ExperimentSpec) -> str:
    t = spec.training
    what = f"{spec.scheme} · {spec.model.name} on {spec.data.dataset}"
    if spec.scheme != "centralized":
        splits = sorted(set(spec.splits))
        split_text = f"{splits[0][0]}:{splits[0][1]}" if len(splits) == 1 else "per device"
        part = spec.data.partition + (f" α={spec.data.alpha}" if spec.data.partition == "dirichlet" else "")
        what += f" · {spec.devices} devices, {part}, split {split_text}"
        if spec.scheme == "psl":
            what += f", FedAvg every {t.fedavg_every} steps" if t.fedavg_every else ", no FedAvg"
            what += f", {t.mode}"
    return (f"{what} · {t.optimizer} lr={t.lr} batch {t.batch_size} · {t.epochs} epoch(s) × "
            f"{t.rounds_per_epoch} rounds · seed {t.seed}")


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{results['name']}: {results['scheme']} on {results['dataset']}")
    for col in ("round", "epoch", "train loss", "train acc", "test acc", "train s", "sync s"):
        table.add_column(col, justify="right")
    for r in results["history"]:
        table.add_row(str(r["round"]), f"{r['epoch_progress']:.2f}", f"{r['train_loss']:.4f}",
                      f"{100 * r['train_acc']:.2f}%", f"{100 * r['test_acc']:.2f}%", f"{r['train_s']:.2f}",
                      f"{r.get('sync_s', 0.0):.2f}")
    console.print(table)
    if results["scheme"] != "centralized":
        dev = Table(title="per device, whole run")
        for col in ("device", "samples", "up (MB)", "down (MB)", "control up/down (MB)"):
            dev.add_column(col, justify="right")
        for name, tot in results["devices"].items():
            dev.add_row(name, str(tot["samples"]), f"{tot['bytes_up'] / 1e6:.1f}", f"{tot['bytes_down'] / 1e6:.1f}",
                        f"{tot['control_bytes_up'] / 1e6:.1f} / {tot['control_bytes_down'] / 1e6:.1f}")
        console.print(dev)
    epochs = ", ".join(f"{s:.1f}" for s in results["epoch_train_s"])
    console.print(f"final test accuracy {100 * results['final']['test_acc']:.2f}%; training wall-clock per epoch: "
                  f"{epochs} s")


OUTPUTS = ("rounds.csv", "rounds.json", "devices.csv", "results.json", "accuracy.png", "time_breakdown.png",
           "checkpoint.safetensors", "export/models.json")


def summary_json(results: dict[str, Any], run_dir: Path, metrics_url: str | None = None) -> dict[str, Any]:
    """What `--json` prints: the final figures, the per-round test accuracy and where every output is."""
    outputs = {name: str(run_dir / name) for name in OUTPUTS if (run_dir / name).exists()}
    return {
        "name": results["name"],
        "scheme": results["scheme"],
        "dataset": results["dataset"],
        "run_dir": str(run_dir),
        "rounds": results["rounds"],
        "resumed": results["resumed"],
        "final_test_acc": results["final"]["test_acc"],
        "final": results["final"],
        "best_test_acc": results["best_test_acc"],
        "test_acc_by_round": [r["test_acc"] for r in results["history"]],
        "train_loss_by_round": [r["train_loss"] for r in results["history"]],
        "epoch_train_s": results["epoch_train_s"],
        "train_s": results["train_s"],
        "wall_s": results["wall_s"],
        "devices": results["devices"],
        "outputs": outputs,
        "exported": results["exported"],
        "metrics_url": metrics_url,
    }


def _hold(seconds: float) -> None:
    """Keep the process (and its metrics endpoint) up `seconds`, or until SIGTERM/SIGINT: a normal end."""
    if seconds <= 0:
        return
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        stop.wait(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_metrics(spec: ExperimentSpec, port: int, bind: str) -> tuple[TrainingMonitor, Exporter]:
    """The run's registry (build info, process, controller and training collectors) served on bind:port."""
    import numpy as np
    import torch
    from prometheus_client import CollectorRegistry

    from testbed.metrics.common import register_build_info, register_process_metrics
    from testbed.metrics.exporter import start_exporter
    from testbed.training.monitor import TrainingMonitor

    registry = CollectorRegistry()
    register_build_info(registry, "trainer", {"torch": torch.__version__, "numpy": np.__version__})
    register_process_metrics(registry)
    monitor = TrainingMonitor(spec)
    monitor.register(registry)
    return monitor, start_exporter(registry, bind, port)


def train(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML (see experiments/ and docs/training.md)")],
    run_dir: Annotated[Path | None, typer.Option(help="outputs and checkpoints; default runs/<experiment name>")]
    = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run directory's last checkpoint")]
    = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard a previous run in the run directory")] = False,
    check: Annotated[bool, typer.Option("--check", help="only validate the experiment file")] = False,
    lab: Annotated[bool, typer.Option("--lab", help="run the edge and the devices inside the emulated lab")] = False,
    lab_prefix: Annotated[str, typer.Option(help="prefix of the lab to use with --lab")] = "tb",
    lab_state_dir: Annotated[Path | None, typer.Option(help="where that lab's record is kept")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve the run's Prometheus metrics on this port "
                                                          "(0: a free one; see docs/metrics.md)")] = None,
    metrics_bind: Annotated[str, typer.Option(help="address of the metrics endpoint (the one Prometheus "
                                                   "reaches)")] = "127.0.0.1",
    metrics_hold_s: Annotated[float, typer.Option(help="after the run, keep the metrics endpoint up this long "
                                                       "(or until SIGTERM/Ctrl-C) so its final values are "
                                                       "scraped")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout, no progress "
                                                         "display")] = False,
) -> None:
    """Train a model across devices and an edge server (U-shaped PSL, SFL, vanilla SL) or centrally.

    Starts the edge and one trainer per device as processes on loopback (or, with --lab, in the lab's
    namespaces: `testbed lab up` first; one lab device per experiment device), checkpoints every round
    (`--resume` continues after a crash), and writes rounds.csv, devices.csv, rounds.json,
    results.json, accuracy.png and time_breakdown.png into the run directory, and the trained
    models (weights, ONNX heads and tails) into its export/ folder.
    """
    from testbed.training.schemes import run_experiment

    spec = load_experiment(experiment)  # every check on the file happens before anything starts
    console = Console(stderr=as_json)
    if not as_json:
        console.print(_describe(spec), highlight=False)
    if check:
        if as_json:
            typer.echo(json.dumps({"experiment": str(experiment), "valid": True, "description": _describe(spec),
                                   "spec": spec.to_dict()}, indent=2))
        else:
            console.print(f"{experiment}: valid")
        return
    if resume and fresh:
        raise typer.BadParameter("--resume and --fresh exclude each other")
    if not 0.0 <= metrics_hold_s <= 86400.0:
        raise typer.BadParameter("--metrics-hold-s must be between 0 and 86400")
    if metrics_hold_s and metrics_port is None:
        raise typer.BadParameter("--metrics-hold-s needs --metrics-port")
    placement = lab_placement(lab_prefix, lab_state_dir) if lab and spec.scheme != "centralized" else None
    if placement is not None:
        console.print(f"agents in {placement.description}", highlight=False)
    out = run_dir or Path("runs") / spec.name
    monitor, exporter = _start_metrics(spec, metrics_port, metrics_bind) if metrics_port is not None else (None, None)
    try:
        if exporter is not None:
            console.print(f"metrics on {exporter.url}", highlight=False)
        if as_json:
            results = run_experiment(spec, out, resume=resume, fresh=fresh, placement=placement,
                                     on_event=monitor.on_event if monitor is not None else None)
            typer.echo(json.dumps(summary_json(results, out, exporter.url if exporter else None), indent=2))
        else:
            results = _run_with_progress(spec, out, console, run_experiment, monitor, resume=resume, fresh=fresh,
                                         placement=placement)
            render(results, console)
            console.print(f"outputs in {out}/ (rounds.csv, devices.csv, results.json, *.png, export/)")
        if exporter is not None:
            sys.stdout.flush()
            _hold(metrics_hold_s)
    finally:
        if exporter is not None:
            exporter.close()


def _run_with_progress(spec: ExperimentSpec, out: Path, console: Console, run_experiment: Any,
                       monitor: TrainingMonitor | None, **kwargs: Any) -> dict[str, Any]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("preparing", total=None, info="")

        def on_event(kind: str, **info: Any) -> None:
            if monitor is not None:
                monitor.on_event(kind, **info)
            if kind == "prepared":
                progress.update(task, description=f"{spec.name}: rounds", total=info["total"],
                                completed=info["start"], info=f"shards {min(info['sizes'])}..{max(info['sizes'])}")
            elif kind == "round_done":
                rec = info["record"]
                progress.update(task, completed=info["round"],
                                info=f"loss {rec['train_loss']:.3f} · test acc {100 * rec['test_acc']:.2f}%")
            elif kind == "exported":
                progress.update(task, info=progress.tasks[0].fields["info"] + " · exported")

        return run_experiment(spec, out, on_event=on_event, **kwargs)
