"""Device trainer for U-shaped split learning: head and tail (and the labels) stay on the device.

One training step (the edge holds the body)::

    x ─▶ head ─▶ a1 ──TRAIN_FORWARD──▶ edge body ──TRAIN_FORWARD_REPLY──▶ a2 ─▶ tail ─▶ loss(labels)
    head.backward(g1) ◀──TRAIN_BACKWARD_REPLY── edge body backward ◀──TRAIN_BACKWARD── g2 = dL/da2

then the device updates its head and tail. Only ``a1`` and ``g2`` leave the device. The controller
drives it over the control plane: SYNC (load / dump state), ROUND_START (run epoch steps
[first, end)) answered by ROUND_END with the metrics of those steps. Torch is used here (training
needs autograd); the inference agent (agents/device.py) stays torch-free.

Stages timed per step (seconds, summed per segment): head_fwd, up_a1, edge_wait_fwd, body_fwd,
down_a2, tail (forward, loss, backward), up_g2, edge_wait_bwd, body_bwd, down_g1, head_bwd (backward
and the optimizer step), other (encoding, decoding, copies).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from torch import nn

from testbed.errors import TestbedError
from testbed.lifecycle import AGENT_EXIT_GRACE_S, die_with_parent, exit_without_teardown, stop_event_on_signals
from testbed.partition import activation_shapes
from testbed.training.errors import ProtocolError
from testbed.training.experiment import ExperimentSpec, batch_bounds, batch_order
from testbed.training.state import (
    Party,
    device_blocks,
    load_spec_json,
)
from testbed.wire.codec import encode, error_envelope
from testbed.wire.envelope import Kind, WireError
from testbed.wire.messages import (
    CONTROL_LIMITS,
    DATA_LIMITS,
    recv_message,
    send_message,
    unpack_meta,
)

STAGES = ("head_fwd", "up_a1", "edge_wait_fwd", "body_fwd", "down_a2", "tail", "up_g2", "edge_wait_bwd",
          "body_bwd", "down_g1", "head_bwd", "other")


class Interrupted(TestbedError):
    """SIGTERM/SIGINT arrived."""


def load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The device's own training data: float32 ``x`` (N, C, H, W) and int64 ``y``; never sent anywhere."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.ascontiguousarray(data["x"]), np.ascontiguousarray(data["y"])
    except (OSError, KeyError, ValueError) as exc:
        raise TestbedError(f"cannot read device data {path}: {exc}") from exc
    if x.dtype != np.float32 or y.dtype != np.int64 or len(x) != len(y) or len(y) == 0:
        raise TestbedError(f"{path}: expected float32 x and one int64 label per image")
    return x, y


class DeviceTrainer:
    def __init__(self, spec: ExperimentSpec, index: int, name: str, x: np.ndarray, y: np.ndarray,
                 ctx: zmq.Context, stop: threading.Event) -> None:
        self.spec, self.index, self.name = spec, index, name
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.a, self.b = spec.splits[index]
        self.party = Party(spec, ["main"], device_blocks(spec, index))
        self.model = self.party.models["main"]
        self.opt = self.party.optimizers["main"]
        self.loss_fn = nn.CrossEntropyLoss()
        shapes = activation_shapes(self.model)
        self.a2_shape = shapes[self.b]
        self.ctx, self.stop = ctx, stop
        self.data: zmq.Socket | None = None
        self.partition = ""
        self.timeout_s = spec.runtime.timeout_s
        self._order: tuple[int, np.ndarray] | None = None

    # ---- control ----
    def handle(self, kind: Kind, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[Kind, dict, dict]:
        if kind is Kind.SYNC:
            op = meta.get("op")
            if op == "load":
                self.party.load(tensors)
                if "run" in meta:
                    self.partition = f"{meta['run']}:{self.a}:{self.b}"
                if "edge" in meta and self.data is None:
                    self.data = self.ctx.socket(zmq.DEALER)
                    self.data.setsockopt(zmq.MAXMSGSIZE, DATA_LIMITS.max_message_bytes)
                    self.data.setsockopt(zmq.LINGER, 1000)
                    self.data.connect(str(meta["edge"]))
                return Kind.SYNC_REPLY, {}, {}
            if op == "dump":
                return Kind.SYNC_REPLY, {}, self.party.dump(optimizer=bool(meta.get("optimizer")))
            raise ProtocolError(f"unknown sync op {op!r}")
        if kind is Kind.ROUND_START:
            return Kind.ROUND_END, self.run_steps(meta), {}
        raise ProtocolError(f"a device does not accept {kind.value} on the control plane")

    # ---- training ----
    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, batch_order(self.spec.training.seed, self.index, epoch, len(self.y)))
        return torch.from_numpy(self._order[1])

    def run_steps(self, meta: dict[str, Any]) -> dict[str, Any]:
        try:
            epoch, first, end, seq0 = (int(meta[k]) for k in ("epoch", "first", "end", "seq0"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"round_start needs integer epoch, first, end, seq0: {meta}") from exc
        if self.data is None or not self.partition:
            raise ProtocolError("round_start before the initial sync")
        steps = meta.get("epoch_steps")  # this device's steps per epoch (by_shard: its shard cut into that many)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= end <= steps:
            raise ProtocolError(f"round_start: epoch_steps must be an integer >= end ({end}), got {steps!r}")
        mode, B = self.spec.training.batch_sizes, self.spec.training.batch_size
        order = self.order(epoch)
        totals = dict.fromkeys(STAGES, 0.0)
        out = {"steps": 0, "samples": 0, "loss_sum": 0.0, "correct": 0, "bytes_up": 0, "bytes_down": 0}
        self.model.train()
        for s in range(first, end):
            if self.stop.is_set():
                raise Interrupted("stopped")
            lo, hi = batch_bounds(mode, len(self.y), B, steps, s)
            idx = order[lo:hi]
            if len(idx) == 0:
                raise ProtocolError(f"step {s} is past the end of this device's {len(self.y)} samples")
            self.step(self.x[idx], self.y[idx], seq0 + s - first, totals, out)
        out["times"] = totals
        return out

    def step(self, xb: torch.Tensor, yb: torch.Tensor, seq: int, totals: dict[str, float],
             out: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        a1 = self.model.run(xb, 0, self.a)
        a1_np = a1.detach().contiguous().numpy()
        t1 = time.perf_counter()
        a2, fwd = self.exchange(Kind.TRAIN_FORWARD, seq, "a1", a1_np, Kind.TRAIN_FORWARD_REPLY, "a2",
                                (len(yb), *self.a2_shape), out)
        t2 = time.perf_counter()
        a2t = torch.from_numpy(np.array(a2, copy=True)).requires_grad_(True)
        logits = self.model.run(a2t, self.b, self.model.num_blocks)
        loss = self.loss_fn(logits, yb)
        loss.backward()
        assert a2t.grad is not None
        g2 = a2t.grad.contiguous().numpy()
        t3 = time.perf_counter()
        g1, bwd = self.exchange(Kind.TRAIN_BACKWARD, seq, "g2", g2, Kind.TRAIN_BACKWARD_REPLY, "g1",
                                tuple(a1_np.shape), out)
        t4 = time.perf_counter()
        a1.backward(torch.from_numpy(np.array(g1, copy=True)))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        stages = {
            "head_fwd": t1 - t0, "up_a1": fwd["up"], "edge_wait_fwd": fwd["edge_wait"], "body_fwd": fwd["body"],
            "down_a2": fwd["down"], "tail": t3 - t2, "up_g2": bwd["up"], "edge_wait_bwd": bwd["edge_wait"],
            "body_bwd": bwd["body"], "down_g1": bwd["down"], "head_bwd": t5 - t4,
        }
        stages["other"] = max(0.0, (t5 - t0) - sum(stages.values()))
        for k, v in stages.items():
            totals[k] += v
        out["steps"] += 1
        out["samples"] += len(yb)
        out["loss_sum"] += float(loss.detach()) * len(yb)
        out["correct"] += int((logits.argmax(1) == yb).sum())

    def exchange(self, kind: Kind, seq: int, name: str, array: np.ndarray, reply_kind: Kind, reply_name: str,
                 shape: tuple[int, ...], out: dict[str, Any]) -> tuple[np.ndarray, dict[str, float]]:
        """Send one tensor to the edge and wait for the matching reply; time the legs of the round trip."""
        assert self.data is not None
        send_ns = time.time_ns()
        out["bytes_up"] += send_message(self.data, kind, self.name, seq, tensors={name: array},
                                        partition=self.partition, times={"device_send_ns": send_ns},
                                        limits=DATA_LIMITS)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.stop.is_set():
                raise Interrupted("stopped while waiting for the edge")
            if time.monotonic() > deadline:
                raise TestbedError(f"no {reply_kind.value} from the edge within {self.timeout_s:.0f} s (seq {seq})")
            if not self.data.poll(100):
                continue
            _, env, tensors, nbytes = recv_message(self.data, limits=DATA_LIMITS)
            recv_ns = time.time_ns()
            out["bytes_down"] += nbytes
            if env.kind is Kind.ERROR:
                detail = f"{env.error.code}: {env.error.message}" if env.error else "?"
                raise TestbedError(f"the edge refused {kind.value} seq {seq}: {detail}")
            if env.kind is not reply_kind or env.seq != seq:
                raise ProtocolError(f"expected {reply_kind.value} seq {seq}, got {env.kind.value} seq {env.seq}")
            got = tensors.get(reply_name)
            if set(tensors) != {reply_name} or got is None or got.dtype != np.float32 or tuple(got.shape) != shape:
                raise ProtocolError(f"{reply_kind.value}: expected float32 {reply_name}{shape}, got "
                                    f"{ {k: (str(v.dtype), v.shape) for k, v in tensors.items()} }")
            t = env.times_ns
            try:
                legs = {
                    "up": (t["edge_recv_ns"] - send_ns) / 1e9,
                    "edge_wait": (t["edge_start_ns"] - t["edge_recv_ns"]) / 1e9,
                    "body": (t["edge_end_ns"] - t["edge_start_ns"]) / 1e9,
                    "down": (recv_ns - t["edge_send_ns"]) / 1e9,
                }
            except KeyError as exc:
                raise ProtocolError(f"the edge's reply lacks timestamp {exc}") from exc
            return got, {k: max(v, 0.0) for k, v in legs.items()}


def send_error(sock: zmq.Socket, name: str, code: str, message: str) -> None:
    try:
        frames = encode(error_envelope(code, message[:4000], device=name, seq=0), {}, CONTROL_LIMITS)
        sock.send_multipart(frames, copy=True)
    except (WireError, zmq.ZMQError):
        pass


def report_failure(ctrl: zmq.Socket | None, name: str, prefix: str, exc: Exception) -> int:
    """Say why a training agent stops — one line for an error it knows (a bad spec, a peer's garbage, an endpoint
    it cannot use), the traceback for a bug — tell the controller, and return the exit code (2 or 1)."""
    known = isinstance(exc, TestbedError | WireError | zmq.ZMQError)
    if known:
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()
    if ctrl is not None:
        send_error(ctrl, name, "train_failed", str(exc) if known else f"internal error: {type(exc).__name__}: {exc}")
    return 2 if known else 1


def serve(sock: zmq.Socket, name: str, stop: threading.Event, handler: Any) -> None:
    """The agents' control loop: answer each controller message with ``handler``'s reply."""
    while not stop.is_set():
        if not sock.poll(100):
            continue
        _, env, tensors, _ = recv_message(sock, limits=CONTROL_LIMITS)
        meta = unpack_meta(tensors)
        kind, reply_meta, reply_tensors = handler(env.kind, meta, {k: v for k, v in tensors.items() if k != "meta"})
        send_message(sock, kind, name, env.seq, meta=reply_meta, tensors=reply_tensors, limits=CONTROL_LIMITS)


def control_socket(ctx: zmq.Context, name: str, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_LIMITS.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    return sock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-device", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="device id, e.g. dev1")
    p.add_argument("--index", type=int, required=True, help="this device's position in the experiment (0-based)")
    p.add_argument("--data", type=Path, required=True, help=".npz with this device's x and y")
    p.add_argument("--control", required=True, help="the controller's endpoint")
    p.add_argument("--spec", type=Path, required=True, help="the experiment JSON written by the controller")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the controller) dies")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals(exit_after_s=AGENT_EXIT_GRACE_S)
    ctx = zmq.Context()
    ctrl: zmq.Socket | None = None
    trainer: DeviceTrainer | None = None
    code = 0
    try:
        spec = load_spec_json(args.spec)
        if not 0 <= args.index < spec.devices:
            raise TestbedError(f"--index {args.index} outside the experiment's {spec.devices} devices")
        torch.set_num_threads(spec.runtime.device_threads)
        x, y = load_shard(args.data)
        trainer = DeviceTrainer(spec, args.index, args.name, x, y, ctx, stop)
        ctrl = control_socket(ctx, args.name, args.control)
        send_message(ctrl, Kind.PING, args.name, 0, meta={"pid": os.getpid(), "samples": len(y)})
        serve(ctrl, args.name, stop, trainer.handle)
    except Interrupted:
        code = 130
    except Exception as exc:  # then the same clean-up
        code = report_failure(ctrl, args.name, f"train-device {args.name}", exc)
    finally:
        if trainer is not None and trainer.data is not None:
            trainer.data.close(linger=0)
        if ctrl is not None:
            ctrl.close(linger=1000)
        ctx.destroy(linger=0)  # also closes a socket that a failed start-up left open (term() would wait for it)
    return code


if __name__ == "__main__":
    exit_without_teardown(main())  # everything is closed by now
