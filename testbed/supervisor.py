"""Start, watch and stop the processes of one run, leaving no orphan behind.

Children are started with PR_SET_PDEATHSIG so that they die with the supervisor even when it is
killed with SIGKILL; on a normal exit, Ctrl-C or a child's crash, every child is terminated and reaped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.lifecycle import die_with_parent


class ProcessFailed(TestbedError):
    """A child process exited unexpectedly or did not become ready in time."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit code {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:
        die_with_parent(expected_parent=parent, sig=signal.SIGTERM)

    return setup


@dataclass
class ProcessGroup:
    """The children of one run; use as a context manager so they are always stopped."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                preexec_fn=_child_setup(os.getpid()),  # only a prctl call: safe after fork
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def pids(self) -> dict[str, int]:
        return {c.name: c.popen.pid for c in self.children}

    def check_alive(self, expected_running: Sequence[Child]) -> None:
        """Raise ProcessFailed if a child that should still run has exited."""
        for child in expected_running:
            if child.popen.poll() is not None:
                raise ProcessFailed(
                    f"{child.name} exited unexpectedly ({child.describe_exit()}); "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )

    def wait_ready(self, child: Child, ready_file: Path, timeout_s: float) -> dict[str, Any]:
        """Wait until `child` has written its ready file (JSON) or fail if it exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive([child])
            if ready_file.exists():
                try:
                    return json.loads(ready_file.read_text())
                except (OSError, json.JSONDecodeError):
                    pass  # written atomically; a partial read only happens on a foreign file
            time.sleep(0.02)
        raise ProcessFailed(f"{child.name} was not ready after {timeout_s:.0f} s; see {child.log_path}")

    def wait_all(self, children: Sequence[Child], watch: Sequence[Child], timeout_s: float) -> None:
        """Wait for `children` to exit successfully while `watch` (e.g. a server) must stay up."""
        deadline = time.monotonic() + timeout_s
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.popen.poll() is not None:
                    pending.remove(child)
                    if child.popen.returncode != 0:
                        raise ProcessFailed(
                            f"{child.name} failed ({child.describe_exit()}); "
                            f"last lines of {child.log_path}:\n{child.log_tail()}"
                        )
            self.check_alive(watch)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise ProcessFailed(f"timed out after {timeout_s:.0f} s waiting for {names}")
            time.sleep(0.02)

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live child, SIGKILL what is left after `grace_s`, reap all."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
