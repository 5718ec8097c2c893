"""A controller for tests/remote, run inside the lab's edge namespace (the test process cannot reach lab addresses).

It waits for the edge and N device agents, deploys one partition (ONNX head and tail) to every device, runs a short
synthetic workload on each through the edge, and writes the devices' and the edge's reports as JSON; with
--hold-s it stays up after that (for `testbed status`) until SIGTERM. What
`testbed run` does, reduced to one partition and no planner, through the same `Controller` API.

    python -m tests.remote.lab_controller --bind tcp://10.254.77.1:5600 --edge tcp://10.254.77.1:5555 \
        --partition HASH:2:6 --head head.onnx --tail tail.onnx --devices 2 --requests 8 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from testbed.controller.api import Controller
from testbed.lifecycle import die_with_parent, stop_event_on_signals

MAX_WAIT_S = 300.0


def run(args: argparse.Namespace) -> dict[str, object]:
    head, tail = args.head.read_bytes(), args.tail.read_bytes()
    stop = stop_event_on_signals()
    with Controller(args.bind, heartbeat_s=args.heartbeat_s, run_dir=args.run_dir, command_timeout_s=60) as ctl:
        devices = sorted(ctl.wait_for(args.devices, timeout_s=args.timeout_s))
        deployed = {d: ctl.deploy(d, head, tail, args.partition, activate=True) for d in devices}
        started = {d: ctl.start_workload(d, args.edge, requests=args.requests, batch_size=1, timeout_s=30)
                   for d in devices}
        deadline = time.monotonic() + args.timeout_s
        reports: dict[str, dict[str, object]] = {}
        while len(reports) < len(devices) and time.monotonic() < deadline and not stop.is_set():
            for d in devices:
                if d not in reports and not (report := ctl.report(d))["running"]:
                    reports[d] = report
            time.sleep(0.2)
        for d in set(devices) - set(reports):  # out of time: what they did so far
            reports[d] = {**ctl.stop_workload(d), "timed_out": True}
        result = {"devices": devices, "deployed": deployed, "started": started, "reports": reports,
                  "edge": ctl.report("edge")}
        write_json(args.out, result)
        # Still up for `testbed status` (the workload may end before anyone asked) until stopped or hold_s passed.
        stop.wait(args.hold_s)
        return result


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab_controller", description=__doc__.splitlines()[0])
    p.add_argument("--bind", required=True)
    p.add_argument("--edge", required=True, help="the edge's data-plane endpoint the devices dial")
    p.add_argument("--partition", required=True)
    p.add_argument("--head", type=Path, required=True)
    p.add_argument("--tail", type=Path, required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--hold-s", type=float, default=0.0, help="after writing --out, stay up this long or until SIGTERM")
    p.add_argument("--run-dir", type=Path, help="controller.json goes here")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    args.timeout_s = min(args.timeout_s, MAX_WAIT_S)
    args.hold_s = min(args.hold_s, MAX_WAIT_S)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
