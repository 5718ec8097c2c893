"""The controller's control plane: a ROUTER the training agents dial (DEALER, routing id = their name)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from testbed.training.errors import RunFailed
from testbed.wire.envelope import Kind, WireError
from testbed.wire.messages import CONTROL_LIMITS, META, recv_message, send_message, unpack_meta

__all__ = ["ControlPlane"]


class ControlPlane:
    """The controller's ROUTER; agents dial in (DEALER, routing id = their name).

    ``bind``: loopback TCP by default; ``ipc://PATH`` (a Unix socket) reaches agents in other network
    namespaces of the same machine (the lab)."""

    def __init__(self, group: Any, timeout_s: float, bind: str = "tcp://127.0.0.1:*") -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_LIMITS.max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.children: list[Any] = []
        self.seq = 0
        self.bytes_out: dict[str, int] = {}
        self.bytes_in: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        if self.endpoint.startswith("ipc://"):  # the socket file, if libzmq left it
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)

    def send(self, name: str, kind: Kind, meta: Mapping[str, Any],
             tensors: Mapping[str, np.ndarray] | None = None) -> int:
        self.seq += 1
        n = send_message(self.sock, kind, "controller", self.seq, meta=meta, tensors=tensors,
                         route=name.encode(), limits=CONTROL_LIMITS)
        self.bytes_out[name] = self.bytes_out.get(name, 0) + n
        return self.seq

    def gather(self, expected: Mapping[str, Kind]) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Wait for one message of the given kind from each named agent, watching every child process."""
        pending = dict(expected)
        got: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            self.group.check_alive(self.children)
            if time.monotonic() > deadline:
                raise RunFailed(f"no answer from {', '.join(sorted(pending))} within {self.timeout_s:.0f} s")
            if not self.sock.poll(100):
                continue
            try:
                route, env, tensors, nbytes = recv_message(self.sock, routed=True, limits=CONTROL_LIMITS)
            except WireError as exc:
                raise RunFailed(f"a malformed control message arrived: {exc}") from exc
            name = (route or b"").decode(errors="replace")
            self.bytes_in[name] = self.bytes_in.get(name, 0) + nbytes
            if env.kind is Kind.ERROR:
                detail = f"{env.error.code}: {env.error.message}" if env.error else "?"
                raise RunFailed(f"{name} failed: {detail}")
            if name not in pending or env.kind is not pending[name]:
                raise RunFailed(f"unexpected {env.kind.value} from {name!r}")
            got[name] = (unpack_meta(tensors), {k: v for k, v in tensors.items() if k != META})
            del pending[name]
        return got

    def request(self, messages: Mapping[str, tuple[Kind, Mapping[str, Any], Mapping[str, np.ndarray] | None]],
                reply: Kind) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        for name, (kind, meta, tensors) in messages.items():
            self.send(name, kind, meta, tensors)
        return self.gather({name: reply for name in messages})
