"""The `testbed` command: one command group per file in this package."""

from __future__ import annotations

import signal
from types import FrameType

import typer

from testbed.cli import demo
from testbed.cli.errors import friendly_errors

app = typer.Typer(
    help="Hardware-in-the-loop testbed for U-shaped split learning and split inference at the 6G edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps `testbed demo` a sub-command while it is the only one."""


app.command("demo")(friendly_errors(demo.demo))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so every command's cleanup (stopping its processes) runs.
    signal.signal(signal.SIGTERM, _interrupt)
    app()


if __name__ == "__main__":
    main()
