"""`testbed train EXPERIMENT.yaml`: split learning (psl, sfl, sl) or the centralized reference, on loopback
or (``--lab``) with the edge and the devices inside the emulated lab's namespaces, over its shaped links."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.training.experiment import ExperimentSpec, load_experiment

if TYPE_CHECKING:
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
    console = Console()
    console.print(_describe(spec), highlight=False)
    if check:
        console.print(f"{experiment}: valid")
        return
    if resume and fresh:
        raise typer.BadParameter("--resume and --fresh exclude each other")
    placement = lab_placement(lab_prefix, lab_state_dir) if lab and spec.scheme != "centralized" else None
    if placement is not None:
        console.print(f"agents in {placement.description}", highlight=False)
    out = run_dir or Path("runs") / spec.name
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("preparing", total=None, info="")

        def on_event(kind: str, **info: Any) -> None:
            if kind == "prepared":
                progress.update(task, description=f"{spec.name}: rounds", total=info["total"],
                                completed=info["start"], info=f"shards {min(info['sizes'])}..{max(info['sizes'])}")
            elif kind == "round_done":
                rec = info["record"]
                progress.update(task, completed=info["round"],
                                info=f"loss {rec['train_loss']:.3f} · test acc {100 * rec['test_acc']:.2f}%")
            elif kind == "exported":
                progress.update(task, info=progress.tasks[0].fields["info"] + " · exported")

        results = run_experiment(spec, out, resume=resume, fresh=fresh, on_event=on_event, placement=placement)
    render(results, console)
    console.print(f"outputs in {out}/ (rounds.csv, devices.csv, results.json, *.png, export/)")
