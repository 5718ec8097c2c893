"""Map what goes wrong in a command to one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from testbed.errors import TestbedError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command: TestbedError -> exit 2 with its message; Ctrl-C/SIGTERM -> exit 130."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except TestbedError as exc:
            print(f"testbed: error: {exc}", file=sys.stderr)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            print("testbed: interrupted; every process it had started was stopped", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
