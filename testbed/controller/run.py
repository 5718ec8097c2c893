"""`testbed run EXPERIMENT.yaml`: one experiment from its file to its results.

validate the spec -> weights, planning problem, initial plan, data shards -> place the processes (loopback, lab
or inventory) -> controller + exporter, edge, one device agent per device; wait for registration -> with
`planner.profile_links`, every agent measures its link to the edge (`profile`), the measurements go to
OUTPUT/profiles/ and the initial plan is made on them (not on the nominal link profiles) -> deploy every
device's head and tail, set the edge shares -> start the workloads -> every `planner.evaluate_every`: feed the
data plane's timings to the live estimator, apply due link changes, re-plan on the live problem (only the
devices that are up) and move the splits the decision changes (deploy, then set_split; requests in flight finish
on the old partition) -> stop, collect every request's record -> requests.csv, decisions.jsonl, summary.json and
latency.png in the output directory. Everything started is stopped on the way out, also on Ctrl-C or SIGTERM
(they arrive as KeyboardInterrupt) and on errors.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.controller import prepare, results
from testbed.controller.api import Controller, ControllerTimeout
from testbed.controller.estimates import EstimateError, LiveEstimator, RequestTiming
from testbed.controller.launch import Launch, start_controller_exporter, start_processes, start_prometheus
from testbed.controller.placement import Placement, placement_for
from testbed.controller.protocol import split_of
from testbed.controller.registry import Change
from testbed.controller.replan import Decision, Replanner, problem_with_estimates
from testbed.controller.runspec import RunSpec
from testbed.controller.server import CommandFailed
from testbed.errors import TestbedError
from testbed.planning.model import Plan
from testbed.supervisor import Child, ProcessGroup

Say = Callable[[str], None]
RESULT_FILES = ("requests.csv", "decisions.jsonl", "summary.json", "latency.png")
RECENT = 40  # e2e samples per device behind the live p50
#: What each agent measures before the first plan (`planner.profile_links`): two sizes around the activations'
#: (a batch of 8 is about 100 kB at the CNN's cuts), few rounds, bounded: about 3 s on an LTE uplink, 0.1 s on 6G.
PROFILE_ARGS: dict[str, Any] = {"sizes": [16 * 1024, 256 * 1024], "count": 6, "warmup": 1, "timeout_s": 10.0,
                                "budget_s": 20.0}
PROFILES_DIR = "profiles"


class RunError(TestbedError):
    """The run could not be carried out (a process failed, nodes did not register, ...)."""


@dataclass(frozen=True)
class DeviceProgress:
    device: str
    up: bool
    split: tuple[int, int] | None
    p50_ms: float | None  # over the last RECENT requests
    requests: int
    failed: int


@dataclass(frozen=True)
class Progress:
    phase: str
    elapsed_s: float
    duration_s: float | None
    devices: tuple[DeviceProgress, ...]
    replans: int
    reason: str


@dataclass
class _State:
    """What the loop keeps between evaluations."""

    t0_wall: float = 0.0
    t0: float = 0.0
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)
    up: set[str] = field(default_factory=set)
    recent: dict[str, deque[float]] = field(default_factory=dict)
    events: list[results.Event] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    replans: int = 0
    dropped_samples: int = 0
    probes: int = 0
    reason: str = ""


class Run:
    """One experiment; :meth:`execute` does it all and returns the summary."""

    def __init__(self, spec: RunSpec, *, say: Say = print, progress: Callable[[Progress], None] | None = None,
                 state_dir: Path | None = None, cache_dir: Path | None = None, heartbeat_s: float = 1.0,
                 register_timeout_s: float = 120.0, probe_interval_s: float | None = None) -> None:
        if spec.mode != "inference":
            raise RunError("mode: training is run by `testbed train EXPERIMENT.yaml` for now; `testbed run` runs "
                           "inference experiments")
        assert spec.workload is not None
        if spec.placement.kind == "inventory":  # ids and classes from the inventory, before anything is planned
            from testbed.controller.remote_placement import bind_devices
            from testbed.remote.inventory import load_inventory

            assert spec.placement.inventory is not None
            spec = bind_devices(spec, load_inventory(spec.placement.inventory))
        self.spec, self.say, self.on_progress = spec, say, progress
        self.state_dir, self.cache_dir = state_dir, cache_dir or prepare.default_cache_dir()
        self.heartbeat_s, self.register_timeout_s = heartbeat_s, register_timeout_s
        # agents probe their link this often while a workload runs: the caller's override, else the spec's
        self.probe_interval_s = spec.planner.probe_interval_s if probe_interval_s is None else probe_interval_s
        self.ids = [d.id for d in spec.devices]
        self.st = _State()
        self.changes: queue.Queue[Change] = queue.Queue()
        self.readmitted: set[str] = set()
        self._ctl: Controller | None = None
        self._edge_endpoint = ""
        self._edge_metrics_url: str | None = None
        self.prometheus: dict[str, Any] | None = None

    # ---- the whole run ----
    def execute(self) -> dict[str, Any]:
        spec, out = self.spec, self.spec.output
        out.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
        self.problem = prepare.build_run_problem(spec)  # cheap, and the likeliest to refuse: first
        self.link_sources = {d: "nominal" for d in self.ids}
        profile = spec.profile_links
        if profile:
            for old in (out / PROFILES_DIR).glob("*-link.yaml"):
                old.unlink()
        dataset = None
        if prepare.needs_dataset(spec):
            from testbed.training.datasets import load_dataset

            assert spec.workload is not None
            dataset = load_dataset(spec.workload.dataset)
        weights = prepare.load_run_weights(spec, dataset, self.cache_dir, self.say)
        self.partitions = prepare.Partitions(weights, self.cache_dir)
        self.replanner = Replanner(spec.planner.policy(), fixed=spec.fixed_splits, algorithm=spec.planner.algorithm)
        first = None if profile else self._initial_plan()  # with profiling: once the links are measured
        shards = prepare.write_shards(spec, dataset, out / "data") if dataset is not None else {}
        self.estimator = LiveEstimator(spec.planner.estimator(), self.problem.model)
        with contextlib.ExitStack() as stack:
            placement = placement_for(spec, self.state_dir, self.say)
            stack.callback(placement.close)
            group = stack.enter_context(ProcessGroup(out / "logs"))
            ctl = stack.enter_context(Controller(placement.controller_bind, run_dir=out,
                                                 heartbeat_s=self.heartbeat_s))
            ctl.on_change(self.changes.put)
            self._ctl = ctl
            exporter = None
            if spec.metrics.enabled:
                exporter = start_controller_exporter(ctl, placement, self.say)
                stack.callback(exporter.close)
            edge, edge_endpoint = self._start_processes(placement, group, ctl, weights, out)
            if first is None:
                self.problem = prepare.build_run_problem(spec, self._profile_links(ctl, edge_endpoint, weights))
                first = self._initial_plan()
            if spec.metrics.prometheus and exporter is not None:
                prom, self.prometheus = start_prometheus(spec, ctl, placement, exporter.url, self._edge_metrics_url,
                                                         self.say)
                stack.callback(prom.close)
            self._deploy_initial(ctl, first)
            (out / "pids.json").write_text(json.dumps(group.pids()))
            end_s = self._workload(ctl, group, edge, edge_endpoint, placement, shards, first)
            reports = self._collect(ctl)
        return self._write(reports, end_s, weights)

    # ---- setup ----
    def _initial_plan(self) -> Decision:
        first = self.replanner.evaluate(self.problem, 0.0)
        self.say("initial plan: " + _describe(first.plan))
        for d in first.plan.devices:
            self.partitions.get(d.a, d.b)  # export before any device needs it
        return first

    def _profile_links(self, ctl: Controller, edge_endpoint: str, weights: Any) -> dict[str, Any]:
        """Every device measures its link to the edge (one after another: the edge's link is shared); the
        measurements are saved as OUTPUT/profiles/DEVICE-link.yaml (the profile store's format). A device whose
        measurement fails or lacks a rate keeps its nominal link profile (said, and recorded in decisions.jsonl)."""
        from testbed.profiling.links import empty_body_echo
        from testbed.profiling.problem import link_rates
        from testbed.profiling.records import LinkMeasurement, ProfileError
        from testbed.profiling.store import profile_from_dict, save_profile

        folder = self.spec.output / PROFILES_DIR
        echo = empty_body_echo(weights.model, weights.weights_hash)  # so the edge's per-request cost is measured
        measured: dict[str, LinkMeasurement] = {}
        for dev in self.ids:
            record: dict[str, Any] = {"t_s": 0.0, "event": "profile", "device": dev}
            try:
                data = ctl.profile(dev, edge_endpoint, echo_partition=echo.partition,
                                   echo_shape=list(echo.sample_shape), **PROFILE_ARGS)
                link = profile_from_dict(data, where=f"{dev}'s link measurement")
                if not isinstance(link, LinkMeasurement):
                    raise ProfileError(f"{dev} answered profile with a {type(link).__name__}, not a link")
                up, down, delay = link_rates(link)
            except (CommandFailed, ProfileError) as exc:
                self.say(f"{dev}: link not measured ({exc}); planning with its link profile")
                self.st.decisions.append({**record, "source": "nominal", "error": str(exc)})
                continue
            path = save_profile(link, folder / f"{dev}-link.yaml")
            measured[dev] = link
            self.link_sources[dev] = "measured"
            self.st.decisions.append({**record, "source": "measured", "file": f"{PROFILES_DIR}/{path.name}",
                                      "up_mbps": round(up / 1e6, 3), "down_mbps": round(down / 1e6, 3),
                                      "delay_ms": round(delay * 1e3, 4),
                                      "edge_request_ms": None if link.edge_request_s is None
                                      else round(link.edge_request_s * 1e3, 4)})
            self.say(f"{dev}: link measured, up {up / 1e6:.1f} Mbit/s, down {down / 1e6:.1f} Mbit/s, "
                     f"delay {delay * 1e3:.3f} ms -> {path}")
        return measured

    def _start_processes(self, placement: Placement, group: ProcessGroup, ctl: Controller, weights: Any,
                         out: Path) -> tuple[Child | None, str]:
        launch = Launch(ctl.endpoint, weights.path, self.heartbeat_s, self.probe_interval_s, self.register_timeout_s,
                        out)
        started = start_processes(self.spec, placement, group, launch, self.say)
        self._edge_metrics_url = started.edge_metrics_url
        self._wait_registered(group, list(started.children), out)
        return started.edge, started.endpoint

    def _wait_registered(self, group: ProcessGroup, children: list[Child], out: Path) -> None:
        ctl = self._ctl
        assert ctl is not None
        deadline = time.monotonic() + self.register_timeout_s
        while True:
            group.check_alive(children)
            try:
                ctl.wait_for(len(self.ids), timeout_s=0.5)
                break
            except ControllerTimeout as exc:
                if time.monotonic() > deadline:
                    raise RunError(f"nodes did not register within {self.register_timeout_s:g} s: {exc}; "
                                   f"see {out / 'logs'}") from None
        self.st.up = set(self.ids)
        with contextlib.suppress(queue.Empty):
            while True:  # the registrations just waited for are not membership changes of the run
                self.changes.get_nowait()
        self.say(f"{len(self.ids)} device agent(s) registered: {', '.join(self.ids)}")

    def _deploy_initial(self, ctl: Controller, decision: Decision) -> None:
        for d in decision.plan.devices:
            pid, head, tail = self.partitions.get(d.a, d.b)
            ctl.deploy(d.device, head, tail, pid, activate=True)
            self.st.splits[d.device] = (d.a, d.b)
        self._set_shares(ctl, decision.plan)
        links = {d.name: {"source": self.link_sources.get(d.name, "nominal"), "up_bps": d.uplink_bps,
                          "down_bps": d.downlink_bps, "delay_s": d.delay_s, "edge_request_s": d.edge_request_s}
                 for d in self.problem.devices}
        self.st.decisions.append({**results.decision_record(decision, 0.0), "links": links})

    # ---- the workload and the re-planning loop ----
    def _workload(self, ctl: Controller, group: ProcessGroup, edge: Child | None, edge_endpoint: str,
                  placement: Placement, shards: dict[str, Path], first: Decision) -> float:
        spec, st = self.spec, self.st
        work = spec.workload
        assert work is not None
        st.t0_wall, st.t0 = time.time(), time.monotonic()
        for e in (results.Event(0.0, "split", d.device, f"{d.a}:{d.b}", "initial plan") for d in first.plan.devices):
            st.events.append(e)
        self.replanner.adopt(first.plan, 0.0)
        self._edge_endpoint = edge_endpoint
        self._start_args: dict[str, dict[str, Any]] = {}
        for i, dev in enumerate(spec.devices):
            args: dict[str, Any] = {"seed": i}
            if dev.id in shards:
                args["data"] = placement.stage(dev.id, shards[dev.id])
            for key, value in (("requests", work.requests), ("rate_rps", work.rate_rps)):
                if value is not None:
                    args[key] = value
            self._start_args[dev.id] = args
            timed = {} if work.duration_s is None else {"duration_s": work.duration_s}
            ctl.start_workload(dev.id, edge_endpoint, batch_size=work.batch_size, **timed, **args)
        self.say(f"workloads started on {len(self.ids)} device(s)")
        pending = list(spec.link_changes)
        expected = work.duration_s if work.duration_s is not None else None
        limit_s = (work.duration_s or 0.0) + 120.0 if work.duration_s else 3600.0
        every = spec.planner.evaluate_every_s
        next_eval = every
        while True:
            now = time.monotonic() - st.t0
            group.check_alive([edge] if edge is not None else [])  # a remote edge: its heartbeats tell
            while pending and pending[0].at_s <= now:
                change = pending.pop(0)
                placement.set_link(change.device, change.link)
                t = time.time() - st.t0_wall
                st.events.append(results.Event(round(t, 3), "link", change.device, change.link.name))
                st.decisions.append({"t_s": round(t, 3), "event": "link_change", "device": change.device,
                                     "link": change.link.name})
                self.say(f"t={t:.1f} s: {change.device} link -> {change.link.name}")
            self._observe(ctl, now)
            membership = self._membership(now)
            if now >= next_eval or membership:
                next_eval = now + every
                self._evaluate(ctl, now, membership)
            self._progress("running", now, expected)
            if self._finished(ctl, now):
                break
            if now > limit_s:
                raise RunError(f"the workloads did not finish within {limit_s:g} s")
            wait = min(next_eval, pending[0].at_s if pending else math.inf) - (time.monotonic() - st.t0)
            time.sleep(min(max(wait, 0.01), 0.25))
        return time.time() - st.t0_wall

    def _finished(self, ctl: Controller, now: float) -> bool:
        if now < 2 * self.heartbeat_s:
            return False  # the first heartbeats after start carry "running"
        for view in ctl.nodes():
            if view.role == "device" and view.name in self.st.up and view.status.get("running", True):
                return False
        return True

    def _observe(self, ctl: Controller, now: float) -> None:
        for device, samples in ctl.take_samples().items():
            recent = self.st.recent.setdefault(device, deque(maxlen=RECENT))
            for s in samples:
                try:
                    if s.get("probe"):
                        self._observe_probe(device, s, now)
                        continue
                    a, b = split_of(s["partition"])
                    stages = s["stages_s"]
                    timing = RequestTiming(int(s["bytes_up"]), float(s["uplink_s"]), int(s["bytes_down"]),
                                           float(s["downlink_s"]), float(stages["head"]), float(stages["body"]),
                                           float(stages["tail"]), a, b)
                    self.estimator.observe(device, timing, now)
                    recent.append(float(stages["e2e"]))
                except (EstimateError, KeyError, TypeError, ValueError):
                    self.st.dropped_samples += 1  # a sample that cannot be right says nothing
            est = self.estimator.link(device, now)
            if est.samples:
                ctl.set_link_estimate(device, uplink_bps=est.uplink_bps, downlink_bps=est.downlink_bps,
                                      rtt_s=est.rtt_s)

    def _observe_probe(self, device: str, sample: dict[str, Any], now: float) -> None:
        """A link probe counts (round trip and transfers) only while the device's split is device-only.

        Then the probes are the only traffic on the link: without them the estimate would stay at the value that
        moved the split, and the split could never move back. While requests cross the link their own timings
        are the better sample (the activation size the model charges); the probes' small payloads would switch
        the estimator to its two-size fit, and their round trips set the delay, both thrown far off by the
        edge's first requests (a probe answered while the edge loads its body took 0.5 s in the lab).
        """
        split = self.st.splits.get(device)
        if split is None or split[0] != split[1]:
            return
        self.estimator.observe_rtt(device, float(sample["rtt_s"]), now)
        self.estimator.observe(device, RequestTiming(int(sample["bytes_up"]), float(sample["uplink_s"]),
                                                     int(sample["bytes_down"]), float(sample["downlink_s"])), now)
        self.st.probes += 1

    def _membership(self, now: float) -> bool:
        """Apply queued registry changes; True when the set of devices up changed."""
        before = set(self.st.up)
        while True:
            try:
                change = self.changes.get_nowait()
            except queue.Empty:
                break
            if change.role != "device" or change.node not in self.ids:
                continue
            if change.kind == "down":
                self.st.up.discard(change.node)
                self.estimator.forget(change.node)
            elif change.kind == "registered" and change.node in self.st.up:
                continue  # its first registration, seen late
            else:  # back: a restarted agent has nothing deployed, so it takes its split and workload again
                self.st.up.add(change.node)
                self.readmitted.add(change.node)
            t = round(time.time() - self.st.t0_wall, 3)
            self.st.decisions.append({"t_s": t, "event": f"node_{change.kind}", "device": change.node})
            self.say(f"t={t:.1f} s: {change.node} {change.kind}")
        return self.st.up != before

    def _evaluate(self, ctl: Controller, now: float, membership: bool) -> None:
        st, spec = self.st, self.spec
        up = [d for d in self.ids if d in st.up]
        if not up or not (spec.planner.resplit or membership):
            return
        est = self.estimator
        links, speeds, edge_speed = est.links(now), est.speeds(now), est.edge_speed(now)
        problem = problem_with_estimates(self.problem, links, speeds, edge_speed=edge_speed, devices=up)
        decision = self.replanner.evaluate(problem, now)
        t = round(time.time() - st.t0_wall, 3)
        st.decisions.append({**results.decision_record(decision, t),
                             "estimates": results.estimates_record(links, speeds, edge_speed)})
        st.reason = decision.reason
        if decision.replan:
            self._apply(ctl, decision, t, membership)
        predicted = decision.current_round_s
        if decision.replan or not math.isfinite(predicted):
            predicted = decision.plan.round_s  # the plan in force, on the live problem
        medians = [statistics.median(st.recent[d]) for d in up if st.recent.get(d)]
        ctl.update_figures(replans_total=st.replans, predicted_round_s=predicted if math.isfinite(predicted) else None,
                           measured_round_s=max(medians) if medians else None)

    def _apply(self, ctl: Controller, decision: Decision, t: float, membership: bool) -> None:
        st = self.st
        moved = []
        for d in decision.plan.devices:
            back = d.device in self.readmitted
            if d.device not in decision.changed and not back:
                continue
            pid, head, tail = self.partitions.get(d.a, d.b)
            try:
                ctl.deploy(d.device, head, tail, pid, activate=back)
                ctl.set_split(d.device, pid)
                if back:
                    self.readmitted.discard(d.device)
                    with contextlib.suppress(CommandFailed):  # busy: its workload survived (it was only silent)
                        self._restart_workload(ctl, d.device)
            except CommandFailed as exc:
                self.say(f"t={t:.1f} s: {d.device} could not take split {d.a}:{d.b}: {exc}")
                continue
            st.splits[d.device] = (d.a, d.b)
            st.events.append(results.Event(round(time.time() - st.t0_wall, 3), "split", d.device, f"{d.a}:{d.b}",
                                           decision.reason))
            moved.append(f"{d.device} -> {d.a}:{d.b}")
        self._set_shares(ctl, decision.plan)
        st.replans += 1
        self.say(f"t={t:.1f} s: re-plan ({decision.reason}): {', '.join(moved) or 'shares only'}")

    def _restart_workload(self, ctl: Controller, device: str) -> None:
        """A re-admitted device sends again for what is left of a timed run (a counted run starts over)."""
        work = self.spec.workload
        assert work is not None
        args: dict[str, Any] = {"batch_size": work.batch_size, **self._start_args.get(device, {})}
        if work.duration_s is not None:
            left = work.duration_s - (time.monotonic() - self.st.t0)
            if left <= 1.0:
                return
            args["duration_s"] = left
        ctl.start_workload(device, self._edge_endpoint, **args)

    def _set_shares(self, ctl: Controller, plan: Plan) -> None:
        shares = {d.device: d.share for d in plan.devices if d.share > 0}
        if shares:
            ctl.set_shares(shares)

    def _progress(self, phase: str, now: float, duration_s: float | None) -> None:
        if self.on_progress is None:
            return
        nodes = {v.name: v for v in (self._ctl.nodes() if self._ctl is not None else ())}
        devices = []
        for d in self.ids:
            status = nodes[d].status if d in nodes else {}
            recent = self.st.recent.get(d)
            devices.append(DeviceProgress(d, d in self.st.up, self.st.splits.get(d),
                                          statistics.median(recent) * 1e3 if recent else None,
                                          int(status.get("requests", 0)), int(status.get("failed", 0))))
        self.on_progress(Progress(phase, now, duration_s, tuple(devices), self.st.replans, self.st.reason))

    # ---- the end ----
    def _collect(self, ctl: Controller) -> dict[str, dict[str, Any]]:
        reports = {}
        for d in self.ids:
            try:
                ctl.stop_workload(d)
                reports[d] = ctl.report(d, requests=True)
            except CommandFailed as exc:  # a device that is down has nothing to report
                self.say(f"{d}: no report ({exc})")
        return reports

    def _write(self, reports: dict[str, dict[str, Any]], end_s: float, weights: Any) -> dict[str, Any]:
        spec, st, out = self.spec, self.st, self.spec.output
        rows = results.rows_from_reports(reports, st.t0_wall)
        results.write_requests_csv(rows, out / "requests.csv")
        results.write_jsonl(st.decisions, out / "decisions.jsonl")
        extra = {
            "name": spec.name, "placement": spec.placement.kind, "model": spec.model.name,
            "weights": weights.weights_hash, "batch_size": spec.workload.batch_size if spec.workload else None,
            "replans": st.replans, "dropped_samples": st.dropped_samples, "probe_samples": st.probes,
            "accuracy": {d: r.get("accuracy") for d, r in reports.items()},
            "device_failures": {d: r.get("failures", {}) for d, r in reports.items()},
            "errors": {d: r["error"] for d, r in reports.items() if r.get("error")},
            "prometheus": self.prometheus,
        }
        summary = results.summarize(rows, st.events, self.ids, end_s, extra)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        results.plot(rows, st.events, self.ids, out / "latency.png",
                     f"{spec.name}: {len(self.ids)} device(s), {spec.placement.kind}, batch "
                     f"{summary['batch_size']}, {summary['replans']} re-plan(s)")
        return summary


def _describe(plan: Plan) -> str:
    return ", ".join(f"{d.device} {d.a}:{d.b} (share {d.share:.2f})" for d in plan.devices) + \
        f"; predicted round {plan.round_s * 1e3:.2f} ms"


def run_experiment(spec: RunSpec, **kwargs: Any) -> dict[str, Any]:
    """Run ``spec`` (validated) and return its summary; the results are in ``spec.output``."""
    return Run(spec, **kwargs).execute()
