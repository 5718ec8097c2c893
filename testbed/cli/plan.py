"""`testbed plan`: splits and edge shares for a planning input, beside the baselines' round times."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.planning.baselines import all_baselines
from testbed.planning.instances import load_problem
from testbed.planning.lscra import plan_common_split, plan_per_device
from testbed.planning.model import MODES, Plan, PlanningError, PlanningProblem, plan_to_dict


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}" if math.isfinite(x) else "inf"


def plans_for(problem: PlanningProblem) -> tuple[Plan, dict[str, Plan]]:
    """The primary LSCRA plan (per-device splits for inference, one common split for training) and the others."""
    per_device = plan_per_device(problem)
    common = plan_common_split(problem)
    primary = common if problem.mode == "training" else per_device
    others = {"lscra per-device": per_device, "lscra common": common}
    others.update(all_baselines(problem))
    return primary, others


#: Stage groups of the default (compact) table: where the time is spent. The measured fixed costs go with their
#: resource: the tail session's call with the device, the edge's request handling with the edge.
GROUPS: dict[str, tuple[str, ...]] = {
    "device": ("head_fwd", "tail_call", "tail_fwd", "tail_bwd", "head_bwd"),
    "uplink": ("uplink_act", "uplink_grad"),
    "edge": ("edge_request", "body_fwd", "body_bwd"),
    "downlink": ("downlink_act", "downlink_grad"),
}


def _short_note(p: Plan, limit: int = 3) -> str:
    bad = [d.device for d in p.devices if not math.isfinite(d.total_s)]
    if p.feasible or not bad:
        return p.note
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return f"split not allowed (memory) on {', '.join(bad[:limit])}{more}"


def render(problem: PlanningProblem, primary: Plan, others: dict[str, Plan], console: Console,
           all_stages: bool = False) -> None:
    columns = {s: (s,) for s in problem.stages} if all_stages else GROUPS
    table = Table(title=f"{primary.method}: {problem.model.name}, {problem.n_devices} device(s), {problem.mode}, "
                        f"{problem.batches_per_round} batch(es) per round (times in ms)")
    table.add_column("device")
    table.add_column("split", justify="right")
    table.add_column("share", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right", style="bold")
    for d in primary.devices:
        where = "device only" if d.a == d.b else f"{d.a}:{d.b}"
        cells = (_ms(math.fsum(d.stages.get(s, 0.0) for s in group)) for group in columns.values())
        table.add_row(d.device, where, f"{d.share:.4f}", *cells, _ms(d.total_s))
    console.print(table)
    console.print(f"round time {_ms(primary.round_s)} ms; edge shares sum to {primary.total_share:.6f}")

    cmp = Table(title="round time against the baselines")
    cmp.add_column("method")
    cmp.add_column("round (ms)", justify="right")
    cmp.add_column("vs plan", justify="right")
    cmp.add_column("note")
    for name, p in others.items():
        ratio = p.round_s / primary.round_s if primary.round_s > 0 and math.isfinite(p.round_s) else math.inf
        cmp.add_row(name, _ms(p.round_s), f"{ratio:.3f}x" if math.isfinite(ratio) else "infeasible", _short_note(p))
    console.print(cmp)


def plan(
    input_path: Annotated[Path | None, typer.Option("--input", help="planning input (YAML or JSON); see "
                                                    "docs/planner.md")] = None,
    profiles: Annotated[list[Path] | None, typer.Option(
        "--profiles", help="measured block profiles: the device's, then optionally the edge's (profiles/measured/)")]
    = None,
    devices: Annotated[int, typer.Option(min=1, help="number of devices, with --profiles")] = 4,
    device_class: Annotated[list[str] | None, typer.Option(
        "--device-class", help="device classes, cycled over the devices (profiles/devices/)")] = None,
    link: Annotated[list[str] | None, typer.Option(
        help="link profiles or measured links, cycled over the devices (profiles/links/)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size to take from the profiles")] = None,
    mode: Annotated[str | None, typer.Option(help="inference or training (default: the file's, else inference)")]
    = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the plans as JSON")] = None,
    stages: Annotated[bool, typer.Option("--stages", help="one column per stage instead of per resource")] = False,
) -> None:
    """Choose split points and edge shares (LSCRA) minimising the round time; compare with the baselines."""
    if mode is not None and mode not in MODES:
        raise PlanningError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if (input_path is None) == (not profiles):
        raise PlanningError("give either --input FILE or --profiles DEVICE.yaml [--profiles EDGE.yaml]")
    if profiles:
        from testbed.profiling.problem import build_problem

        if len(profiles) > 2:
            raise PlanningError("--profiles takes the device profile and optionally the edge profile")
        problem = build_problem(profiles[0], link or ["5g-sub6"], devices=devices, mode=mode or "inference",
                                device_classes=device_class or (), batch_size=batch_size,
                                edge_profile=profiles[1] if len(profiles) == 2 else None)
    else:
        assert input_path is not None
        problem = load_problem(input_path, mode)
    primary, others = plans_for(problem)
    console = Console()
    m = problem.model
    if problem.mode == "training" and not any(m.bwd_s) and not any(m.edge_bwd_s):
        console.print("[yellow]note:[/yellow] the profile has no backward times; training rounds count the "
                      "forward passes and the transfers only")
    render(problem, primary, others, console, all_stages=stages)
    if json_path:
        report: dict[str, Any] = {
            "input": str(input_path),
            "mode": problem.mode,
            "model": problem.model.name,
            "n_devices": problem.n_devices,
            "plan": plan_to_dict(primary),
            "compare": {name: plan_to_dict(p) for name, p in others.items()},
        }
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))
        except OSError as exc:
            raise PlanningError(f"cannot write {json_path}: {exc}") from None
        console.print(f"plans written to {json_path}")
