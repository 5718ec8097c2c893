"""The controller's control-plane server: one ROUTER socket, one thread that owns it.

The thread receives registrations, heartbeats, command replies and status requests, sends the commands
that callers queue through :class:`testbed.controller.api.Controller`, and marks silent nodes down. A peer
that sends garbage gets an ``error`` reply and the loop goes on; an ``error`` from a peer is never answered
(no error ping-pong). Every wait is bounded: the loop polls in short slices and checks its stop event.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import zmq

from testbed.controller.protocol import CommandError, check_heartbeat, check_register
from testbed.controller.registry import Change, Registry, UnknownNode
from testbed.errors import TestbedError
from testbed.wire import channel
from testbed.wire.codec import encode, error_envelope
from testbed.wire.envelope import Envelope, Kind, WireError
from testbed.wire.messages import CONTROL_LIMITS, pack_meta, unpack_meta

log = logging.getLogger(__name__)

CONTROLLER_ID: Final = "controller"
POLL_MS: Final = 50
MAX_BATCH: Final = 256  # messages handled per poll before the loop looks at its outbox again
SAMPLES_KEPT: Final = 4096  # data-plane samples kept per node until taken
RECENT_KEPT: Final = 64


class CommandFailed(TestbedError):
    """A node answered a command with an error, went down, or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outgoing:
    node: str
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    future: Future[dict[str, Any]] = field(default_factory=Future)


@dataclass
class _Pending:
    node: str
    future: Future[dict[str, Any]]


class ControlServer:
    """State shared with the API (guarded by ``lock``) and the loop that serves the socket."""

    def __init__(self, sock: zmq.Socket, wake: zmq.Socket, registry: Registry, clock: Callable[[], float],
                 status: Callable[[], dict[str, Any]], on_changes: Callable[[list[Change]], None]) -> None:
        self.sock, self.wake = sock, wake
        self.registry, self.clock = registry, clock
        self.status, self.on_changes = status, on_changes
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.outbox: queue.Queue[Outgoing] = queue.Queue()
        self.samples: dict[str, deque[dict[str, Any]]] = {}  # until Controller.take_samples()
        self.recent: dict[str, deque[dict[str, Any]]] = {}  # the last few, for status
        self.routes: dict[str, bytes] = {}
        self.pending: dict[int, _Pending] = {}
        self.seq = 0
        self.stop = threading.Event()
        self.garbage = 0  # messages answered with an error

    # ---- the loop ----
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if self.wake in events:
                    while self.wake.poll(0):
                        self.wake.recv()
                if self.sock in events:
                    for _ in range(MAX_BATCH):
                        if not self.sock.poll(0):
                            break
                        self._receive()
                self._send_outbox()
                with self.lock:
                    changes = self.registry.check(self.clock())
                    for change in changes:
                        self._fail_pending(change.node, "node_down", f"{change.node} went down (missed heartbeats)")
                self._changed(changes)
        finally:
            self._fail_all("closed", "the controller stopped")

    def _changed(self, changes: list[Change]) -> None:
        if changes:
            with self.changed:
                self.changed.notify_all()
            self.on_changes(changes)

    def _receive(self) -> None:
        try:
            route, msg = channel.recv(self.sock, limits=CONTROL_LIMITS, routed=True)
        except WireError as err:
            self.garbage += 1
            if err.route is not None:
                self._reply_error(err.route, err.code, err.message, err.device, err.seq)
            return
        assert route is not None
        env = msg.envelope
        tensors = {k: v for k, v in msg.tensors.items() if k != "meta"}
        try:
            meta = unpack_meta(msg.tensors)
            self._handle(route, env, meta, tensors)
        except WireError as err:
            self.garbage += 1
            self._reply_error(route, err.code, err.message, env.device, env.seq)
        except CommandError as err:
            self.garbage += 1
            self._reply_error(route, err.code, err.message, env.device, env.seq)
        except UnknownNode as err:
            self._reply_error(route, "unknown_node", f"{err}; register first", env.device, env.seq)

    def _handle(self, route: bytes, env: Envelope, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        kind, node = env.kind, env.device
        if kind is Kind.REGISTER:
            info = check_register(meta)
            with self.lock:
                changes = self.registry.register(node, info["role"], self.clock(), device_class=info["device_class"],
                                                 facts=info["facts"])
                self.routes[node] = route
                self._fail_pending(node, "node_restarted", f"{node} registered again; its pending commands are lost")
            self._send(route, Kind.REGISTERED, env.seq, {"heartbeat_s": self.registry.heartbeat_s,
                                                         "missed_beats": self.registry.missed_beats})
            self._changed(changes)
        elif kind is Kind.HEARTBEAT:
            status, samples = check_heartbeat(meta)
            with self.lock:
                changes = self.registry.heartbeat(node, self.clock(), status)
                self.routes[node] = route
                kept = self.samples.setdefault(node, deque(maxlen=SAMPLES_KEPT))
                kept.extend(samples)
                self.recent.setdefault(node, deque(maxlen=RECENT_KEPT)).extend(samples)
            self._changed(changes)
        elif kind in (Kind.COMMAND_REPLY, Kind.ERROR):
            with self.lock:
                pending = self.pending.get(env.seq)
                if pending is None or pending.node != node:
                    log.info("reply from %s to unknown command %d ignored", node, env.seq)
                    return
                del self.pending[env.seq]
            if kind is Kind.ERROR:
                err = env.error
                code, text = (err.code, err.message) if err else ("error", "no detail")
                pending.future.set_exception(CommandFailed(code, f"{node}: {code}: {text}"))
            else:
                pending.future.set_result(meta.get("result", {}) if isinstance(meta.get("result"), dict) else {})
        elif kind is Kind.STATUS:
            self._send(route, Kind.STATUS_REPLY, env.seq, self.status())
        else:
            raise WireError("bad_kind", f"the controller takes register, heartbeat, command_reply and status, "
                                        f"not {kind.value}")

    # ---- sending ----
    def _send(self, route: bytes, kind: Kind, seq: int, meta: Mapping[str, Any] | None = None,
              tensors: Mapping[str, np.ndarray] | None = None) -> bool:
        payload = dict(tensors or {})
        if meta is not None:
            payload["meta"] = pack_meta(meta)
        frames = encode(Envelope(kind, CONTROLLER_ID, seq), payload, CONTROL_LIMITS)
        return self._send_frames(route, frames)

    def _send_frames(self, route: bytes, frames: list[Any]) -> bool:
        try:
            self.sock.send_multipart([route, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone, ROUTER_MANDATORY) or EAGAIN (peer not reading)
            log.info("cannot send to a peer: %s", exc)
            return False

    def _reply_error(self, route: bytes, code: str, message: str, device: str, seq: int) -> None:
        env = error_envelope(code, message, device=device, seq=seq)
        self._send_frames(route, encode(env, {}, CONTROL_LIMITS))

    def _send_outbox(self) -> None:
        while True:
            try:
                out = self.outbox.get_nowait()
            except queue.Empty:
                return
            if not out.future.set_running_or_notify_cancel():
                continue
            with self.lock:
                route = self.routes.get(out.node)
                up = out.node in self.registry.up()
                self.seq += 1
                seq = self.seq
                if route is None or not up:
                    out.future.set_exception(CommandFailed("node_down", f"{out.node} is not up"))
                    continue
                self.pending[seq] = _Pending(out.node, out.future)
            try:
                sent = self._send(route, Kind.COMMAND, seq, out.meta, out.tensors)
            except WireError as err:
                sent, why = False, f"cannot encode the command: {err}"
            else:
                why = f"cannot reach {out.node}"
            if not sent:
                with self.lock:
                    self.pending.pop(seq, None)
                out.future.set_exception(CommandFailed("unreachable", why))

    def _fail_pending(self, node: str, code: str, message: str) -> None:
        for seq in [s for s, p in self.pending.items() if p.node == node]:
            future = self.pending.pop(seq).future
            if not future.done():
                future.set_exception(CommandFailed(code, message))

    def _fail_all(self, code: str, message: str) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(CommandFailed(code, message))
        while True:
            try:
                out = self.outbox.get_nowait()
            except queue.Empty:
                return
            if out.future.set_running_or_notify_cancel():
                out.future.set_exception(CommandFailed(code, message))
