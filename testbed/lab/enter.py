"""`python -m testbed.lab.enter --cgroup DIR -- CMD...`: join a device's cgroup, then become CMD.

Wrapped around `ip netns exec NS CMD`, it places a command in a lab host's CPU quota and namespace
without a shell (the cgroup first: `ip netns exec` remounts /sys, hiding /sys/fs/cgroup); exec keeps
the pid, so a supervisor's PR_SET_PDEATHSIG still applies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cgroup: str | None = None
    if args[:1] == ["--cgroup"] and len(args) >= 2:
        cgroup, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m testbed.lab.enter [--cgroup DIR] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if cgroup:
        try:
            (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            print(f"testbed.lab.enter: cannot join cgroup {cgroup}: {exc.strerror}", file=sys.stderr)
            return 2
    os.execvp(args[0], args)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
