"""Device agent: runs the ONNX head and tail of a split model; the body runs on the edge server.

Raw inputs and labels stay on the device: only the activations at the head cut go up, and only the
activations at the tail cut come back. This inference path never imports torch (a Raspberry Pi
installs the `agent` extra: numpy, pyzmq, onnxruntime).

Stages measured per request (milliseconds):
  head      head forward (onnxruntime)
  uplink    device send -> edge receive (wall clocks; exact on one host or with synchronised clocks)
  queue     waiting at the edge before the body ran (edge's own clock)
  body      body forward at the edge (edge's own clock)
  downlink  edge send -> device receive (wall clocks)
  tail      tail forward (onnxruntime)
  e2e       head start -> tail end (device's monotonic clock)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zmq
from prometheus_client import CollectorRegistry

from testbed.errors import TestbedError
from testbed.lifecycle import AGENT_EXIT_GRACE_S, die_with_parent, stop_event_on_signals
from testbed.metrics.common import register_build_info, register_process_metrics
from testbed.metrics.device import DeviceMetrics
from testbed.metrics.exporter import Exporter, start_exporter
from testbed.onnx_runtime import cpu_session
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind, WireError, WireLimits

STAGES = ("head", "uplink", "queue", "body", "downlink", "tail", "e2e")


class EdgeUnavailable(TestbedError):
    """The edge did not answer in time, or answered with an error."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason  # timeout, refused or malformed: the failure metric's label


class Interrupted(TestbedError):
    """SIGTERM or SIGINT arrived while a request was in flight."""


@dataclass
class InferenceResult:
    """What one device reports: timings per request and accuracy on its local labels."""

    device: str
    partition: str
    split: tuple[int, int]
    batch_size: int
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    samples: int = 0
    correct: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        requests = len(self.stages_ms["e2e"])
        return {
            "device": self.device,
            "partition": self.partition,
            "split": list(self.split),
            "batch_size": self.batch_size,
            "requests": requests,
            "samples": self.samples,
            "correct": self.correct,
            "accuracy": self.correct / self.samples if self.samples else 0.0,
            "wall_s": self.wall_s,
            "throughput_rps": requests / self.wall_s if self.wall_s > 0 else 0.0,
            "stages_ms": self.stages_ms,
        }


class SplitClient:
    """Head on the device, body on the edge, tail on the device; one request in flight."""

    def __init__(
        self,
        head: ort.InferenceSession,
        tail: ort.InferenceSession,
        sock: zmq.Socket | None,
        device_id: str,
        partition: str,
        limits: WireLimits,
        timeout_s: float,
        stop: threading.Event | None = None,
        slowdown: float = 1.0,
        metrics: DeviceMetrics | None = None,
    ) -> None:
        self.stop = stop or threading.Event()
        self.metrics = metrics
        if metrics is not None:
            metrics.set_partition(partition, *_split_of(partition))
        self.slowdown = slowdown
        self.head, self.tail, self.sock = head, tail, sock
        self.device_id, self.partition = device_id, partition
        self.limits, self.timeout_ms = limits, int(timeout_s * 1000)
        self.seq = 0

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter_ns()
        a1 = self.head.run(["a1"], {"x": x})[0]
        self._dilate(t0)
        t1 = time.perf_counter_ns()
        times: dict[str, float] = {"head": (t1 - t0) / 1e6}
        if self.sock is None:  # empty body: the device-only baseline
            a2 = a1
            times.update(uplink=0.0, queue=0.0, body=0.0, downlink=0.0)
        else:
            try:
                a2, net = self._body(a1)
            except EdgeUnavailable as exc:
                if self.metrics is not None:
                    self.metrics.observe_failure(exc.reason)
                raise
            times.update(net)
        t2 = time.perf_counter_ns()
        logits = self.tail.run(["logits"], {"a2": a2})[0]
        self._dilate(t2)
        t3 = time.perf_counter_ns()
        times.update(tail=(t3 - t2) / 1e6, e2e=(t3 - t0) / 1e6)
        if self.metrics is not None:
            sent = (a1.nbytes, a2.nbytes) if self.sock is not None else (0, 0)
            self.metrics.observe_request({s: ms / 1e3 for s, ms in times.items()}, *sent)
        return logits, times

    def _dilate(self, start_ns: int) -> None:
        """Stretch a compute stage by the device's slowdown (emulating a slower CPU in the lab).

        A CPU quota only slows sustained work; sleeping (slowdown - 1) times the compute time makes every
        request as slow as on the emulated device, and uses 1/slowdown of a core, which the quota allows.
        time.sleep overshoots by tens of microseconds whatever it is asked (timer slack; about 75 µs on the CI
        VM), an artefact of the emulation that no real device has: sleep to 200 µs short of the deadline, then
        spin to it (bounded by the deadline).
        """
        if self.slowdown > 1.0:
            now = time.perf_counter_ns()
            deadline = now + int((now - start_ns) * (self.slowdown - 1.0))
            if deadline - now > 200_000:
                time.sleep((deadline - now - 200_000) / 1e9)
            while time.perf_counter_ns() < deadline:
                pass

    def _body(self, a1: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        assert self.sock is not None
        self.seq += 1
        request = Envelope(Kind.INFER_REQUEST, self.device_id, self.seq, partition=self.partition,
                           times_ns={"device_send_ns": time.time_ns()})
        channel.send(self.sock, request, {"a1": a1}, limits=self.limits)
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if self.stop.is_set():
                raise Interrupted("stopped while waiting for the edge")
            if remaining <= 0:
                raise EdgeUnavailable(f"no reply from the edge within {self.timeout_ms} ms (seq {self.seq})",
                                      "timeout")
            if not self.sock.poll(min(remaining, 100)):  # short slices: a stop request is seen at once
                continue
            try:
                _, reply = channel.recv(self.sock, limits=self.limits)
            except WireError as exc:
                raise EdgeUnavailable(f"the edge sent a malformed reply: {exc}", "malformed") from exc
            recv_ns = time.time_ns()
            env = reply.envelope
            if env.seq != self.seq:
                continue  # a late reply to a request that already timed out
            if env.kind is Kind.ERROR:
                detail = env.error.message if env.error else "no detail"
                code = env.error.code if env.error else "?"
                raise EdgeUnavailable(f"the edge refused the request: {code}: {detail}", "refused")
            if env.kind is not Kind.INFER_REPLY or "a2" not in reply.tensors:
                raise EdgeUnavailable(f"unexpected reply kind {env.kind.value} from the edge", "malformed")
            t = env.times_ns
            try:
                net = {
                    "uplink": (t["edge_recv_ns"] - request.times_ns["device_send_ns"]) / 1e6,
                    "queue": t["edge_queue_ns"] / 1e6,
                    "body": t["edge_compute_ns"] / 1e6,
                    "downlink": (recv_ns - t["edge_send_ns"]) / 1e6,
                }
            except KeyError as exc:
                raise EdgeUnavailable(f"the edge's reply lacks timestamp {exc}", "malformed") from exc
            return reply.tensors["a2"], net


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[i : i + batch_size]), y[i : i + batch_size]


def run_inference(
    client: SplitClient, x: np.ndarray, y: np.ndarray, batch_size: int, split: tuple[int, int],
    stop: threading.Event,
) -> InferenceResult:
    result = InferenceResult(client.device_id, client.partition, split, batch_size)
    start = time.perf_counter()
    for xb, yb in batches(x, y, batch_size):
        if stop.is_set():
            break
        logits, times = client.infer(xb)
        for stage, ms in times.items():
            result.stages_ms[stage].append(round(ms, 4))
        result.samples += len(yb)
        result.correct += int((logits.argmax(axis=1) == yb).sum())
    result.wall_s = time.perf_counter() - start
    return result


def load_local_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The device's own data: an .npz with float32 `x` (N, C, H, W) and int64 `y` (never sent anywhere)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise TestbedError(f"cannot read device data {path}: {exc}") from exc
    if x.dtype != np.float32 or len(x) != len(y):
        raise TestbedError(f"{path}: expected float32 x and one label per image")
    return x, y


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="testbed-agent", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    inf = sub.add_parser("infer", help="classify a local data file through the U-shaped pipeline")
    inf.add_argument("--edge", required=True, help="edge server endpoint, e.g. tcp://127.0.0.1:5555")
    inf.add_argument("--device-id", required=True)
    inf.add_argument("--head", type=Path, required=True, help="head ONNX file")
    inf.add_argument("--tail", type=Path, required=True, help="tail ONNX file")
    inf.add_argument("--partition", required=True, help="partition id weights_hash:a:b")
    inf.add_argument("--data", type=Path, required=True, help=".npz with x and y")
    inf.add_argument("--batch-size", type=int, default=10)
    inf.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    inf.add_argument("--timeout-s", type=float, default=30.0, help="per-request reply timeout")
    inf.add_argument("--max-message-mb", type=float, default=256.0)
    inf.add_argument("--out", type=Path, required=True, help="result JSON")
    inf.add_argument("--slowdown", type=float, default=1.0,
                     help="stretch head and tail compute by this factor (a lab device's class, vs this host)")
    inf.add_argument("--parent-pid", type=int, help="exit when this process (the supervisor) dies")
    add_metrics_args(inf)
    inf.add_argument("--metrics-hold-s", type=float, default=0.0,
                     help="after the last request keep serving metrics this long (or until SIGTERM), "
                          "so a scraper sees the final values")
    from agents.device_service import add_serve_args  # imported late: it imports this module

    add_serve_args(sub)
    return p.parse_args(argv)


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one; "
                                                    "default: no metrics)")
    p.add_argument("--metrics-bind", default="127.0.0.1", help="address of the metrics endpoint")


def start_metrics(args: argparse.Namespace, device_class: str = "unknown") -> tuple[DeviceMetrics | None,
                                                                                   Exporter | None]:
    """The device's metrics and their HTTP endpoint, when --metrics-port was given (else None, None)."""
    if args.metrics_port is None:
        return None, None
    registry = CollectorRegistry()
    register_build_info(registry, "device", {"onnxruntime": ort.__version__, "numpy": np.__version__})
    register_process_metrics(registry)
    metrics = DeviceMetrics(registry, args.device_id, device_class)
    exporter = start_exporter(registry, args.metrics_bind, args.metrics_port)
    print(f"testbed-agent {args.device_id}: metrics on {exporter.url}", flush=True)
    return metrics, exporter


def _split_of(partition: str) -> tuple[int, int]:
    try:
        _, a, b = partition.rsplit(":", 2)
        return int(a), int(b)
    except ValueError as exc:
        raise TestbedError(f"bad partition id {partition!r}: expected weights_hash:a:b") from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve":
        from agents.device_service import serve

        return serve(args)
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals(exit_after_s=AGENT_EXIT_GRACE_S)
    ctx = zmq.Context()
    sock: zmq.Socket | None = None
    exporter: Exporter | None = None
    try:
        if args.batch_size < 1:
            raise TestbedError("--batch-size must be at least 1")
        if not 0.0 <= args.metrics_hold_s <= 86400.0:
            raise TestbedError("--metrics-hold-s must be between 0 and 86400")
        metrics, exporter = start_metrics(args)
        if not 1.0 <= args.slowdown <= 1000.0:
            raise TestbedError("--slowdown must be between 1 and 1000")
        split = _split_of(args.partition)
        head, tail = cpu_session(args.head, args.threads), cpu_session(args.tail, args.threads)
        x, y = load_local_data(args.data)
        limits = WireLimits(max_message_bytes=int(args.max_message_mb * 2**20))
        if split[0] != split[1]:
            sock = ctx.socket(zmq.DEALER)
            channel.configure_socket(sock, limits)
            sock.connect(args.edge)
        client = SplitClient(head, tail, sock, args.device_id, args.partition, limits, args.timeout_s, stop,
                             args.slowdown, metrics)
        result = run_inference(client, x, y, args.batch_size, split, stop)
    except Interrupted:
        print(f"testbed-agent {args.device_id}: stopped", file=sys.stderr)
        if exporter is not None:
            exporter.close()
        return 130
    except TestbedError as exc:
        print(f"testbed-agent {args.device_id}: {exc}", file=sys.stderr)
        if exporter is not None:
            exporter.close()
        return 2
    finally:
        if sock is not None:
            sock.close(linger=1000)
        ctx.term()
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_json()))
    os.replace(tmp, args.out)
    accuracy = result.correct / max(result.samples, 1)
    print(f"testbed-agent {args.device_id}: {result.samples} samples, accuracy {accuracy:.4f}", flush=True)
    interrupted = stop.is_set()
    if exporter is not None:
        stop.wait(args.metrics_hold_s)  # the work is done: a SIGTERM here is a normal end
        exporter.close()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
