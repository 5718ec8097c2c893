"""Edge server: runs the body blocks [a_i, b_i) of one shared model for many devices at once.

One ROUTER socket serves every device. The I/O thread receives, validates and replies; a compute
thread runs the body in PyTorch (CUDA when present), so requests keep arriving, and their queue
wait is measured honestly, while a body runs. The model's weights are held once: every device's
body is a slice of the same module list (parameter sharing), whatever its split.

With ``--controller`` the weights may also come over the control plane (``deploy_body``, hash-checked,
agents/edge_control.py): the edge then starts without ``--weights`` and answers requests with ``no_body``
until one arrives. A new body replaces the old one in one assignment; a request keeps the body it was
admitted with, so one in flight finishes on the old weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zmq
from prometheus_client import CollectorRegistry

from agents.edge_control import add_control_args, start_control
from agents.scheduler import FairScheduler, SharesError, parse_shares
from testbed.errors import PartitionError, TestbedError
from testbed.lifecycle import AGENT_EXIT_GRACE_S, die_with_parent, stop_event_on_signals
from testbed.metrics.common import register_build_info, register_process_metrics
from testbed.metrics.edge import EdgeMetrics
from testbed.metrics.exporter import Exporter, start_exporter
from testbed.models import BlockModel
from testbed.models.weights import load_weights
from testbed.partition import PartitionId, activation_shape, check_split
from testbed.wire import channel
from testbed.wire.codec import error_envelope
from testbed.wire.envelope import Envelope, Kind, WireError, WireLimits

_WAKE_ENDPOINT = "inproc://edge-results"


class RequestRejected(WireError):
    """A well-formed message that asks for something this edge cannot do."""


@dataclass
class Job:
    route: bytes
    request: Envelope
    a: int
    b: int
    activations: np.ndarray
    recv_ns: int
    body: Body | None = None  # the body the request was admitted with (runs on it even if a new one came)


@dataclass
class Done:
    route: bytes
    reply: Envelope
    tensors: dict[str, np.ndarray]


class BodyRunner:
    """Runs blocks [a, b) of the shared model on one torch device."""

    def __init__(self, model: BlockModel, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device

    def run(self, activations: np.ndarray, a: int, b: int) -> np.ndarray:
        # Copy out of the receive buffer: it is read-only, and the GPU needs its own copy anyway.
        x = torch.from_numpy(np.array(activations, copy=True)).to(self.device, non_blocking=True)
        with torch.inference_mode():
            y = self.model.run(x, a, b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return y.detach().to("cpu").contiguous().numpy()


@dataclass(frozen=True)
class Body:
    """The weights in service: swapped whole (one attribute assignment), never edited."""

    runner: BodyRunner
    weights_hash: str
    version: int = 0


class EdgeServer:
    def __init__(
        self,
        body: Body | None,
        socket: zmq.Socket,
        ctx: zmq.Context,
        limits: WireLimits,
        stop: threading.Event,
        max_batch: int = 4096,
        shares: Mapping[str, float] | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.metrics = metrics  # None: no metrics
        if metrics is not None and shares:
            metrics.set_shares(shares)
        self.body = body  # None: waiting for deploy_body
        self.sock = socket
        self.ctx = ctx
        self.limits = limits
        self.stop = stop
        self.max_batch = max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.done: queue.Queue[Done] = queue.Queue()
        self.scheduler: FairScheduler[Job] = FairScheduler(shares)  # used by the compute thread only
        self.served = 0
        self.rejected = 0

    # ---- validation: every message either becomes a Job or an error reply ----
    def admit(self, route: bytes, request: Envelope, tensors: dict[str, np.ndarray], recv_ns: int) -> Job:
        if request.kind is not Kind.INFER_REQUEST:
            raise RequestRejected("bad_kind", f"the edge accepts infer_request and ping, not {request.kind.value}")
        body = self.body  # read once: the request is checked against, and runs on, this body
        if body is None:
            raise RequestRejected("no_body", "this edge has no model yet: the controller sends one (deploy_body)")
        model = body.runner.model
        try:
            pid = PartitionId.parse(request.partition)
        except PartitionError as exc:
            raise RequestRejected("bad_partition", str(exc)) from exc
        if not body.weights_hash.startswith(pid.weights_hash):
            raise RequestRejected(
                "unknown_weights",
                f"partition {request.partition} names weights {pid.weights_hash}, "
                f"this edge serves {body.weights_hash[:16]}",
            )
        try:
            check_split(model, pid.a, pid.b)
        except PartitionError as exc:
            raise RequestRejected("bad_partition", str(exc)) from exc
        if set(tensors) != {"a1"}:
            raise RequestRejected("bad_tensors", f"expected exactly one tensor 'a1', got {sorted(tensors)}")
        a1 = tensors["a1"]
        expected = activation_shape(model, pid.a)
        if a1.dtype != np.float32 or a1.ndim != len(expected) + 1 or tuple(a1.shape[1:]) != expected:
            raise RequestRejected(
                "bad_shape",
                f"split point {pid.a} takes float32 (batch, {', '.join(map(str, expected))}), "
                f"got {a1.dtype} {tuple(a1.shape)}",
            )
        if not 1 <= a1.shape[0] <= self.max_batch:
            raise RequestRejected("bad_shape", f"batch size {a1.shape[0]} outside 1..{self.max_batch}")
        return Job(route, request, pid.a, pid.b, a1, recv_ns, body)

    # ---- compute thread ----
    def compute_loop(self) -> None:
        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(_WAKE_ENDPOINT)
        try:
            while (job := self._next_job()) is not None:
                start_ns = time.time_ns()
                try:
                    assert job.body is not None  # admit() gave it one
                    a2 = job.body.runner.run(job.activations, job.a, job.b)
                except Exception as exc:  # a bad body run must not take the server down
                    err = RequestRejected("compute_failed", f"body blocks [{job.a}, {job.b}) failed: {exc}")
                    reply = error_envelope(err.code, err.message, device=job.request.device, seq=job.request.seq)
                    self.done.put(Done(job.route, reply, {}))
                    if self.metrics is not None:
                        self.metrics.observe_rejected(err.code)
                else:
                    end_ns = time.time_ns()
                    if self.metrics is not None:
                        self.metrics.observe_request(job.request.device, (start_ns - job.recv_ns) / 1e9,
                                                     (end_ns - start_ns) / 1e9, job.activations.nbytes, a2.nbytes)
                    reply = Envelope(
                        kind=Kind.INFER_REPLY,
                        device=job.request.device,
                        seq=job.request.seq,
                        partition=job.request.partition,
                        times_ns={
                            "edge_recv_ns": job.recv_ns,
                            "edge_start_ns": start_ns,
                            "edge_end_ns": end_ns,
                            "edge_queue_ns": start_ns - job.recv_ns,
                            "edge_compute_ns": end_ns - start_ns,
                        },
                    )
                    self.done.put(Done(job.route, reply, {"a2": a2}))
                self.scheduler.charge(job.request.device, (time.time_ns() - start_ns) / 1e9)
                wake.send(b"", copy=True)
        finally:
            wake.close(linger=0)

    def _next_job(self) -> Job | None:
        """Move what arrived into the per-device queues, then take the job fair sharing picks (None: stop)."""
        while True:
            try:
                arrived = self.jobs.get(block=len(self.scheduler) == 0)
            except queue.Empty:
                break
            if arrived is None:
                return None
            self.scheduler.push(arrived.request.device, arrived)
        picked = self.scheduler.pop()
        assert picked is not None  # the loop above returns only with a backlog
        return picked[1]

    # ---- I/O thread ----
    def serve(self) -> None:
        wake = self.ctx.socket(zmq.PULL)
        wake.bind(_WAKE_ENDPOINT)
        worker = threading.Thread(target=self.compute_loop, name="edge-compute", daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(100))
                if self.sock in events:
                    self._receive_ready()
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                self._send_done()
        finally:
            self.jobs.put(None)
            worker.join(timeout=10)
            self._send_done()
            wake.close(linger=0)

    def _receive_ready(self) -> None:
        while self.sock.poll(0):
            route: bytes | None = None
            try:
                route, msg = channel.recv(self.sock, limits=self.limits, routed=True)
                recv_ns = time.time_ns()
                if msg.envelope.kind is Kind.PING:
                    # A tensor named "echo" comes back: the profiler and the agents' link probes measure the
                    # downlink with it (edge_send_ns: the downlink's start on the edge's wall clock).
                    echo = {k: v for k, v in msg.tensors.items() if k == "echo"}
                    reply = Envelope(Kind.PONG, msg.envelope.device, msg.envelope.seq,
                                     times_ns={"edge_recv_ns": recv_ns, "edge_send_ns": time.time_ns()})
                    channel.send(self.sock, reply, echo, limits=self.limits, route=route)
                    continue
                try:
                    self.jobs.put(self.admit(route or b"", msg.envelope, msg.tensors, recv_ns))
                except RequestRejected as err:
                    err.device, err.seq = msg.envelope.device, msg.envelope.seq
                    raise
            except WireError as err:
                self.rejected += 1
                if self.metrics is not None:
                    self.metrics.observe_rejected(err.code)
                route = getattr(err, "route", None) or route
                if route is not None:
                    channel.reply_error(self.sock, route, err, limits=self.limits)

    def _send_done(self) -> None:
        while True:
            try:
                done = self.done.get_nowait()
            except queue.Empty:
                return
            if done.reply.kind is Kind.INFER_REPLY:
                times = {**done.reply.times_ns, "edge_send_ns": time.time_ns()}
                done.reply = dataclasses.replace(done.reply, times_ns=times)
                self.served += 1
            channel.send(self.sock, done.reply, done.tensors, limits=self.limits, route=done.route)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TestbedError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def _write_ready(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="testbed-edge", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, help="model weights (.safetensors with metadata); with --controller it "
                                                "may be left out: the controller sends them (deploy_body)")
    p.add_argument("--work-dir", type=Path, help="where weights sent by the controller are kept (default: a "
                                                 "temporary directory, removed at exit)")
    p.add_argument("--bind", default="tcp://127.0.0.1:*", help="ZeroMQ endpoint; port * picks a free one")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-message-mb", type=float, default=256.0, help="cap on one message, also ZMQ_MAXMSGSIZE")
    p.add_argument("--shares", default="", help="edge compute shares, DEVICE=WEIGHT,... (relative; default equal)")
    p.add_argument("--ready-file", type=Path, help="written (JSON: endpoint, pid, device) once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the supervisor) dies")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one; "
                                                    "default: no metrics)")
    p.add_argument("--metrics-bind", default="127.0.0.1", help="address of the metrics endpoint")
    add_control_args(p)
    return p.parse_args(argv)


def start_metrics(args: argparse.Namespace, model: str, weights_hash: str,
                  device: torch.device) -> tuple[EdgeMetrics | None, Exporter | None]:
    """The edge's metrics and their HTTP endpoint, when --metrics-port was given (else None, None).

    ``model`` and ``weights_hash`` are "" while the edge waits for a body (set_info again when one comes)."""
    if args.metrics_port is None:
        return None, None
    registry = CollectorRegistry()
    cuda = torch.version.cuda or "none"
    register_build_info(registry, "edge", {"torch": torch.__version__, "cuda": cuda})
    register_process_metrics(registry)
    metrics = EdgeMetrics(registry)
    metrics.set_info(model, weights_hash, str(device))
    return metrics, start_exporter(registry, args.metrics_bind, args.metrics_port)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals(exit_after_s=AGENT_EXIT_GRACE_S)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        shares = parse_shares(args.shares)
        device = pick_device(args.device)
        if args.weights is None and not args.controller:
            raise TestbedError("give --weights, or --controller to receive the weights from it (deploy_body)")
        body = None
        if args.weights is not None:
            model, weights_hash = load_weights(args.weights)
            body = Body(BodyRunner(model, device), weights_hash)
    except SharesError as exc:
        print(f"testbed-edge: --shares: {exc}", file=sys.stderr)
        return 2
    except TestbedError as exc:
        print(f"testbed-edge: {exc}", file=sys.stderr)
        return 2
    limits = WireLimits(max_message_bytes=int(args.max_message_mb * 2**20))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    channel.configure_socket(sock, limits)
    try:
        sock.bind(args.bind)
    except zmq.ZMQError as exc:
        print(f"testbed-edge: cannot bind {args.bind}: {exc}", file=sys.stderr)
        return 2
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        metrics, exporter = start_metrics(args, body.runner.model.name if body else "",
                                          body.weights_hash if body else "", device)
    except TestbedError as exc:
        print(f"testbed-edge: {exc}", file=sys.stderr)
        sock.close(linger=0)
        ctx.term()
        return 2
    server = EdgeServer(body, sock, ctx, limits, stop, shares=shares, metrics=metrics)
    what = f"{body.runner.model.name} ({body.weights_hash[:16]})" if body else "no model yet (waiting for deploy_body)"
    print(f"testbed-edge: serving {what} on {endpoint}, device {device}", flush=True)
    ready: dict[str, object] = {"endpoint": endpoint, "pid": os.getpid(), "device": str(device),
                                "weights": body.weights_hash if body else None}
    if exporter is not None:
        print(f"testbed-edge: metrics on {exporter.url}", flush=True)
        ready["metrics_url"] = exporter.url
    if args.ready_file:
        _write_ready(args.ready_file, ready)
    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="testbed-edge-")) if own_work_dir else args.work_dir

    def load_body(path: Path, version: int) -> dict[str, object]:
        """Load a weights file sent by the controller and put it in service (the control thread calls it)."""
        model, weights_hash = load_weights(path)
        server.body = Body(BodyRunner(model, device), weights_hash, version)
        if metrics is not None:
            metrics.set_info(model.name, weights_hash, str(device))
        print(f"testbed-edge: now serving {model.name} ({weights_hash[:16]}), version {version}", flush=True)
        return {"model": model.name, "weights_hash": weights_hash, "num_blocks": model.num_blocks}

    try:
        control = start_control(args, ctx, server, metrics, load_body=load_body, work_dir=work_dir,
                                metrics_url=exporter.url if exporter is not None else None)
        try:
            server.serve()
        finally:
            if control is not None:
                control.__exit__(None, None, None)
            sock.close(linger=1000)
            ctx.term()
            if exporter is not None:
                exporter.close()
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"testbed-edge: stopped after {server.served} replies, {server.rejected} rejected messages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
