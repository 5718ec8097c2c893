"""`testbed link set|show|replay`: change and read the lab's links while it runs."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.cli.errors import friendly_errors
from testbed.lab.lab import Lab
from testbed.lab.state import DEFAULT_STATE_DIR, StateStore
from testbed.lab.topology import DEFAULT_PREFIX, LabError
from testbed.net.link import DirectionSpec, LinkSpec
from testbed.net.units import parse_duration_us, parse_loss_ppm, parse_rate

app = typer.Typer(help="Change and read the links of the running lab.", no_args_is_help=True)

PrefixOpt = Annotated[str, typer.Option(help="name prefix of the lab")]
StateOpt = Annotated[Path, typer.Option(help="where the lab's record is kept")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output (one JSON document on stdout)")]

#: `link replay --json` lists at most this many steps (the first ones); the count and the extremes cover the rest.
MAX_LISTED_STEPS = 50


def link_json(spec: LinkSpec) -> dict[str, Any]:
    """Both directions in base units (rate_bps None = unlimited), each with its one-line description."""
    return {d: {**dataclasses.asdict(s), "description": s.describe()}
            for d, s in (("uplink", spec.uplink), ("downlink", spec.downlink))}


def replay_summary(steps: list[tuple[int, LinkSpec]], limit: int = MAX_LISTED_STEPS) -> dict[str, Any]:
    """The steps a replay applied, bounded: the count, the range of rates and delays, the first ``limit``."""
    def extremes(values: list[int]) -> dict[str, int] | None:
        return {"min": min(values), "max": max(values)} if values else None

    ups = [s.uplink for _, s in steps]
    downs = [s.downlink for _, s in steps]
    return {
        "count": len(steps),
        "uplink_rate_bps": extremes([d.rate_bps for d in ups if d.rate_bps is not None]),
        "downlink_rate_bps": extremes([d.rate_bps for d in downs if d.rate_bps is not None]),
        "delay_us": extremes([d.delay_us for d in ups + downs]),
        "listed": [{"t_ms": t, "uplink_bps": s.uplink.rate_bps, "downlink_bps": s.downlink.rate_bps,
                    "uplink_delay_us": s.uplink.delay_us, "downlink_delay_us": s.downlink.delay_us}
                   for t, s in steps[:limit]],
        "truncated": len(steps) > limit,
    }


def _changed(base: DirectionSpec, rate: str | None, delay: str | None, jitter: str | None,
             loss: str | None) -> DirectionSpec:
    try:
        changes: dict[str, int | None] = {}
        if rate is not None:
            changes["rate_bps"] = None if rate in ("none", "unlimited") else parse_rate(rate)
        if delay is not None:
            changes["delay_us"] = parse_duration_us(delay)
        if jitter is not None:
            changes["jitter_us"] = parse_duration_us(jitter)
        if loss is not None:
            changes["loss_ppm"] = parse_loss_ppm(loss)
    except ValueError as exc:
        raise LabError(str(exc)) from exc
    return dataclasses.replace(base, **changes)


@app.command("set")
@friendly_errors
def set_link(
    device: Annotated[str, typer.Argument(help="device host, e.g. dev1")],
    rate: Annotated[str | None, typer.Option(help="e.g. 100mbit, 1.5gbit, or 'unlimited'")] = None,
    delay: Annotated[str | None, typer.Option(help="one-way delay, e.g. 5ms")] = None,
    jitter: Annotated[str | None, typer.Option(help="e.g. 1ms")] = None,
    loss: Annotated[str | None, typer.Option(help="e.g. 0.1%")] = None,
    direction: Annotated[str, typer.Option(help="uplink, downlink or both")] = "both",
    as_json: JsonOpt = False,
    prefix: PrefixOpt = DEFAULT_PREFIX,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Change one device's link; unspecified parameters keep their value."""
    if direction not in ("uplink", "downlink", "both"):
        raise LabError(f"--direction must be uplink, downlink or both, not {direction!r}")
    lab = Lab(StateStore(state_dir), prefix)
    state = lab.require_state()
    current = lab.link_of(state, state.topology.host(device))
    up = _changed(current.uplink, rate, delay, jitter, loss) if direction in ("uplink", "both") else None
    down = _changed(current.downlink, rate, delay, jitter, loss) if direction in ("downlink", "both") else None
    new = lab.set_link(device, up, down)
    if as_json:
        typer.echo(json.dumps({"device": device, "link": link_json(new)}, indent=2))
        return
    Console().print(f"{device}: uplink {new.uplink.describe()}; downlink {new.downlink.describe()}")


@app.command("show")
@friendly_errors
def show(
    as_json: JsonOpt = False,
    prefix: PrefixOpt = DEFAULT_PREFIX,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Every device's link as set, and the qdiscs the kernel really has."""
    info = Lab(StateStore(state_dir), prefix).status()
    devices = [h for h in info["hosts"] if h["role"] == "device"]
    if as_json:
        typer.echo(json.dumps([{k: h.get(k) for k in ("name", "address", "link", "qdiscs")} for h in devices],
                              indent=2))
        return
    table = Table(title=f"links of lab {info['prefix']} (backend {info['backend']})")
    for col in ("device", "uplink", "downlink", "kernel qdiscs up / down"):
        table.add_column(col)
    for h in devices:
        link = h.get("link", {})
        spec = {d: DirectionSpec(**link[d]).describe() if d in link else "-" for d in ("uplink", "downlink")}
        qd = h.get("qdiscs", {})
        kernel = " / ".join(",".join(q.get("kind", "?") for q in qd.get(d, [])) or "-" for d in ("uplink", "downlink"))
        table.add_row(h["name"], spec["uplink"], spec["downlink"], kernel)
    Console().print(table)


@app.command("replay")
@friendly_errors
def replay(
    device: Annotated[str, typer.Argument(help="device host, e.g. dev1")],
    trace: Annotated[Path, typer.Argument(help="trace file (profiles/traces/*.csv)")],
    duration: Annotated[float, typer.Option(min=0.1, help="seconds to replay (the trace loops)")] = 30.0,
    as_json: JsonOpt = False,
    prefix: PrefixOpt = DEFAULT_PREFIX,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Replay a time-varying link (rate and delay over time) on one device's link, on a timer."""
    from testbed.net.traces import TraceReplayer, load_trace

    lab = Lab(StateStore(state_dir), prefix)
    state = lab.require_state()
    base = lab.link_of(state, state.topology.host(device))
    loaded = load_trace(trace)
    console = Console(stderr=as_json)  # with --json the steps still show, on stderr
    stop = threading.Event()

    def apply(spec: LinkSpec) -> None:
        lab.set_link(device, spec.uplink, spec.downlink)
        console.print(f"{time.strftime('%H:%M:%S')} {device}: up {spec.uplink.describe()}; "
                      f"down {spec.downlink.describe()}", highlight=False)

    try:
        steps = TraceReplayer(loaded, base, apply).run(duration_s=duration, stop=stop)
    finally:
        restored = lab.set_link(device, base.uplink, base.downlink)
    if as_json:
        typer.echo(json.dumps({"device": device, "trace": loaded.name, "trace_file": str(trace),
                               "duration_s": duration, "steps": replay_summary(steps),
                               "restored": link_json(restored)}, indent=2))


@app.command("import-mahimahi")
@friendly_errors
def import_mahimahi(
    uplink_trace: Annotated[Path, typer.Argument(help="Mahimahi .up file (one line per 1500-byte opportunity)")],
    downlink_trace: Annotated[Path, typer.Argument(help="Mahimahi .down file")],
    out: Annotated[Path, typer.Option(help="trace file to write (CSV)")],
    delay: Annotated[str, typer.Option(help="one-way delay to pair with the rates (Mahimahi traces carry none)")]
    = "16.5ms",
    window_ms: Annotated[int, typer.Option(min=1, help="averaging window")] = 1000,
    name: Annotated[str | None, typer.Option(help="trace name (default: the output file's stem)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn Mahimahi delivery-opportunity traces into a (time, uplink, downlink, delay) trace for `link replay`."""
    from testbed.net.traces import from_mahimahi, mean_rates_bps, save_trace

    try:
        delay_us = parse_duration_us(delay)
    except ValueError as exc:
        raise LabError(str(exc)) from exc
    trace = from_mahimahi(uplink_trace, downlink_trace, window_ms=window_ms, delay_us=delay_us,
                          name=name or out.stem)
    save_trace(trace, out)
    up, down = mean_rates_bps(trace)
    if as_json:
        typer.echo(json.dumps({
            "out": str(out), "name": trace.name, "steps": len(trace.points), "period_ms": trace.period_ms,
            "window_ms": window_ms, "delay_us": delay_us, "mean_uplink_bps": round(up),
            "mean_downlink_bps": round(down),
            "uplink_bps": {"min": min(p.uplink_bps for p in trace.points),
                           "max": max(p.uplink_bps for p in trace.points)},
            "downlink_bps": {"min": min(p.downlink_bps for p in trace.points),
                             "max": max(p.downlink_bps for p in trace.points)},
        }, indent=2))
        return
    Console().print(f"{out}: {len(trace.points)} steps over {trace.period_ms / 1000:.0f} s, "
                    f"mean uplink {up / 1e6:.2f} Mbit/s, downlink {down / 1e6:.2f} Mbit/s")
