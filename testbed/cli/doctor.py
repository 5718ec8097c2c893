"""`testbed doctor`: which backend serves each link capability on this machine, and why."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.lab.hosts import require_root


def doctor(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Probe the kernel (in a scratch namespace) for htb, tbf, netem, fq, TUN and 64-bit rates."""
    from testbed.net.capabilities import backend_for, probe

    require_root()
    caps = probe()
    backends = backend_for(caps)
    if as_json:
        typer.echo(json.dumps({"capabilities": [dataclasses.asdict(c) for c in caps], "backends": backends},
                              indent=2))
        return
    table = Table(title="link shaping on this machine")
    for col in ("capability", "available", "backend", "why"):
        table.add_column(col)
    for c in caps:
        table.add_row(c.name, "yes" if c.available else "no", c.backend, c.reason)
    console = Console()
    console.print(table)
    console.print("served by: " + ", ".join(f"{k} → {v}" for k, v in backends.items()))
