"""Process lifecycle helpers shared by every long-running process (stdlib only, torch-free).

Every process the testbed starts must stop when asked (SIGTERM/SIGINT) and must not outlive the
process that started it, even when that one is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType

_PR_SET_PDEATHSIG = 1


#: How long a stopped agent may take to clean up before it exits regardless (see stop_event_on_signals).
AGENT_EXIT_GRACE_S = 20.0


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux only).

    `expected_parent` closes the race in which the parent died before the request was made.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def unwind_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Make ``signals`` raise KeyboardInterrupt in this process, so its ``finally`` blocks (stop the processes it
    started, take its lab down) run as on Ctrl-C.

    Only in this process: a fork that inherits the handler (pyroute2 forks a helper to open a netlink socket in a
    namespace, then stops it with SIGTERM) exits at once instead — unwinding there would run the parent's
    clean-up in the child (a `lab down` in the middle of `lab up`) or hang in it.
    """
    owner = os.getpid()

    def _handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, _handler)


def stop_event_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                          exit_after_s: float | None = None) -> threading.Event:
    """Return an event that is set when one of `signals` arrives; the caller's loop checks it.

    ``exit_after_s``: if the process is still alive that long after the signal (a clean-up that hangs, e.g. a
    ZeroMQ context waiting for a socket nobody closes), it exits at once with 128 + the signal number, so a
    stopped agent never outlives the run that started it.
    """
    stop = threading.Event()

    def _handler(signum: int, frame: FrameType | None) -> None:
        if exit_after_s is not None and not stop.is_set():
            timer = threading.Timer(exit_after_s, os._exit, args=(128 + signum,))
            timer.daemon = True
            timer.start()
        stop.set()

    for sig in signals:
        signal.signal(sig, _handler)
    return stop


def exit_without_teardown(status: int) -> None:
    """Flush stdout/stderr and exit now, skipping the interpreter's teardown (for a process whose sockets and
    files are already closed: torch's teardown alone costs about half a second, which a controller stopping many
    agents would wait for at every stop)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
