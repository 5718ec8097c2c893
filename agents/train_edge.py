"""Edge trainer for U-shaped split learning: holds the body, serves every device of a round.

It never sees inputs or labels: devices send activations ``a1`` (TRAIN_FORWARD) and gradients
``g2 = dL/da2`` (TRAIN_BACKWARD); it answers with ``a2`` and ``g1 = dL/da1``. Modes:

* psl, sync (default): one shared body. The activations of every device in a step are concatenated
  along the batch axis (grouped by split; each group one forward), the forward replies go out, and
  once every device's gradient is in, one backward per group; the gradients of the shared body are
  averaged over the devices that used each block (so one device gives exactly the centralized
  step), ``g1`` goes back, and the body optimizer steps once per step.
* psl, async: each device is served as its message arrives; the backward recomputes the body
  forward from the stored ``a1`` with the current weights and steps the optimizer per device.
* sfl: one body copy (and optimizer) per device, each served at once; the controller asks for the
  copies to be averaged (SYNC op ``average``) at the end of every round.
* sl: one device at a time, one body; served at once, the optimizer steps after each backward.

The controller drives it over the control plane (SYNC load/dump/average, ROUND_START/ROUND_END).
``--record FILE`` appends a JSON line per received message (and the tensor bytes to FILE.bin) plus
every file the process opened, for the privacy test (:mod:`agents.train_recorder`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from agents.train_device import Interrupted, control_socket, report_failure
from agents.train_recorder import Recorder
from testbed.errors import TestbedError
from testbed.lifecycle import AGENT_EXIT_GRACE_S, die_with_parent, exit_without_teardown, stop_event_on_signals
from testbed.partition import activation_shapes
from testbed.training.errors import ProtocolError
from testbed.training.experiment import ExperimentSpec
from testbed.training.state import (
    Party,
    edge_blocks,
    edge_copies,
    fedavg,
    load_spec_json,
)
from testbed.wire.channel import reply_error
from testbed.wire.envelope import Envelope, Kind, WireError
from testbed.wire.messages import (
    CONTROL_LIMITS,
    DATA_LIMITS,
    META,
    recv_message,
    send_message,
    unpack_meta,
)


class Rejected(WireError):
    """A well-formed data-plane message this edge will not serve (wrong device, seq, shape...)."""


@dataclass
class Pending:
    route: bytes
    seq: int
    tensor: np.ndarray
    recv_ns: int


@dataclass
class Segment:
    ranges: dict[str, tuple[int, int]]  # device -> [first seq, end seq)
    next_fwd: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)  # device -> its largest batch

    def expected(self, seq: int) -> list[str]:
        return [d for d, (lo, hi) in self.ranges.items() if lo <= seq < hi]

    def complete(self) -> bool:
        return all(self.done.get(d, 0) == hi - lo for d, (lo, hi) in self.ranges.items())


class EdgeTrainer:
    def __init__(self, spec: ExperimentSpec, name: str, ctx: zmq.Context, stop: threading.Event,
                 recorder: Recorder | None, bind: str = "tcp://127.0.0.1:*") -> None:
        self.spec, self.name, self.stop, self.recorder = spec, name, stop, recorder
        self.devices = list(spec.device_names)
        self.index = {d: i for i, d in enumerate(self.devices)}
        self.splits = dict(zip(self.devices, spec.splits, strict=True))
        self.party = Party(spec, edge_copies(spec), edge_blocks(spec))
        self.shapes = activation_shapes(next(iter(self.party.models.values())))
        self.sync = spec.scheme == "psl" and spec.training.mode == "sync"
        self.recompute = spec.scheme == "psl" and spec.training.mode == "async"
        self.data = ctx.socket(zmq.ROUTER)
        self.data.setsockopt(zmq.MAXMSGSIZE, DATA_LIMITS.max_message_bytes)
        self.data.setsockopt(zmq.LINGER, 1000)
        self.data.bind(bind)
        self.endpoint = self.data.getsockopt_string(zmq.LAST_ENDPOINT)
        self.run_id = ""
        self.segment: Segment | None = None
        self.fwd: dict[int, dict[str, Pending]] = {}
        self.bwd: dict[int, dict[str, Pending]] = {}
        self.saved: dict[tuple[str, int], Any] = {}  # immediate modes: (device, seq) -> forward context
        self.groups: dict[int, list[tuple[tuple[int, int], list[str], torch.Tensor, torch.Tensor]]] = {}
        self.batch_of: dict[tuple[str, int], int] = {}
        # A device may send its first forward of a segment before the edge has read the segment's
        # round_start (two sockets, no ordering between them): such messages wait here.
        self.parked: list[tuple[bytes, Envelope, dict[str, np.ndarray], int]] = []
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self.metrics: dict[str, Any] = {"batches": 0, "samples": 0, "max_batch": 0, "bytes_in": 0, "bytes_out": 0,
                                        "times": {"body_fwd": 0.0, "body_bwd": 0.0, "update": 0.0}}

    # ---- control plane ----
    def handle_control(self, kind: Kind, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple | None:
        if kind is Kind.SYNC:
            op = meta.get("op")
            if op == "load":
                self.party.load(tensors)
                if "run" in meta:
                    self.run_id = str(meta["run"])
                return Kind.SYNC_REPLY, {}, {}
            if op == "dump":
                return Kind.SYNC_REPLY, {}, self.party.dump(optimizer=bool(meta.get("optimizer")))
            if op == "average":
                self.average(meta.get("weights") or {})
                return Kind.SYNC_REPLY, {}, {}
            raise ProtocolError(f"unknown sync op {op!r}")
        if kind is Kind.ROUND_START:
            if self.segment is not None:
                raise ProtocolError("round_start while a segment is still running")
            parts = meta.get("parts")
            if not isinstance(parts, dict) or not parts:
                raise ProtocolError(f"round_start needs parts {{device: [first seq, end seq]}}, got {parts!r}")
            ranges: dict[str, tuple[int, int]] = {}
            for dev, rng in parts.items():
                if dev not in self.index or not (isinstance(rng, list) and len(rng) == 2
                                                 and all(isinstance(v, int) for v in rng) and rng[0] < rng[1]):
                    raise ProtocolError(f"round_start: bad part {dev}: {rng!r}")
                ranges[dev] = (rng[0], rng[1])
            sizes = meta.get("batch_sizes", {})
            if not isinstance(sizes, dict) or set(sizes) - set(ranges) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536 for v in sizes.values()):
                raise ProtocolError(f"round_start: batch_sizes must map scheduled devices to 1..65536, got {sizes!r}")
            batch = {d: sizes.get(d, self.spec.training.batch_size) for d in ranges}
            self.segment = Segment(ranges, {d: r[0] for d, r in ranges.items()}, dict.fromkeys(ranges, 0), batch)
            self._reset_metrics()
            return None  # answered with ROUND_END once the segment's steps are done
        raise ProtocolError(f"the edge does not accept {kind.value} on the control plane")

    def average(self, weights: Mapping[str, float]) -> None:
        """sfl: replace every body copy by the weighted average of all copies (optimizer states stay)."""
        if self.spec.scheme != "sfl":
            raise ProtocolError("only the sfl edge holds body copies to average")
        if set(weights) != set(self.devices) or not all(isinstance(w, int | float) and w > 0 for w in weights.values()):
            raise ProtocolError(f"average needs a positive weight per device, got {weights!r}")
        state = self.party.dump()
        per_copy = [{k.split("/", 2)[2]: v for k, v in state.items() if k.startswith(f"w/{d}/")} for d in self.devices]
        avg = fedavg(per_copy, [float(weights[d]) for d in self.devices])
        self.party.load({f"w/{d}/{k}": v for d in self.devices for k, v in avg.items()})

    # ---- data plane ----
    def reject(self, code: str, message: str, env: Envelope) -> Rejected:
        err = Rejected(code, message)
        err.device, err.seq = env.device, env.seq
        return err

    def admit(self, env: Envelope, tensors: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
        seg = self.segment
        dev = env.device
        if env.kind not in (Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD):
            raise self.reject("bad_kind", f"the training edge accepts train_forward/train_backward, not "
                                          f"{env.kind.value}", env)
        if seg is None or dev not in seg.ranges:
            raise self.reject("not_scheduled", f"device {dev!r} has no steps scheduled now", env)
        a, b = self.splits[dev]
        if env.partition != f"{self.run_id}:{a}:{b}":
            raise self.reject("bad_partition", f"partition {env.partition!r}, expected {self.run_id}:{a}:{b}", env)
        lo, hi = seg.ranges[dev]
        if not lo <= env.seq < hi:
            raise self.reject("bad_seq", f"seq {env.seq} outside this segment's [{lo}, {hi})", env)
        if env.kind is Kind.TRAIN_FORWARD:
            name, shape = "a1", self.shapes[a]
            if env.seq != seg.next_fwd[dev]:
                raise self.reject("bad_seq", f"expected the forward of seq {seg.next_fwd[dev]}, got {env.seq}", env)
        else:
            name, shape = "g2", self.shapes[b]
            if (dev, env.seq) not in self.batch_of:
                raise self.reject("bad_seq", f"backward of seq {env.seq} before its forward", env)
        arr = tensors.get(name)
        if set(tensors) != {name} or arr is None:
            raise self.reject("bad_tensors", f"expected exactly one tensor {name!r}, got {sorted(tensors)}", env)
        batch = arr.shape[0] if arr.ndim else 0
        if arr.dtype != np.float32 or tuple(arr.shape[1:]) != tuple(shape) or batch < 1:
            raise self.reject("bad_shape", f"{name} must be float32 (batch, {', '.join(map(str, shape))}), got "
                                           f"{arr.dtype} {tuple(arr.shape)}", env)
        if env.kind is Kind.TRAIN_FORWARD:
            if batch > seg.batch[dev]:
                raise self.reject("bad_shape", f"batch {batch} > batch_size {seg.batch[dev]}", env)
            seg.next_fwd[dev] += 1
        elif batch != self.batch_of[(dev, env.seq)]:
            raise self.reject("bad_shape", f"g2 batch {batch} != the forward's {self.batch_of[(dev, env.seq)]}", env)
        return name, arr

    def on_data(self, route: bytes, env: Envelope, tensors: dict[str, np.ndarray], recv_ns: int) -> None:
        _, arr = self.admit(env, tensors)
        pending = Pending(route, env.seq, arr, recv_ns)
        if env.kind is Kind.TRAIN_FORWARD:
            self.batch_of[(env.device, env.seq)] = arr.shape[0]
            if self.sync:
                self.fwd.setdefault(env.seq, {})[env.device] = pending
                self._sync_forward(env.seq)
            else:
                self._forward_now(env.device, pending)
        elif self.sync:
            self.bwd.setdefault(env.seq, {})[env.device] = pending
            self._sync_backward(env.seq)
        else:
            self._backward_now(env.device, pending)

    def _reply(self, kind: Kind, dev: str, p: Pending, name: str, arr: np.ndarray, start_ns: int, end_ns: int) -> None:
        times = {"edge_recv_ns": p.recv_ns, "edge_start_ns": start_ns, "edge_end_ns": end_ns,
                 "edge_send_ns": time.time_ns()}
        self.metrics["bytes_out"] += send_message(self.data, kind, self.name, p.seq, tensors={name: arr},
                                                  partition="", times=times, route=p.route, limits=DATA_LIMITS)

    @staticmethod
    def _tensor(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(arr, copy=True))  # out of the read-only receive buffer

    def _sync_forward(self, seq: int) -> None:
        assert self.segment is not None
        expected = self.segment.expected(seq)
        arrived = self.fwd[seq]
        if set(arrived) != set(expected):
            return
        del self.fwd[seq]
        by_split: dict[tuple[int, int], list[str]] = {}
        for dev in sorted(expected, key=self.index.__getitem__):  # a fixed order: deterministic batches
            by_split.setdefault(self.splits[dev], []).append(dev)
        model = self.party.models["main"]
        groups = []
        for (a, b), devs in by_split.items():
            start_ns, t0 = time.time_ns(), time.perf_counter()
            a1 = torch.cat([self._tensor(arrived[d].tensor) for d in devs]).requires_grad_(True)
            out = model.run(a1, a, b)
            sizes = [arrived[d].tensor.shape[0] for d in devs]
            pieces = out.detach().split(sizes)
            end_ns = time.time_ns()
            self.metrics["times"]["body_fwd"] += time.perf_counter() - t0
            self.metrics["batches"] += 1
            self.metrics["samples"] += sum(sizes)
            self.metrics["max_batch"] = max(self.metrics["max_batch"], sum(sizes))
            for d, piece in zip(devs, pieces, strict=True):
                self._reply(Kind.TRAIN_FORWARD_REPLY, d, arrived[d], "a2", piece.contiguous().numpy(), start_ns, end_ns)
            groups.append(((a, b), devs, a1, out))
        self.groups[seq] = groups

    def _sync_backward(self, seq: int) -> None:
        assert self.segment is not None
        expected = self.segment.expected(seq)
        arrived = self.bwd[seq]
        if set(arrived) != set(expected):
            return
        del self.bwd[seq]
        groups = self.groups.pop(seq)
        model = self.party.models["main"]
        opt = self.party.optimizers["main"]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        # Each device's loss is the mean over its own batch. The shared body follows the mean over every
        # sample of the step that ran a block: device i's gradient weighs b_i / sum(b) over that block's
        # users. Scale g2_i by s_i = b_i / mean(b) (1 when the batches are equal: the mean over devices,
        # bit for bit as before), divide each block by the sum of its users' s_i, and return
        # g1_i = dL_i/da1_i unscaled.
        sizes_of = {d: arrived[d].tensor.shape[0] for d in expected}
        mean_b = sum(sizes_of.values()) / len(sizes_of)
        scale = {d: b / mean_b for d, b in sizes_of.items()}
        for (_a, _b), devs, a1, out in groups:
            start_ns = time.time_ns()
            pieces = [self._tensor(arrived[d].tensor) for d in devs]
            pieces = [g if scale[d] == 1.0 else g * scale[d] for d, g in zip(devs, pieces, strict=True)]
            torch.autograd.backward(out, torch.cat(pieces))
            assert a1.grad is not None
            sizes = [sizes_of[d] for d in devs]
            end_ns = time.time_ns()
            for d, piece in zip(devs, a1.grad.split(sizes), strict=True):
                g1 = piece if scale[d] == 1.0 else piece / scale[d]
                self._reply(Kind.TRAIN_BACKWARD_REPLY, d, arrived[d], "g1", g1.contiguous().numpy(), start_ns,
                            end_ns)
        t1 = time.perf_counter()
        users: dict[int, float] = {}
        for (a, b), devs, _, _ in groups:
            for k in range(a, b):
                users[k] = users.get(k, 0.0) + sum(scale[d] for d in devs)
        for k, total in users.items():
            if total != 1.0:
                for p in model.blocks[k].parameters():
                    if p.grad is not None:
                        p.grad.div_(total)
        opt.step()
        self.metrics["times"]["body_bwd"] += t1 - t0
        self.metrics["times"]["update"] += time.perf_counter() - t1
        for d in expected:
            self._step_done(d, seq)

    def _copy(self, dev: str) -> str:
        return dev if self.spec.scheme == "sfl" else "main"

    def _forward_now(self, dev: str, p: Pending) -> None:
        a, b = self.splits[dev]
        model = self.party.models[self._copy(dev)]
        start_ns, t0 = time.time_ns(), time.perf_counter()
        a1 = self._tensor(p.tensor)
        if self.recompute:
            with torch.no_grad():
                out = model.run(a1, a, b)
            self.saved[(dev, p.seq)] = a1
        else:
            a1.requires_grad_(True)
            out = model.run(a1, a, b)
            self.saved[(dev, p.seq)] = (a1, out)
        end_ns = time.time_ns()
        self.metrics["times"]["body_fwd"] += time.perf_counter() - t0
        self.metrics["batches"] += 1
        self.metrics["samples"] += a1.shape[0]
        self.metrics["max_batch"] = max(self.metrics["max_batch"], a1.shape[0])
        self._reply(Kind.TRAIN_FORWARD_REPLY, dev, p, "a2", out.detach().contiguous().numpy(), start_ns, end_ns)

    def _backward_now(self, dev: str, p: Pending) -> None:
        a, b = self.splits[dev]
        copy = self._copy(dev)
        model, opt = self.party.models[copy], self.party.optimizers[copy]
        start_ns, t0 = time.time_ns(), time.perf_counter()
        saved = self.saved.pop((dev, p.seq))
        opt.zero_grad(set_to_none=True)
        if self.recompute:  # async: the weights may have moved since the forward; recompute with the current ones
            a1 = saved.requires_grad_(True)
            out = model.run(a1, a, b)
        else:
            a1, out = saved
        torch.autograd.backward(out, self._tensor(p.tensor))
        assert a1.grad is not None
        end_ns = time.time_ns()
        t1 = time.perf_counter()
        self._reply(Kind.TRAIN_BACKWARD_REPLY, dev, p, "g1", a1.grad.contiguous().numpy(), start_ns, end_ns)
        opt.step()
        self.metrics["times"]["body_bwd"] += t1 - t0
        self.metrics["times"]["update"] += time.perf_counter() - t1
        self._step_done(dev, p.seq)

    def _step_done(self, dev: str, seq: int) -> None:
        assert self.segment is not None
        self.batch_of.pop((dev, seq), None)
        self.segment.done[dev] += 1

    def segment_finished(self) -> dict[str, Any] | None:
        if self.segment is None or not self.segment.complete():
            return None
        self.segment = None
        return self.metrics

    # ---- the loop ----
    def serve(self, ctrl: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(ctrl, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        while not self.stop.is_set():
            events = dict(poller.poll(100))
            if self.data in events:
                while self.data.poll(0):
                    self._data_message()
                finished = self.segment_finished()
                if finished is not None:
                    send_message(ctrl, Kind.ROUND_END, self.name, 0, meta=finished, limits=CONTROL_LIMITS)
            if ctrl in events:
                _, env, tensors, _ = recv_message(ctrl, limits=CONTROL_LIMITS)
                if self.recorder:
                    self.recorder.record("control", env, tensors)
                meta = unpack_meta(tensors)
                reply = self.handle_control(env.kind, meta, {k: v for k, v in tensors.items() if k != META})
                if reply is not None:
                    kind, rmeta, rtensors = reply
                    send_message(ctrl, kind, self.name, env.seq, meta=rmeta, tensors=rtensors, limits=CONTROL_LIMITS)
                self.replay_parked()

    def _data_message(self) -> None:
        route: bytes | None = None
        try:
            route, env, tensors, nbytes = recv_message(self.data, routed=True, limits=DATA_LIMITS)
            recv_ns = time.time_ns()
            self.metrics["bytes_in"] += nbytes
            if self.recorder:
                self.recorder.record("data", env, tensors)
            if self._early(env):
                self.parked.append((route or b"", env, tensors, recv_ns))
                return
            self.on_data(route or b"", env, tensors, recv_ns)
        except WireError as err:
            route = err.route or route
            if route is not None:
                reply_error(self.data, route, err, limits=DATA_LIMITS)

    def _early(self, env: Envelope) -> bool:
        """A known device's forward that arrived before the round_start scheduling it (kept: at most one each)."""
        if env.kind is not Kind.TRAIN_FORWARD or env.device not in self.index:
            return False
        if self.segment is not None and env.device in self.segment.ranges:
            return False
        if any(e.device == env.device for _, e, _, _ in self.parked):
            raise self.reject("not_scheduled", f"device {env.device!r} sent a second forward before its steps "
                                               "were scheduled", env)
        return True

    def replay_parked(self) -> None:
        """Serve the forwards that arrived before this segment's round_start (in arrival order)."""
        if self.segment is None:
            return
        ready = [p for p in self.parked if p[1].device in self.segment.ranges]
        self.parked = [p for p in self.parked if p[1].device not in self.segment.ranges]
        for route, env, tensors, recv_ns in ready:
            try:
                self.on_data(route, env, tensors, recv_ns)
            except WireError as err:
                reply_error(self.data, route, err, limits=DATA_LIMITS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-edge", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="edge")
    p.add_argument("--control", required=True, help="the controller's endpoint")
    p.add_argument("--spec", type=Path, required=True, help="the experiment JSON written by the controller")
    p.add_argument("--bind", default="tcp://127.0.0.1:*", help="the data plane's endpoint (the lab: its edge address)")
    p.add_argument("--record", type=Path, help="append every received message here (privacy test)")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the controller) dies")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals(exit_after_s=AGENT_EXIT_GRACE_S)
    recorder = Recorder(args.record) if args.record else None
    if recorder is not None:
        sys.addaudithook(recorder.audit)
    ctx = zmq.Context()
    ctrl: zmq.Socket | None = None
    edge: EdgeTrainer | None = None
    code = 0
    try:
        spec = load_spec_json(args.spec)
        if spec.scheme == "centralized":
            raise TestbedError("a centralized experiment has no edge")
        torch.set_num_threads(spec.runtime.edge_threads)
        edge = EdgeTrainer(spec, args.name, ctx, stop, recorder, args.bind)
        ctrl = control_socket(ctx, args.name, args.control)
        send_message(ctrl, Kind.PING, args.name, 0, meta={"pid": os.getpid(), "endpoint": edge.endpoint})
        edge.serve(ctrl)
    except Interrupted:
        code = 130
    except Exception as exc:  # then the same clean-up
        code = report_failure(ctrl, args.name, "train-edge", exc)
    finally:
        if recorder is not None:
            recorder.close()
        if edge is not None:
            edge.data.close(linger=0)
        if ctrl is not None:
            ctrl.close(linger=1000)
        ctx.destroy(linger=0)  # also closes a socket that a failed start-up left open (term() would wait for it)
    return code


if __name__ == "__main__":
    exit_without_teardown(main())  # everything is closed by now
