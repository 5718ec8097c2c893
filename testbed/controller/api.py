"""`Controller`: what `testbed run` and `testbed controller serve` drive; a thin facade over the server thread.

Calls block (each with a timeout) until the node answered; they may come from any thread. Membership changes
(a node registered, went down, came back) reach the callbacks given to :meth:`Controller.on_change` on a
thread of their own, so a callback may itself send commands (e.g. re-plan and deploy) without deadlocking.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zmq

from testbed.controller import deploy as deploy_mod
from testbed.controller.protocol import (
    PROFILE,
    REPORT,
    SET_SHARES,
    SET_SPLIT,
    START,
    STOP,
    check_args,
    split_of,
)
from testbed.controller.registry import Change, NodeView, Registry
from testbed.controller.server import CommandFailed, ControlServer, Outgoing
from testbed.controller.status import status_object
from testbed.errors import TestbedError
from testbed.metrics.controller import ControllerSnapshot, NodeState
from testbed.wire import channel
from testbed.wire.messages import CONTROL_LIMITS

log = logging.getLogger(__name__)

ChangeCallback = Callable[[Change], None]
CONTROLLER_FILE = "controller.json"


class ControllerTimeout(TestbedError):
    """Nodes did not register (or answer) within the time allowed."""


class Controller:
    """The control plane's server side; use as a context manager (``with Controller(...) as ctl``)."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*", *, heartbeat_s: float = 1.0, missed_beats: int = 3,
                 run_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 command_timeout_s: float = 60.0, ctx: zmq.Context | None = None) -> None:
        self.bind, self.run_dir = bind, run_dir
        self.registry = Registry(heartbeat_s, missed_beats)
        self.clock = clock
        self.command_timeout_s = command_timeout_s
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.endpoint = ""
        self._listeners: list[ChangeCallback] = []
        self._events: queue.Queue[Change | None] = queue.Queue()
        self._versions: dict[str, int] = {}
        self._partitions: dict[str, str] = {}
        self._shares: dict[str, float] = {}
        self._links: dict[str, dict[str, float | None]] = {}
        self._figures: dict[str, Any] = {"replans_total": 0, "predicted_round_s": None, "measured_round_s": None,
                                         "training_loss": None, "training_accuracy": None}
        self._server: ControlServer | None = None
        self._threads: list[threading.Thread] = []
        self._wake_lock = threading.Lock()
        self._wake_push: zmq.Socket | None = None
        self._closed = False

    # ---- lifecycle ----
    def start(self) -> Controller:
        sock = self.ctx.socket(zmq.ROUTER)
        channel.configure_socket(sock, CONTROL_LIMITS)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TestbedError(f"the controller cannot bind {self.bind}: {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        wake_addr = f"inproc://testbed-controller-wake-{id(self)}"
        wake = self.ctx.socket(zmq.PULL)
        wake.bind(wake_addr)
        self._wake_push = self.ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(wake_addr)
        self._server = ControlServer(sock, wake, self.registry, self.clock, self._status, self._queue_changes)
        self._threads = [threading.Thread(target=self._serve, args=(sock, wake), name="controller", daemon=True),
                         threading.Thread(target=self._dispatch_events, name="controller-events", daemon=True)]
        for t in self._threads:
            t.start()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / f"{CONTROLLER_FILE}.tmp"
            tmp.write_text(json.dumps({"endpoint": self.endpoint, "pid": os.getpid()}))
            os.replace(tmp, self.run_dir / CONTROLLER_FILE)
        log.info("controller listening on %s", self.endpoint)
        return self

    def _serve(self, sock: zmq.Socket, wake: zmq.Socket) -> None:
        assert self._server is not None
        try:
            self._server.serve()
        finally:
            sock.close(linger=1000)
            wake.close(linger=0)

    def close(self) -> None:
        """Stop the threads, close the sockets (with linger) and remove controller.json; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.run_dir is not None:
            (self.run_dir / CONTROLLER_FILE).unlink(missing_ok=True)
        if self._server is not None:
            self._server.stop.set()
        self._events.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        if self._wake_push is not None:
            self._wake_push.close(linger=0)
            self._wake_push = None
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- membership ----
    def nodes(self) -> tuple[NodeView, ...]:
        with self._lock():
            return self.registry.nodes()

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(change)`` (on the controller's event thread) for every membership change."""
        self._listeners.append(callback)

    def wait_for(self, n_devices: int, timeout_s: float, *, edge: bool = True) -> tuple[str, ...]:
        """Block until ``n_devices`` devices (and the edge, if asked) are up; returns the devices' names."""
        server = self._need_server()
        deadline = time.monotonic() + timeout_s
        with server.changed:
            while True:
                devices = self.registry.up("device")
                if len(devices) >= n_devices and (not edge or self.registry.up("edge")):
                    return devices
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControllerTimeout(
                        f"{len(devices)} of {n_devices} devices up after {timeout_s:g} s "
                        f"({', '.join(devices) or 'none'}), edge {'up' if self.registry.up('edge') else 'not up'}")
                server.changed.wait(min(left, 0.2))

    def take_samples(self) -> dict[str, list[dict[str, Any]]]:
        """The data-plane samples heartbeats brought since the last call, per node (oldest first)."""
        server = self._need_server()
        with server.lock:
            out = {node: list(d) for node, d in server.samples.items() if d}
            for d in server.samples.values():
                d.clear()
        return out

    # ---- commands ----
    def command(self, node: str, name: str, args: Mapping[str, Any] | None = None,
                tensors: Mapping[str, np.ndarray] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Send one command and wait for the node's result; raises CommandError (bad args) or CommandFailed."""
        clean = check_args(name, dict(args or {}))
        return self._send(node, {"command": name, "args": clean}, dict(tensors or {}), timeout_s)

    def deploy(self, device: str, head_bytes: bytes, tail_bytes: bytes, partition: str, *,
               activate: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
        version = self._versions.get(device, 0) + 1
        meta, tensors = deploy_mod.to_command(deploy_mod.Deployment.of(partition, head_bytes, tail_bytes, version),
                                              activate)
        check_args(meta["command"], meta["args"])
        result = self._send(device, meta, tensors, timeout_s)
        self._versions[device] = version
        if activate:
            self._partitions[device] = partition
        return result

    def deploy_body(self, weights_bytes: bytes, *, edge: str = "edge", timeout_s: float | None = None
                    ) -> dict[str, Any]:
        """Send a weights file's bytes to the edge (sha256 and a per-node version); it checks, loads and serves it.

        The result names the model, its weights hash (the state hash partitions are named by), the version."""
        version = self._versions.get(edge, 0) + 1
        meta, tensors = deploy_mod.body_command(weights_bytes, version)
        check_args(meta["command"], meta["args"])
        result = self._send(edge, meta, tensors, timeout_s)
        self._versions[edge] = version
        return result

    def profile(self, device: str, edge: str, *, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        """Have ``device`` measure its link to the edge at ``edge``; ``args``: sizes, count, warmup, timeout_s
        (per reply, on the device), budget_s, echo_partition + echo_shape. The result is the LinkMeasurement in
        the profile store's form (testbed.profiling.store.profile_from_dict reads it). The wait defaults to the
        budget plus a minute (the first empty-body echo may wait for the edge's lazy load)."""
        clean = check_args(PROFILE, {"edge": edge, **args})
        wait_s = timeout_s if timeout_s is not None else clean["budget_s"] + 60.0
        return self._send(device, {"command": PROFILE, "args": clean}, {}, wait_s)

    def set_split(self, device: str, partition: str, timeout_s: float | None = None) -> dict[str, Any]:
        result = self.command(device, SET_SPLIT, {"partition": partition}, timeout_s=timeout_s)
        self._partitions[device] = partition
        return result

    def start_workload(self, device: str, edge: str, **args: Any) -> dict[str, Any]:
        """Start a workload; ``args``: data, synthetic_samples, batch_size, requests, duration_s, rate_rps, ..."""
        return self.command(device, START, {"edge": edge, **args})

    def stop_workload(self, device: str) -> dict[str, Any]:
        return self.command(device, STOP)

    def report(self, device: str, requests: bool = False) -> dict[str, Any]:
        return self.command(device, REPORT, {"requests": requests})

    def set_shares(self, mapping: Mapping[str, float], edge: str = "edge") -> dict[str, Any]:
        result = self.command(edge, SET_SHARES, {"shares": dict(mapping)})
        self._shares = dict(mapping)
        return result

    # ---- figures the planner and the estimator hand over (shown by status and the metrics) ----
    def set_link_estimate(self, device: str, *, uplink_bps: float | None = None,
                          downlink_bps: float | None = None, rtt_s: float | None = None) -> None:
        self._links[device] = {"uplink_bps": uplink_bps, "downlink_bps": downlink_bps, "rtt_s": rtt_s}

    def update_figures(self, **figures: Any) -> None:
        """replans_total, predicted_round_s, measured_round_s, training_loss, training_accuracy."""
        unknown = set(figures) - set(self._figures)
        if unknown:
            raise TypeError(f"unknown controller figures {sorted(unknown)}")
        self._figures.update(figures)

    def snapshot(self) -> ControllerSnapshot:
        """The live state for the metrics collector (testbed.metrics.controller)."""
        total = sum(self._shares.values())
        states = []
        for view in self.nodes():
            a = b = None
            if view.name in self._partitions:
                a, b = split_of(self._partitions[view.name])
            share = self._shares[view.name] / total if view.name in self._shares and total > 0 else None
            link = self._links.get(view.name, {})
            states.append(NodeState(view.name, "edge" if view.role == "edge" else "device", view.up,
                                    view.device_class or "unknown", a, b, share, link.get("uplink_bps"),
                                    link.get("downlink_bps"), link.get("rtt_s")))
        return ControllerSnapshot(tuple(states), **self._figures)

    # ---- internals ----
    def _status(self) -> dict[str, Any]:
        """What `testbed status` shows (called on the server thread, under its lock)."""
        assert self._server is not None
        with self._server.lock:
            return status_object(self.endpoint, self.registry, self.clock(), self._partitions, self._shares,
                                 self._links, self._server.recent, self._figures)

    def _send(self, node: str, meta: dict[str, Any], tensors: dict[str, np.ndarray],
              timeout_s: float | None) -> dict[str, Any]:
        server = self._need_server()
        out = Outgoing(node, meta, tensors)
        server.outbox.put(out)
        with self._wake_lock:
            if self._wake_push is not None:
                self._wake_push.send(b"")
        wait_s = self.command_timeout_s if timeout_s is None else timeout_s
        try:
            return out.future.result(timeout=wait_s)
        except TimeoutError:
            out.future.cancel()
            raise CommandFailed("timeout", f"{node} did not answer {meta['command']} within {wait_s:g} s") from None

    def _queue_changes(self, changes: list[Change]) -> None:
        for change in changes:
            log.info("node %s: %s", change.node, change.kind)
            self._events.put(change)

    def _dispatch_events(self) -> None:
        while (change := self._events.get()) is not None:
            for callback in list(self._listeners):
                try:
                    callback(change)
                except Exception:  # a faulty callback must not stop the others, nor the controller
                    log.exception("change callback %r failed on %s", callback, change)

    def _need_server(self) -> ControlServer:
        if self._server is None:
            raise TestbedError("the controller is not started (use `with Controller(...)` or .start())")
        return self._server

    def _lock(self) -> threading.RLock:  # type: ignore[valid-type]
        return self._need_server().lock
