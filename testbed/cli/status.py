"""`testbed status`: devices, splits, link estimates and health, from the running controller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.errors import TestbedError


def _rate(bps: Any) -> str:
    if not isinstance(bps, int | float):
        return "-"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def render(status: dict[str, Any], console: Console) -> None:
    table = Table(title=f"controller {status['endpoint']} (down after {status['down_after_s']:g} s of silence)")
    for col in ("node", "role", "class", "health", "seen", "split", "share", "uplink", "downlink", "requests"):
        table.add_column(col)
    for n in status["nodes"]:
        link = n.get("link") or {}
        st = n.get("status") or {}
        requests = f"{st.get('requests', 0)} ok / {st.get('failed', 0)} failed" if "requests" in st else "-"
        if n["role"] == "edge":
            requests = f"{st.get('served', 0)} served" if "served" in st else "-"
        table.add_row(n["name"], n["role"], n["device_class"] or "-", "up" if n["up"] else "[red]DOWN[/red]",
                      f"{n['last_seen_s_ago']:.1f} s ago", "{}:{}".format(*n["split"]) if n.get("split") else "-",
                      f"{n['share']:g}" if n.get("share") is not None else "-", _rate(link.get("uplink_bps")),
                      _rate(link.get("downlink_bps")), requests)
    console.print(table)
    for c in status.get("changes", [])[-5:]:
        console.print(f"  {c['s_ago']:.1f} s ago: {c['node']} {c['kind']}", highlight=False)


def status(
    controller: Annotated[str | None, typer.Option(help="controller endpoint, e.g. tcp://127.0.0.1:5600")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="a run directory; its controller.json names the endpoint")]
    = None,
    timeout_s: Annotated[float, typer.Option(min=0.1, max=600, help="how long to wait for an answer")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the nodes the running controller knows: health, splits, edge shares, link estimates."""
    from testbed.controller.status import endpoint_from_run_dir, query_status

    if (controller is None) == (run_dir is None):
        raise TestbedError("give exactly one of --controller ENDPOINT or --run-dir DIR")
    endpoint = controller if controller is not None else endpoint_from_run_dir(run_dir)  # type: ignore[arg-type]
    result = query_status(endpoint, timeout_s)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render(result, Console())
