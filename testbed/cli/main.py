"""The `testbed` command: one command group per file in this package."""

from __future__ import annotations

import sys

import typer

from testbed.cli import demo
from testbed.errors import TestbedError

app = typer.Typer(
    help="Hardware-in-the-loop testbed for U-shaped split learning and split inference at the 6G edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo")(demo.demo)


def main() -> None:
    try:
        app()
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        sys.exit(130)
