"""`testbed profile`: measure a model block by block (and optionally the link to an edge); save the profiles."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.planning.instances import parse_bytes
from testbed.profiling.records import RUNTIMES, BlockProfile, LinkMeasurement, ProfileError
from testbed.profiling.store import default_link_path, default_profile_path, profile_to_dict, save_profile

#: ``--idle-ms`` by default: the wait a served call sees (docs/profiling.md, "Served timings").
IDLE_MS = 0.0


def _progress(console: Console, quiet: bool = False) -> Progress:
    """A transient bar; ``quiet`` (--json) keeps the same calls but draws nothing."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=quiet)


def _load_model(model: str | None, config: str | None, weights: Path | None, seed: int) -> tuple[Any, str | None]:
    """(BlockModel, weights hash or None for random weights)."""
    import torch

    from testbed.models import build_model, load_weights

    if weights is not None:
        if config is not None:
            raise ProfileError("--config and --weights exclude each other: the weights file names its config")
        net, digest = load_weights(weights)
        if model is not None and model != net.name:
            raise ProfileError(f"--model {model} but {weights} holds a {net.name!r} model")
        return net, digest
    cfg: dict[str, Any] = {}
    if config:
        try:
            cfg = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"--config must be a JSON object, e.g. '{{\"batch_norm\": true}}': {exc}") from None
        if not isinstance(cfg, dict):
            raise ProfileError("--config must be a JSON object, e.g. '{\"batch_norm\": true}'")
    torch.manual_seed(seed)
    return build_model(model or "cnn", **cfg), None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _cell(stat: Any) -> str:
    """Median ms and the half-width of p10..p90 relative to it (the p90 itself for a median under 1 µs)."""
    if stat.median < 1e-6:  # below a microsecond a relative spread says nothing
        return f"{_ms(stat.median)} (p90 {_ms(stat.p90)})"
    half = (stat.p90 - stat.p10) / 2 / stat.median * 100
    return f"{_ms(stat.median)} ±{half:.0f}%"


def render_blocks(profile: BlockProfile, console: Console) -> None:
    """One row per block: output activation, parameters, and per batch size the median ms ± half the p10-p90
    range (in % of the median)."""
    title = (f"{profile.model} on {profile.runtime} ({profile.device}, {profile.threads} thread(s), "
             f"method {profile.method}{', training' if profile.training else ''}): median ms ±(p90-p10)/2")
    table = Table(title=title)
    table.add_column("block", justify="right")
    table.add_column("output", justify="right")
    table.add_column("KiB/sample", justify="right")
    table.add_column("params KiB", justify="right")
    for b in profile.batches:
        table.add_column(f"fwd b={b.batch_size}", justify="right")
        if b.bwd is not None:
            table.add_column(f"bwd b={b.batch_size}", justify="right")
    act = profile.act_bytes_per_sample
    for i in range(profile.num_blocks):
        cells = [str(i), "x".join(map(str, profile.act_shapes[i + 1])), f"{act[i + 1] / 1024:.2f}",
                 f"{profile.param_bytes[i] / 1024:.1f}"]
        for b in profile.batches:
            cells.append(_cell(b.fwd[i]))
            if b.bwd is not None:
                cells.append(_cell(b.bwd[i]))
        table.add_row(*cells)
    sums = ["sum", "", f"{act[0] / 1024:.2f} in", f"{sum(profile.param_bytes) / 1024:.1f}"]
    whole = ["model", "", "", ""]
    for b in profile.batches:
        sums.append(_ms(math.fsum(b.fwd_s)))
        whole.append(_cell(b.model_fwd))
        if b.bwd is not None and b.model_bwd is not None:
            sums.append(_ms(math.fsum(b.bwd_s)))
            whole.append(_cell(b.model_bwd))
    table.add_row(*sums, style="bold")
    table.add_row(*whole)
    console.print(table)
    console.print("sum: the per-block medians added up; model: the whole model timed in one run")


def render_link(link: LinkMeasurement, console: Console) -> None:
    table = Table(title=f"link to {link.endpoint} (downlink method: {link.downlink_method})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("round trip, empty (median, p10-p90)",
                  f"{_ms(link.rtt.median)} ms ({_ms(link.rtt.p10)}-{_ms(link.rtt.p90)})")
    table.add_row("one-way delay for the planner", f"{_ms(link.delay_s)} ms")
    table.add_row("uplink", f"{link.uplink_bps / 1e6:.1f} Mbit/s")
    table.add_row("downlink", "not measured" if link.downlink_bps is None else f"{link.downlink_bps / 1e6:.1f} Mbit/s")
    if link.request_rtt is None or link.request_echo_rtt is None or link.edge_request_s is None:
        table.add_row("edge request handling (beyond an echo)", "not measured")
    else:
        table.add_row("edge request handling (beyond an echo)",
                      f"{_ms(link.edge_request_s)} ms ({link.request_bytes} bytes: empty-body request "
                      f"{_ms(link.request_rtt.median)} ms, PING echo {_ms(link.request_echo_rtt.median)} ms)")
    for k, size in enumerate(link.sizes):
        row = f"{_ms(link.uplink_rtt[k].median)} ms up"
        if link.echo_rtt is not None:
            row += f", {_ms(link.echo_rtt[k].median)} ms echo"
        table.add_row(f"{size} bytes", row)
    console.print(table)
    if link.notes:
        console.print(f"[yellow]note:[/yellow] {link.notes}")


def profile(
    model: Annotated[str | None, typer.Option(help="zoo model name (default cnn, or the one in --weights)")] = None,
    config: Annotated[str | None, typer.Option(help="model config as JSON, e.g. '{\"batch_norm\": true}'")] = None,
    weights: Annotated[Path | None, typer.Option(help="weights file (.safetensors); default: random weights, "
                                                      "which time the same")] = None,
    batch_size: Annotated[list[int] | None, typer.Option("--batch-size", "-b", help="repeatable; default 1")] = None,
    runtime: Annotated[str, typer.Option(help=f"{' or '.join(RUNTIMES)} (device inference: onnxruntime; "
                                              "training and the edge body: torch)")] = "onnxruntime",
    method: Annotated[str | None, typer.Option(help="onnxruntime: prefix (default) or block; torch: block")] = None,
    device: Annotated[str, typer.Option(help="torch device: auto, cpu, cuda, cuda:N")] = "auto",
    training: Annotated[bool, typer.Option("--training/--no-training", help="also time backward (torch)")] = False,
    repeats: Annotated[int, typer.Option(min=1, max=100_000, help="timed repeats per batch size")] = 50,
    warmup: Annotated[int, typer.Option(min=0, max=100_000, help="untimed repeats first")] = 10,
    threads: Annotated[int, typer.Option(min=1, max=1024, help="intra-op threads (torch and onnxruntime)")] = 1,
    idle_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help="idle wait before every timed call, as "
                                                                     "served work waits for the network (0: back "
                                                                     "to back; inference only)")] = IDLE_MS,
    device_class: Annotated[str | None, typer.Option(help="the class of this machine when it is a real device "
                                                          "(profiles/devices/NAME.yaml); default: this host's "
                                                          "estimate")] = None,
    out: Annotated[Path | None, typer.Option(help="block profile path (default profiles/measured/"
                                                  "<host>-<model>-<runtime>.yaml)")] = None,
    blocks: Annotated[bool, typer.Option("--blocks/--no-blocks", help="profile the blocks (--no-blocks: "
                                                                      "the link only)")] = True,
    edge: Annotated[str | None, typer.Option(help="also measure the link to this edge endpoint "
                                                  "(tcp://HOST:PORT)")] = None,
    link_size: Annotated[list[str] | None, typer.Option("--link-size", help="probe payload size, repeatable; "
                                                                            "default 64KiB, 1MiB, 4MiB")] = None,
    link_count: Annotated[int, typer.Option(min=3, max=100_000, help="timed rounds of link probes")] = 20,
    link_timeout: Annotated[float, typer.Option(min=0.01, help="seconds to wait for one reply")] = 5.0,
    link_budget: Annotated[float, typer.Option(min=0.1, help="seconds for the whole link measurement")] = 60.0,
    link_out: Annotated[Path | None, typer.Option(help="link measurement path (default profiles/measured/"
                                                       "<host>-link-<endpoint>.yaml)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print what was measured and the files written as one "
                                                         "JSON document on stdout, no progress bar")] = False,
) -> None:
    """Measure per-block forward (and backward) times and activation sizes; optionally the link to an edge."""
    console = Console(stderr=as_json)
    report: dict[str, Any] = {}
    if not blocks and edge is None:
        raise ProfileError("nothing to do: --no-blocks without --edge")
    sizes = [parse_bytes(s, "--link-size") for s in (link_size or ["64KiB", "1MiB", "4MiB"])]
    from testbed.profiling.blocks import profile_blocks, reference_speed

    speed, source = reference_speed(device_class)
    net, digest = _load_model(model, config, weights, seed)
    if blocks:
        with _progress(console, as_json) as bar:
            task = bar.add_task(f"profiling {net.name} on {runtime}", total=None)
            prof = profile_blocks(
                net, batch_size or [1], runtime=runtime, training=training, repeats=repeats, warmup=warmup,
                threads=threads, device=device, method=method, weights_hash=digest, speed_vs_pi4=speed,
                speed_source=source, progress=lambda done, total: bar.update(task, completed=done, total=total),
                idle_s=idle_ms * 1e-3,
            )
        if not as_json:
            render_blocks(prof, console)
            calls = [f"b={b.batch_size}: {_cell(b.call)}" for b in prof.batches if b.call is not None]
            if calls:
                what = ("wake-up of a body run after an idle wait (charged once per request)" if runtime == "torch"
                        else "per-call cost of a session after an idle wait (charged to the tail)")
                console.print(f"{what}, ms: {', '.join(calls)}")
        path = save_profile(prof, out or default_profile_path(prof))
        report["block_profile"] = {"path": str(path), **profile_to_dict(prof)}
        console.print(f"block profile written to {path}")
    if edge is not None:
        from testbed.profiling.links import empty_body_echo, measure_link

        echo = empty_body_echo(net, digest) if digest is not None else None
        with _progress(console, as_json) as bar:
            task = bar.add_task(f"measuring the link to {edge}", total=None)
            link = measure_link(edge, sizes=sizes, count=link_count, timeout_s=link_timeout, budget_s=link_budget,
                                echo=echo,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        if not as_json:
            render_link(link, console)
        path = save_profile(link, link_out or default_link_path(link))
        report["link"] = {"path": str(path), **profile_to_dict(link)}
        console.print(f"link measurement written to {path}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
