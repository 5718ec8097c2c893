"""The agent side of the control plane: dial the controller, register, heartbeat, run its commands.

One thread owns the DEALER socket (sockets are not thread-safe): it (re)registers until the controller
answers, sends a heartbeat every interval with the owner's status and data-plane samples, and hands commands
to a second thread, so a slow command (loading a model, joining a workload) never delays a heartbeat. The
owner process passes its command handlers in; this module knows no command's meaning. Torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import zmq

from testbed.controller.protocol import MAX_SAMPLES, CommandError, Handler, dispatch, parse_command
from testbed.errors import TestbedError
from testbed.wire import channel
from testbed.wire.codec import encode, error_envelope
from testbed.wire.envelope import Envelope, Kind, WireError
from testbed.wire.messages import CONTROL_LIMITS, MetaError, pack_meta, unpack_meta

log = logging.getLogger(__name__)

POLL_MS: Final = 50


@dataclass(frozen=True)
class _Reply:
    seq: int
    result: dict[str, Any] | None
    code: str = ""
    message: str = ""


class ControlClient:
    """Use as a context manager; ``registered`` is set while the controller knows this node."""

    def __init__(self, ctx: zmq.Context, endpoint: str, node: str, role: str, *,
                 handlers: Mapping[str, Handler], status: Callable[[], dict[str, Any]],
                 samples: Callable[[int], list[dict[str, Any]]] | None = None, device_class: str = "",
                 facts: Mapping[str, Any] | None = None, heartbeat_s: float = 1.0) -> None:
        if not 0.01 <= heartbeat_s <= 3600:
            raise TestbedError(f"heartbeat interval must be between 0.01 and 3600 s, got {heartbeat_s}")
        self.ctx, self.endpoint, self.node, self.role = ctx, endpoint, node, role
        self.handlers, self.status, self.samples = dict(handlers), status, samples
        self.register_meta = {"role": role, "device_class": device_class, "facts": dict(facts or {})}
        self.heartbeat_s = heartbeat_s
        self.registered = threading.Event()
        self.stop = threading.Event()
        self.commands: queue.Queue[tuple[int, dict[str, Any], dict[str, np.ndarray]] | None] = queue.Queue()
        self.replies: queue.Queue[_Reply] = queue.Queue()
        self.registrations = 0  # REGISTERED answers received: more than one means the node was re-admitted
        self._seq = 0
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ControlClient:
        self._threads = [threading.Thread(target=self._socket_loop, name="control", daemon=True),
                         threading.Thread(target=self._command_loop, name="control-commands", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.commands.put(None)
        for t in self._threads:
            t.join(timeout=10)

    # ---- socket thread ----
    def _socket_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        channel.configure_socket(sock, CONTROL_LIMITS, linger_ms=1000)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues while the controller is away: sends fail fast
        sock.connect(self.endpoint)
        next_register = next_beat = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if not self.registered.is_set() and now >= next_register:
                    self._send(sock, Kind.REGISTER, self.register_meta)
                    next_register = now + self.heartbeat_s
                if self.registered.is_set() and now >= next_beat:
                    self._heartbeat(sock)
                    next_beat = now + self.heartbeat_s
                self._flush_replies(sock)
                if sock.poll(POLL_MS):
                    for _ in range(64):
                        self._receive(sock)
                        if not sock.poll(0):
                            break
        finally:
            self._flush_replies(sock)
            sock.close(linger=1000)

    def _heartbeat(self, sock: zmq.Socket) -> None:
        try:
            meta: dict[str, Any] = {"status": self.status()}
            if self.samples is not None:
                meta["samples"] = self.samples(MAX_SAMPLES)
        except Exception:  # the owner's status must never stop the heartbeats
            log.exception("status for the heartbeat failed")
            meta = {"status": {}}
        self._send(sock, Kind.HEARTBEAT, meta)

    def _send(self, sock: zmq.Socket, kind: Kind, meta: Mapping[str, Any], seq: int | None = None) -> bool:
        if seq is None:
            self._seq += 1
            seq = self._seq
        try:
            frames = encode(Envelope(kind, self.node, seq), {"meta": pack_meta(meta)}, CONTROL_LIMITS)
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # controller unreachable (IMMEDIATE) or not reading: the next beat tries again
            return False
        except (WireError, TypeError, ValueError) as exc:  # an unencodable status or result: say so, go on
            log.error("cannot send %s: %s", kind.value, exc)
            return False

    def _receive(self, sock: zmq.Socket) -> None:
        try:
            _, msg = channel.recv(sock, limits=CONTROL_LIMITS)
        except WireError as err:
            log.warning("malformed message from the controller: %s", err)
            channel.reply_error(sock, None, err, limits=CONTROL_LIMITS)
            return
        env = msg.envelope
        if env.kind is Kind.REGISTERED:
            self.registrations += 1
            self.registered.set()
            log.info("%s registered with the controller at %s", self.node, self.endpoint)
        elif env.kind is Kind.COMMAND:
            try:
                meta = unpack_meta(msg.tensors)
            except MetaError as err:
                self.replies.put(_Reply(env.seq, None, err.code, err.message))
                return
            tensors = {k: v for k, v in msg.tensors.items() if k != "meta"}
            self.commands.put((env.seq, meta, tensors))
        elif env.kind is Kind.ERROR:
            err = env.error
            if err is not None and err.code == "unknown_node":
                self.registered.clear()  # the controller restarted or forgot us: register again
            else:
                log.warning("controller error: %s", err)
        else:
            self.replies.put(_Reply(env.seq, None, "bad_kind", f"an agent takes registered, command and error, "
                                                               f"not {env.kind.value}"))

    def _flush_replies(self, sock: zmq.Socket) -> None:
        while True:
            try:
                r = self.replies.get_nowait()
            except queue.Empty:
                return
            if r.result is not None:
                if self._send(sock, Kind.COMMAND_REPLY, {"result": r.result}, seq=r.seq):
                    continue
                r = _Reply(r.seq, None, "bad_result", "the command's result could not be sent")
            env = error_envelope(r.code, r.message, device=self.node, seq=r.seq)
            try:
                sock.send_multipart(encode(env, {}, CONTROL_LIMITS), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.warning("could not send an error reply for command %d", r.seq)

    # ---- command thread ----
    def _command_loop(self) -> None:
        while (item := self.commands.get()) is not None:
            seq, meta, tensors = item
            try:
                result = dispatch(parse_command(meta, tensors), self.handlers)
                self.replies.put(_Reply(seq, result))
            except CommandError as err:
                self.replies.put(_Reply(seq, None, err.code, err.message))
            except TestbedError as err:
                self.replies.put(_Reply(seq, None, "failed", str(err)))
            except Exception as err:  # a handler bug must not take the agent down: report it, go on
                log.exception("command %s failed", meta.get("command"))
                self.replies.put(_Reply(seq, None, "internal_error", f"{type(err).__name__}: {err}"))
