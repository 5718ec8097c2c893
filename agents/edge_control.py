"""The edge server's control-plane side: register as node "edge", heartbeat, take set_shares and report.

Kept out of agents/edge.py so the server stays about serving. ``set_shares`` swaps the scheduler's share table
in one assignment (FairScheduler.set_shares validates, then replaces the dict), which the compute thread reads
atomically under the GIL: a job sees either the old table or the new one, never a mix.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

import zmq

from agents.control_client import ControlClient
from agents.scheduler import FairScheduler, SharesError
from testbed.controller.protocol import REPORT, SET_SHARES, Command, CommandError
from testbed.profiling.hostfacts import host_facts

EDGE_NODE = "edge"


class _Server(Protocol):
    scheduler: FairScheduler[Any]
    served: int
    rejected: int


class _Metrics(Protocol):
    def set_shares(self, shares: dict[str, float]) -> None: ...


def heartbeat_interval(text: str) -> float:
    """argparse type: a heartbeat interval in seconds, 0.01..3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.01 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.01 and 3600 s, got {value}")
    return value


def add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", help="controller endpoint to register with, e.g. tcp://127.0.0.1:5600")
    p.add_argument("--heartbeat-s", type=heartbeat_interval, default=1.0,
                   help="heartbeat interval towards the controller")


def edge_handlers(server: _Server, metrics: _Metrics | None) -> dict[str, Any]:
    def set_shares(cmd: Command) -> dict[str, Any]:
        shares = dict(cmd.args["shares"])
        try:
            server.scheduler.set_shares(shares)
        except SharesError as exc:
            raise CommandError("bad_args", f"set_shares: {exc}") from None
        if metrics is not None:
            metrics.set_shares(shares)
        return {"shares": shares}

    def report(cmd: Command) -> dict[str, Any]:
        return {"served": server.served, "rejected": server.rejected, "shares": dict(server.scheduler.shares),
                "used_s": {k: round(v, 6) for k, v in dict(server.scheduler.used_s).items()}}

    return {SET_SHARES: set_shares, REPORT: report}


def start_control(args: argparse.Namespace, ctx: zmq.Context, server: _Server,
                  metrics: _Metrics | None) -> ControlClient | None:
    """The running control client when --controller was given (the caller exits it), else None."""
    if not args.controller:
        return None

    def status() -> dict[str, Any]:
        return {"served": server.served, "rejected": server.rejected, "shares": dict(server.scheduler.shares)}

    client = ControlClient(ctx, args.controller, EDGE_NODE, "edge", handlers=edge_handlers(server, metrics),
                           status=status, facts=host_facts(probe_accelerator=True), heartbeat_s=args.heartbeat_s)
    return client.__enter__()
