"""`testbed controller serve`: a standing controller that agents and the edge register with."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from testbed.cli.errors import friendly_errors

app = typer.Typer(help="The control plane: registration, heartbeats, commands to agents and the edge.",
                  no_args_is_help=True)


@app.command()
@friendly_errors
def serve(
    bind: Annotated[str, typer.Option(help="ZeroMQ endpoint to bind (port * picks a free one)")]
    = "tcp://127.0.0.1:5600",
    run_dir: Annotated[Path, typer.Option(help="controller.json goes here, for `testbed status --run-dir`")]
    = Path("runs/controller"),
    heartbeat_s: Annotated[float, typer.Option(min=0.01, max=3600, help="heartbeat interval the nodes use")] = 1.0,
    missed_beats: Annotated[int, typer.Option(min=1, max=100, help="silent intervals before a node is down")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="once listening, print one JSON line {endpoint, pid, "
                                                         "run_dir} on stdout; node changes go to stderr")] = False,
) -> None:
    """Run a controller until SIGTERM or Ctrl-C; nodes register, heartbeat and are watched for going down."""
    from testbed.controller.api import Controller

    console = Console(stderr=as_json)
    # SIGTERM and SIGINT arrive as KeyboardInterrupt (testbed.cli.main). The whole life of the controller is inside
    # the try: a parent that reads the JSON line (or controller.json) may stop it at once, and that is a clean stop.
    try:
        with Controller(bind, heartbeat_s=heartbeat_s, missed_beats=missed_beats, run_dir=run_dir) as ctl:
            ctl.on_change(lambda c: console.print(f"{c.node} ({c.role}): {c.kind}", highlight=False))
            if as_json:  # one line, flushed: a parent process reads it to learn where to connect
                print(json.dumps({"endpoint": ctl.endpoint, "pid": os.getpid(), "run_dir": str(run_dir.resolve())}),
                      flush=True)
            else:
                console.print(f"controller listening on {ctl.endpoint}; {run_dir / 'controller.json'} written",
                              highlight=False)
            while True:
                time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("controller stopping")
