"""`testbed-agent serve`: a long-running device agent that the controller drives over the control plane.

It registers, heartbeats, and takes commands: ``deploy`` (head and tail ONNX bytes, hash-checked, stored in the
work directory and loaded), ``set_split`` (switch to a deployed partition), ``start`` / ``stop`` (a workload
against the edge), ``report``, ``profile`` (measure the link to an edge with testbed.profiling.links, bounded in
sizes, rounds and time; the result is the LinkMeasurement in the profile store's form). Partition switching never
drops a request: each request reads the current partition once, when it starts, and finishes on it; the next
request uses the new one; every result names the partition that served it. Heartbeats carry data-plane samples
(bytes and seconds per direction, per request) so the controller can estimate the links, and, while a workload
runs, link probe samples (agents.link_probe), which keep measuring a link that no request crosses (a device-only
split). Torch-free, like the rest of the inference path.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import zmq

from agents.control_client import ControlClient
from agents.device import (
    STAGES,
    EdgeUnavailable,
    Interrupted,
    SplitClient,
    add_metrics_args,
    load_local_data,
    start_metrics,
)
from agents.link_probe import LinkProber, ProbeSettings
from testbed.controller import deploy
from testbed.controller.protocol import (
    DEPLOY,
    PROFILE,
    REPORT,
    SET_SPLIT,
    START,
    STOP,
    Command,
    CommandError,
    split_of,
)
from testbed.errors import TestbedError
from testbed.lifecycle import AGENT_EXIT_GRACE_S, die_with_parent, stop_event_on_signals
from testbed.metrics.device import DeviceMetrics
from testbed.onnx_runtime import cpu_session
from testbed.profiling.hostfacts import host_facts
from testbed.profiling.links import EchoTarget, measure_link
from testbed.profiling.records import ProfileError
from testbed.profiling.store import profile_to_dict
from testbed.wire import channel
from testbed.wire.envelope import WireLimits
from testbed.wire.messages import DATA_LIMITS

MAX_RECORDS: Final = 100_000  # per-request records a report can return; counters go on beyond
MAX_PENDING_SAMPLES: Final = 8192


@dataclass
class Loaded:
    """A deployed partition, ready to run."""

    partition: str
    version: int
    head: Any  # onnxruntime.InferenceSession
    tail: Any
    a1_floats: int  # float32 values per sample at the head cut (uplink payload) and at the tail cut
    a2_floats: int
    input_shape: tuple[int, ...]


def _per_sample(shape: list[Any]) -> int:
    dims = [d for d in shape[1:] if isinstance(d, int)]
    return math.prod(dims) if len(dims) == len(shape) - 1 else 0


@dataclass
class Workload:
    """One run of requests, and what it measured."""

    args: dict[str, Any]
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    requests: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    by_partition: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    correct: int = 0
    labelled: int = 0
    started: float = field(default_factory=time.monotonic)
    wall_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


class DeviceService:
    """The state behind the handlers: deployed partitions, the current one, the workload, samples."""

    def __init__(self, device_id: str, work_dir: Path, stop: threading.Event, threads: int = 1,
                 metrics: DeviceMetrics | None = None, slowdown: float = 1.0) -> None:
        self.device_id, self.work_dir, self.stop = device_id, work_dir, stop
        self.threads, self.metrics, self.slowdown = threads, metrics, slowdown
        self.lock = threading.Lock()
        self.deployed: dict[str, Loaded] = {}
        self.current: str | None = None
        self.workload: Workload | None = None
        self.pending_samples: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_SAMPLES)

    def handlers(self) -> dict[str, Any]:
        return {DEPLOY: self.deploy, SET_SPLIT: self.set_split, START: self.start, STOP: self.stop_workload,
                REPORT: self.report, PROFILE: self.profile}

    # ---- commands ----
    def deploy(self, cmd: Command) -> dict[str, Any]:
        dep = deploy.verify(cmd)  # before anything is written
        head_path, tail_path = deploy.store(dep, self.work_dir)
        head, tail = cpu_session(head_path, self.threads), cpu_session(tail_path, self.threads)
        x_in, a1_out = head.get_inputs()[0], head.get_outputs()[0]
        loaded = Loaded(dep.partition, dep.version, head, tail, _per_sample(a1_out.shape),
                        _per_sample(tail.get_inputs()[0].shape),
                        tuple(d if isinstance(d, int) else 1 for d in x_in.shape[1:]))
        with self.lock:
            self.deployed[dep.partition] = loaded
            if cmd.args["activate"]:
                self.current = dep.partition
        return {"partition": dep.partition, "version": dep.version, "active": self.current == dep.partition,
                "head_sha256": dep.head.sha256, "tail_sha256": dep.tail.sha256}

    def set_split(self, cmd: Command) -> dict[str, Any]:
        partition = cmd.args["partition"]
        with self.lock:
            if partition not in self.deployed:
                raise CommandError("not_deployed", f"partition {partition} is not deployed here; deployed: "
                                                   f"{', '.join(sorted(self.deployed)) or 'none'}")
            previous, self.current = self.current, partition
        return {"partition": partition, "previous": previous}

    def start(self, cmd: Command) -> dict[str, Any]:
        with self.lock:
            if self.current is None:
                raise CommandError("no_partition", "no partition is active: deploy one (activate) or set_split first")
            if self.workload is not None and self.workload.thread is not None and self.workload.thread.is_alive():
                raise CommandError("busy", "a workload is running: stop it first")
            if cmd.args["data"] is not None:
                x, y = load_local_data(Path(cmd.args["data"]))
            else:
                shape = self.deployed[self.current].input_shape
                rng = np.random.default_rng(cmd.args["seed"])
                x = rng.standard_normal((cmd.args["synthetic_samples"], *shape), dtype=np.float32)
                y = None
            work = Workload(dict(cmd.args))
            work.thread = threading.Thread(target=self._run, args=(work, x, y), name="workload", daemon=True)
            self.workload = work
        work.thread.start()
        return {"started": True, "partition": self.current}

    def stop_workload(self, cmd: Command) -> dict[str, Any]:
        work = self.workload
        if work is None:
            return {"stopped": False}
        work.stop.set()
        if work.thread is not None:
            work.thread.join(timeout=60)
        return {"stopped": True, **self._summary(work, records=False)}

    def report(self, cmd: Command) -> dict[str, Any]:
        work = self.workload
        with self.lock:
            base = {"device": self.device_id, "partition": self.current, "deployed": sorted(self.deployed)}
        if work is None:
            return {**base, "running": False, "requests": 0, "failed": 0}
        return {**base, **self._summary(work, records=cmd.args["requests"])}

    def profile(self, cmd: Command) -> dict[str, Any]:
        """Measure this device's path to ``edge`` over the data plane's protocol (its own socket).

        Runs on the command thread: heartbeats go on, other commands wait until it is done (at most
        ``budget_s`` plus one reply timeout, plus the first empty-body request's load time when an echo is given).
        """
        a = cmd.args
        echo = None
        if a["echo_partition"] is not None:
            echo = EchoTarget(a["echo_partition"], tuple(a["echo_shape"]))
        try:
            link = measure_link(a["edge"], sizes=a["sizes"], count=a["count"], warmup=a["warmup"],
                                timeout_s=a["timeout_s"], first_timeout_s=max(a["timeout_s"], 30.0),
                                budget_s=a["budget_s"], echo=echo, device_id=self.device_id,
                                limits=DATA_LIMITS)
        except ProfileError as exc:
            raise CommandError("failed", f"profile {a['edge']}: {exc}") from None
        return profile_to_dict(link)

    # ---- heartbeat content ----
    def status(self) -> dict[str, Any]:
        work = self.workload
        with self.lock:
            out: dict[str, Any] = {"partition": self.current, "deployed": len(self.deployed)}
        if work is not None:
            out.update(running=bool(work.thread and work.thread.is_alive()), requests=work.requests,
                       failed=work.failed)
        return out

    def probe_target(self) -> str | None:
        """The edge a running workload talks to (what the link prober measures), else None."""
        work = self.workload
        if work is None or work.thread is None or not work.thread.is_alive():
            return None
        return str(work.args["edge"])

    def add_sample(self, sample: dict[str, Any]) -> None:
        self.pending_samples.append(sample)

    def take_samples(self, limit: int) -> list[dict[str, Any]]:
        out = []
        while self.pending_samples and len(out) < limit:
            out.append(self.pending_samples.popleft())
        return out

    # ---- the workload ----
    def _summary(self, work: Workload, records: bool) -> dict[str, Any]:
        running = bool(work.thread and work.thread.is_alive())
        wall = time.monotonic() - work.started if running else work.wall_s
        out: dict[str, Any] = {
            "running": running, "requests": work.requests, "failed": work.failed, "failures": dict(work.failures),
            "by_partition": dict(work.by_partition), "samples": work.samples, "wall_s": round(wall, 4),
            "accuracy": work.correct / work.labelled if work.labelled else None, "error": work.error,
        }
        if records:
            out["records"] = list(work.records)
        return out

    def _client_for(self, partition: str, sock: zmq.Socket | None, limits: WireLimits, work: Workload,
                    old: SplitClient | None) -> SplitClient:
        with self.lock:
            loaded = self.deployed[partition]
        a, b = split_of(partition)
        client = SplitClient(loaded.head, loaded.tail, sock if a < b else None, self.device_id, partition, limits,
                             work.args["timeout_s"], stop=work.stop, slowdown=self.slowdown, metrics=self.metrics)
        if old is not None:
            client.seq = old.seq  # one sequence per socket: a late reply can never match a new request
        return client

    def _run(self, work: Workload, x: np.ndarray, y: np.ndarray | None) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        channel.configure_socket(sock, DATA_LIMITS)
        try:
            sock.connect(work.args["edge"])
            self._loop(work, x, y, sock)
        except (TestbedError, zmq.ZMQError) as exc:
            work.error = str(exc)
        finally:
            sock.close(linger=1000)
            work.wall_s = time.monotonic() - work.started

    def _loop(self, work: Workload, x: np.ndarray, y: np.ndarray | None, sock: zmq.Socket) -> None:
        args = work.args
        batch, limit, duration = args["batch_size"], args["requests"], args["duration_s"]
        rate = args["rate_rps"]
        n = len(x)
        client: SplitClient | None = None
        start = time.monotonic()
        i = 0
        while not (work.stop.is_set() or self.stop.is_set()):
            if limit is not None and i >= limit:
                break
            if duration is not None and time.monotonic() - start >= duration:
                break
            if rate is not None:
                wait = start + i / rate - time.monotonic()
                if wait > 0 and work.stop.wait(wait):
                    break
            idx = np.arange(i * batch, (i + 1) * batch) % n
            xb = np.ascontiguousarray(x[idx])
            with self.lock:
                partition = self.current  # read once: this request runs on it from start to end
            assert partition is not None
            if client is None or client.partition != partition:
                client = self._client_for(partition, sock, DATA_LIMITS, work, client)
            i += 1
            self._one(work, client, xb, None if y is None else y[idx], partition)

    def _one(self, work: Workload, client: SplitClient, xb: np.ndarray, yb: np.ndarray | None,
             partition: str) -> None:
        wall = time.time()
        try:
            logits, times_ms = client.infer(xb)
        except Interrupted:
            return
        except EdgeUnavailable as exc:
            work.failed += 1
            work.failures[exc.reason] += 1
            if len(work.records) < MAX_RECORDS:
                work.records.append({"t_s": round(wall, 6), "partition": partition, "ok": False,
                                     "error": str(exc)})
            return
        work.requests += 1
        work.by_partition[partition] += 1
        work.samples += len(xb)
        if yb is not None:
            work.labelled += len(yb)
            work.correct += int((logits.argmax(axis=1) == yb).sum())
        with self.lock:
            loaded = self.deployed[partition]
        remote = client.sock is not None
        sample = {
            "t_s": round(wall, 6), "partition": partition, "batch": len(xb),
            "bytes_up": 4 * loaded.a1_floats * len(xb) if remote else 0,
            "bytes_down": 4 * loaded.a2_floats * len(xb) if remote else 0,
            "uplink_s": times_ms["uplink"] / 1e3, "downlink_s": times_ms["downlink"] / 1e3,
            "stages_s": {s: round(times_ms[s] / 1e3, 7) for s in STAGES},
        }
        self.pending_samples.append(sample)
        if len(work.records) < MAX_RECORDS:
            work.records.append({"t_s": round(wall, 6), "partition": partition, "ok": True,
                                 "stages_ms": {s: round(times_ms[s], 4) for s in STAGES}})


def add_serve_args(sub: Any) -> None:
    """The `serve` subcommand's options (called from agents.device.parse_args)."""
    srv = sub.add_parser("serve", help="run as a long-lived agent driven by the controller")
    srv.add_argument("--controller", required=True, help="controller endpoint, e.g. tcp://127.0.0.1:5600")
    srv.add_argument("--device-id", required=True)
    srv.add_argument("--device-class", default="", help="device class name (profiles/devices/*.yaml)")
    srv.add_argument("--work-dir", type=Path, default=Path("agent-work"), help="where deployed partitions go")
    srv.add_argument("--heartbeat-s", type=float, default=1.0)
    srv.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    srv.add_argument("--slowdown", type=float, default=1.0,
                     help="stretch head and tail compute by this factor (a lab device's class, vs this host)")
    srv.add_argument("--parent-pid", type=int, help="exit when this process (the supervisor) dies")
    srv.add_argument("--probe-interval-s", type=float, default=ProbeSettings.interval_s,
                     help="while a workload runs, probe the link to the edge this often (0: never)")
    srv.add_argument("--probe-bytes", type=int, default=ProbeSettings.payload_bytes,
                     help="payload of a link probe, sent up and echoed back")
    add_metrics_args(srv)


def serve(args: argparse.Namespace) -> int:
    if args.parent_pid:
        die_with_parent(expected_parent=args.parent_pid)
    stop = stop_event_on_signals(exit_after_s=AGENT_EXIT_GRACE_S)
    name = args.device_id
    try:
        if not 1 <= args.threads <= 256:
            raise TestbedError("--threads must be between 1 and 256")
        if not 1.0 <= args.slowdown <= 1000.0:
            raise TestbedError("--slowdown must be between 1 and 1000")
        probes = ProbeSettings(args.probe_interval_s, args.probe_bytes)
        if problem := probes.check():
            raise TestbedError(problem)
        metrics, exporter = start_metrics(args, args.device_class or "unknown")
    except TestbedError as exc:
        print(f"testbed-agent {name}: {exc}", file=sys.stderr)
        return 2
    ctx = zmq.Context.instance()
    service = DeviceService(name, args.work_dir, stop, args.threads, metrics, args.slowdown)
    facts = host_facts(probe_accelerator=False)
    facts["slowdown"] = args.slowdown
    facts["probe_interval_s"] = probes.interval_s
    prober = LinkProber(ctx, name, service.probe_target, service.add_sample, stop, probes)
    if exporter is not None:
        facts["metrics_url"] = exporter.url  # so the controller can point a Prometheus at it
    try:
        with ControlClient(ctx, args.controller, name, "device", handlers=service.handlers(), status=service.status,
                           samples=service.take_samples, device_class=args.device_class, facts=facts,
                           heartbeat_s=args.heartbeat_s):
            print(f"testbed-agent {name}: serving, controller {args.controller}", flush=True)
            prober.start()
            while not stop.wait(0.2):
                pass
    except TestbedError as exc:
        print(f"testbed-agent {name}: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        prober.join()
        if service.workload is not None:
            service.workload.stop.set()
            if service.workload.thread is not None:
                service.workload.thread.join(timeout=10)
        if exporter is not None:
            exporter.close()
        ctx.term()
    print(f"testbed-agent {name}: stopped", flush=True)
    return 0
