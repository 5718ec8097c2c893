"""The supervisor starts real processes and must leave none behind, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed.supervisor import ProcessFailed, ProcessGroup


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_stop_all_terminates_and_reaps(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        children = [group.start(f"s{i}", SLEEPER) for i in range(3)]
        pids = [c.popen.pid for c in children]
        assert all(alive(p) for p in pids)
    assert wait_gone(pids) == []
    assert all(c.popen.returncode == -signal.SIGTERM for c in children)


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    stubborn = [sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
                " time.sleep(60)"]
    group = ProcessGroup(tmp_path)
    child = group.start("stubborn", stubborn)
    deadline = time.monotonic() + 10
    while "up" not in child.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    group.stop_all(grace_s=0.5)
    assert child.popen.returncode == -signal.SIGKILL


def test_a_crashed_child_is_reported_with_its_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        server = group.start("server", SLEEPER)
        crasher = group.start("crasher", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
        with pytest.raises(ProcessFailed, match=r"crasher failed \(exit code 3\)[\s\S]*boom"):
            group.wait_all([crasher], watch=[server], timeout_s=30)
    assert not alive(server.popen.pid)


def test_children_die_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: PR_SET_PDEATHSIG must take the children down."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from testbed.supervisor import ProcessGroup
        group = ProcessGroup(Path({str(tmp_path)!r}))
        for i in range(3):
            group.start(f"s{{i}}", {SLEEPER!r})
        print(" ".join(str(p) for p in group.pids().values()), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone(pids) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
