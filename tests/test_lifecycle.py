"""A stopped process whose clean-up hangs still exits: stop_event_on_signals(exit_after_s=...)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from .conftest import REPO

HANGS_AFTER_STOP = """
import sys, threading, time
from testbed.lifecycle import stop_event_on_signals
stop = stop_event_on_signals(exit_after_s=float(sys.argv[1]))
print("ready", flush=True)
while not stop.is_set():
    time.sleep(0.01)
threading.Event().wait()  # a clean-up that never finishes (like a ZeroMQ context waiting for a socket)
"""


def start(grace: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HANGS_AFTER_STOP, grace], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_hung_clean_up_ends_with_the_signal_exit_code_after_the_grace_period() -> None:
    proc = start("0.3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM


def test_without_the_grace_period_the_same_process_stays_until_killed() -> None:
    proc = start("1e9")  # the check can fail: without the timer the hang is real
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    try:
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


UNWINDS = """
import os, signal, sys, time
from testbed.lifecycle import unwind_on_signals
unwind_on_signals()
ready_r, ready_w = os.pipe()
child = os.fork()
if child == 0:  # a fork that inherited the handler, like pyroute2's netns helper
    try:
        os.write(ready_w, b"1")  # CPython drops a signal that arrives before fork() returns in the child
        time.sleep(60)
    finally:
        print("child ran the parent's clean-up", flush=True)  # must never happen
    os._exit(0)
os.read(ready_r, 1)
try:
    print(child, flush=True)  # inside the try: the test's SIGTERM may arrive as soon as this line is read
    time.sleep(60)
except KeyboardInterrupt:
    print("parent interrupted", flush=True)
finally:
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    print("parent clean-up", flush=True)
"""


def test_signals_unwind_the_owner_and_only_end_its_forks() -> None:
    """SIGTERM reaches the process as KeyboardInterrupt (its finally blocks run, as `lab down` must); a fork
    that inherited the handler and gets SIGTERM exits with 128 + 15 without running the parent's clean-up."""
    proc = subprocess.Popen([sys.executable, "-c", UNWINDS], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert child > 0
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert out.splitlines() == ["parent interrupted", f"child exit {128 + signal.SIGTERM}", "parent clean-up"]
