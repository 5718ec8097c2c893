"""Long-running processes on a host without a service manager: nohup + pid file, stopped by pid, logs tailed.

Layout under the host's testbed root: `run/NAME.pid` holds "PID STARTTIME" (the kernel's start time in ticks,
so a reused pid is never signalled), `logs/NAME.log` the process's output. Where systemd runs the agent (the
Ansible `agent` role with testbed_service_manager=systemd), use systemctl instead.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from testbed.remote.errors import RemoteCommandFailed, RemoteError

_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
_ENDPOINT_RE = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:]+:\d{1,5}\Z")
MAX_GRACE_S = 60

# A process is ours while /proc/PID/stat shows the recorded start time and it is not a zombie.
_SAME = ('same() { [ -r /proc/$pid/stat ] || return 1; set -- $(sed "s/.*) //" /proc/$pid/stat); '
         '[ "$1" != Z ] && [ "${20}" = "$ticks" ]; }')


@dataclass(frozen=True)
class ProcessPaths:
    pidfile: str
    log: str


def paths(root: str, name: str) -> ProcessPaths:
    if not _NAME_RE.match(name):
        raise RemoteError(f"process name {name!r}: lowercase letters, digits and -, starting with a letter")
    return ProcessPaths(posixpath.join(root, "run", f"{name}.pid"), posixpath.join(root, "logs", f"{name}.log"))


def start_script(root: str, name: str, argv: Sequence[str], work_dir: str | None = None) -> str:
    """The shell script that starts `argv` detached, unless a process of that name runs already (pure)."""
    if not argv:
        raise RemoteError("nothing to start: give the command after --")
    p = paths(root, name)
    q = shlex.quote
    return "\n".join([
        _SAME,
        f"mkdir -p {q(posixpath.dirname(p.pidfile))} {q(posixpath.dirname(p.log))} {q(work_dir or root)}",
        f"if [ -f {q(p.pidfile)} ]; then read pid ticks < {q(p.pidfile)}; "
        f"if same; then echo \"already running $pid\"; exit 3; fi; fi",
        f"cd {q(work_dir or root)}",
        f"nohup setsid {shlex.join(argv)} >> {q(p.log)} 2>&1 < /dev/null &",
        "pid=$!",
        'ticks=$(sed "s/.*) //" /proc/$pid/stat | cut -d" " -f20)',
        f"echo \"$pid $ticks\" > {q(p.pidfile)}",
        "sleep 0.3",
        'if same; then echo "started $pid"; else echo "exited at once"; exit 4; fi',
    ])


def stop_script(root: str, name: str, grace_s: float = 10.0) -> str:
    p = paths(root, name)
    q = shlex.quote
    steps = max(1, min(int(grace_s * 10), MAX_GRACE_S * 10))
    return "\n".join([
        _SAME,
        f"if ! [ -f {q(p.pidfile)} ]; then echo 'not running'; exit 0; fi",
        f"read pid ticks < {q(p.pidfile)}",
        "if same; then kill -TERM $pid; i=0",
        f"  while same && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done",
        "  if same; then kill -KILL $pid; echo \"killed $pid\"; else echo \"stopped $pid\"; fi",
        "else echo 'not running'; fi",
        f"rm -f {q(p.pidfile)}",
    ])


def status_script(root: str, name: str) -> str:
    p = paths(root, name)
    return "\n".join([
        _SAME,
        f"if [ -f {shlex.quote(p.pidfile)} ]; then read pid ticks < {shlex.quote(p.pidfile)}; "
        "if same; then echo \"running $pid\"; exit 0; fi; fi",
        "echo 'not running'",
    ])


def start(conn: Any, root: str, name: str, argv: Sequence[str], work_dir: str | None = None) -> int:
    """Start `argv` on the host; return its pid. Refuses a second process of the same name."""
    result = conn.run(["sh", "-c", start_script(root, name, argv, work_dir)], check=False, timeout_s=30)
    words = result.stdout.split()
    if result.returncode == 0 and words[:1] == ["started"]:
        return int(words[1])
    if result.returncode == 3:
        raise RemoteError(f"{conn.host.name}: {name} is already running (pid {words[-1]}); stop it first")
    tail = logs(conn, root, name, lines=20) if result.returncode == 4 else result.stderr
    raise RemoteCommandFailed(f"{conn.host.name}: {name} did not start: {tail.strip()[-600:]}")


def stop(conn: Any, root: str, name: str, grace_s: float = 10.0) -> str:
    """SIGTERM, then SIGKILL after `grace_s`; "stopped PID", "killed PID" or "not running"."""
    return conn.run(["sh", "-c", stop_script(root, name, grace_s)], timeout_s=grace_s + 30).stdout.strip()


def status(conn: Any, root: str, name: str) -> int | None:
    words = conn.run(["sh", "-c", status_script(root, name)], timeout_s=30).stdout.split()
    return int(words[1]) if words[:1] == ["running"] else None


def logs(conn: Any, root: str, name: str, lines: int = 50) -> str:
    p = paths(root, name)
    return conn.run(["sh", "-c", f"tail -n {int(lines)} {shlex.quote(p.log)} 2>/dev/null || true"],
                    timeout_s=30).stdout


def agent_argv(root: str, controller: str, device_id: str, device_class: str | None = None,
               metrics_port: int | None = None, metrics_bind: str | None = None,
               heartbeat_s: float | None = None) -> list[str]:
    """`testbed-agent serve ...` from the host's venv, as the Ansible systemd unit runs it (pure)."""
    if not _ENDPOINT_RE.match(controller):
        raise RemoteError(f"--controller must look like tcp://HOST:PORT, not {controller!r}")
    argv = [posixpath.join(root, "venv", "bin", "testbed-agent"), "serve", "--controller", controller,
            "--device-id", device_id, "--work-dir", posixpath.join(root, "work")]
    if device_class:
        argv += ["--device-class", device_class]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    if metrics_bind:
        argv += ["--metrics-bind", metrics_bind]
    if heartbeat_s is not None:
        argv += ["--heartbeat-s", str(float(heartbeat_s))]
    return argv
