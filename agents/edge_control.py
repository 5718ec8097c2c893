"""The edge server's control-plane side: register as node "edge", heartbeat, take set_shares, report, deploy_body.

Kept out of agents/edge.py so the server stays about serving. ``set_shares`` swaps the scheduler's share table
in one assignment (FairScheduler.set_shares validates, then replaces the dict), which the compute thread reads
atomically under the GIL: a job sees either the old table or the new one, never a mix. ``deploy_body`` checks the
weights' sha256 before anything is written (a mismatch is refused with ``hash_mismatch`` and the body in service
stays), writes them under the work directory and hands the file to the edge's loader, which swaps the body whole.
The registration's facts carry the edge's metrics URL, as the device agents' do.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq

from agents.control_client import ControlClient
from agents.scheduler import FairScheduler, SharesError
from testbed.controller import deploy
from testbed.controller.protocol import DEPLOY_BODY, REPORT, SET_SHARES, Command, CommandError
from testbed.errors import TestbedError
from testbed.profiling.hostfacts import host_facts

EDGE_NODE = "edge"

#: Loads a verified weights file and puts it in service: (path, version) -> {model, weights_hash, num_blocks}.
BodyLoader = Callable[[Path, int], dict[str, Any]]


class _Server(Protocol):
    scheduler: FairScheduler[Any]
    served: int
    rejected: int
    body: Any  # agents.edge.Body (weights_hash, version) or None while waiting for deploy_body


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


def edge_handlers(server: _Server, metrics: _Metrics | None, load_body: BodyLoader | None = None,
                  work_dir: Path | None = None) -> dict[str, Any]:
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

    def deploy_body(cmd: Command) -> dict[str, Any]:
        assert load_body is not None and work_dir is not None
        weights = deploy.verify_body(cmd)  # before anything is written
        path = deploy.store_body(weights, work_dir)
        try:
            loaded = load_body(path, cmd.args["version"])
        except TestbedError as exc:  # not a weights file of a known model: the old body stays in service
            raise CommandError("failed", f"deploy_body: {exc}; the body in service is kept") from None
        return {**loaded, "version": cmd.args["version"], "weights_sha256": weights.sha256}

    handlers = {SET_SHARES: set_shares, REPORT: report}
    if load_body is not None and work_dir is not None:
        handlers[DEPLOY_BODY] = deploy_body
    return handlers


def start_control(args: argparse.Namespace, ctx: zmq.Context, server: _Server, metrics: _Metrics | None, *,
                  load_body: BodyLoader | None = None, work_dir: Path | None = None,
                  metrics_url: str | None = None) -> ControlClient | None:
    """The running control client when --controller was given (the caller exits it), else None."""
    if not args.controller:
        return None

    def status() -> dict[str, Any]:
        body = server.body
        return {"served": server.served, "rejected": server.rejected, "shares": dict(server.scheduler.shares),
                "weights": body.weights_hash if body is not None else None}

    facts = host_facts(probe_accelerator=True)
    if metrics_url is not None:
        facts["metrics_url"] = metrics_url  # so the controller can point a Prometheus at it
    client = ControlClient(ctx, args.controller, EDGE_NODE, "edge",
                           handlers=edge_handlers(server, metrics, load_body, work_dir), status=status, facts=facts,
                           heartbeat_s=args.heartbeat_s)
    return client.__enter__()
