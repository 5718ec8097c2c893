"""Start a run's processes and exporters where its placement puts them (the shell part of `testbed run`).

Local placements (loopback, the lab) start the edge and one `testbed-agent serve` per device under the run's
process group (the lab wraps each argv for its host's namespace); an inventory placement starts them on real hosts
over SSH. The controller's exporter and the run's Prometheus go where the placement says every exporter is
reachable (testbed.controller.monitoring).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.controller.api import Controller
from testbed.controller.placement import Placement
from testbed.controller.runspec import RunSpec
from testbed.supervisor import Child, ProcessGroup

Say = Callable[[str], None]


@dataclass(frozen=True)
class Launch:
    """What every process of the run is told."""

    controller: str  # the control-plane endpoint the nodes dial
    weights: Path
    heartbeat_s: float
    probe_interval_s: float
    ready_timeout_s: float
    out: Path


@dataclass(frozen=True)
class Started:
    edge: Child | None  # None: on a remote host (watched through its heartbeats)
    endpoint: str  # the edge's data-plane endpoint, as the devices dial it
    edge_metrics_url: str | None
    children: tuple[Child, ...]  # local processes to watch until every node registered


def start_processes(spec: RunSpec, placement: Placement, group: ProcessGroup, launch: Launch, say: Say) -> Started:
    if getattr(placement, "remote", False):
        from testbed.controller.remote_placement import InventoryPlacement

        assert isinstance(placement, InventoryPlacement)
        placement.logs_dir = launch.out / "logs"
        endpoint, metrics_url = placement.launch(
            launch.controller, launch.weights, device=spec.edge.device, threads=spec.edge.threads,
            heartbeat_s=launch.heartbeat_s, probe_interval_s=launch.probe_interval_s, metrics=spec.metrics.enabled,
            classes={d.id: d.device_class.name for d in spec.devices if d.device_class})
        return Started(None, endpoint, metrics_url, ())
    py, me = sys.executable, str(os.getpid())

    def metrics(host: str) -> list[str]:
        return ["--metrics-port", "0", "--metrics-bind", placement.metrics_bind(host)] if spec.metrics.enabled \
            else []

    ready = launch.out / "edge-ready.json"
    ready.unlink(missing_ok=True)
    edge = group.start("edge", placement.wrap("edge", [
        py, "-m", "agents.edge", "--weights", str(launch.weights), "--bind", placement.edge_bind,
        "--device", spec.edge.device, "--threads", str(spec.edge.threads), "--ready-file", str(ready),
        "--controller", launch.controller, "--heartbeat-s", str(launch.heartbeat_s), "--parent-pid", me,
        *metrics("edge")]))
    info = group.wait_ready(edge, ready, timeout_s=launch.ready_timeout_s)
    say(f"edge up on {info['endpoint']} ({info['device']}, {placement.description})")
    agents = []
    for dev in spec.devices:
        host = placement.host_of(dev.id)
        argv = [py, "-m", "agents.device", "serve", "--controller", launch.controller, "--device-id", dev.id,
                "--device-class", dev.device_class.name if dev.device_class else "",
                "--work-dir", str((launch.out / "agents" / dev.id).resolve()), "--heartbeat-s", str(launch.heartbeat_s),
                "--probe-interval-s", str(launch.probe_interval_s), "--parent-pid", me, *metrics(host),
                *placement.agent_args(dev)]
        agents.append(group.start(dev.id, placement.wrap(host, argv)))
    return Started(edge, str(info["endpoint"]), info.get("metrics_url"), (edge, *agents))


def start_controller_exporter(ctl: Controller, placement: Placement, say: Say) -> Any:  # -> Exporter
    from prometheus_client import CollectorRegistry

    from testbed.controller.monitoring import in_namespace
    from testbed.metrics.controller import ControllerCollector
    from testbed.metrics.exporter import start_exporter

    registry = CollectorRegistry()
    registry.register(ControllerCollector(ctl.snapshot))
    with in_namespace(placement.metrics_netns):  # where Prometheus will run (the lab's switch)
        exporter = start_exporter(registry, placement.metrics_bind("controller"), 0)
    where = f" (network namespace {placement.metrics_netns})" if placement.metrics_netns else ""
    say(f"controller metrics on {exporter.url}{where}")
    return exporter


def start_prometheus(spec: RunSpec, ctl: Controller, placement: Placement, controller_url: str,
                     edge_url: str | None, say: Say) -> tuple[Any, dict[str, Any]]:
    """(the running RunPrometheus, what the summary says about it); also written to OUTPUT/prometheus.json."""
    from testbed.controller.monitoring import RunPrometheus, run_targets

    ids = {d.id for d in spec.devices}
    devices = {v.name: str(v.facts["metrics_url"]) for v in ctl.nodes()
               if v.role == "device" and v.name in ids and v.facts.get("metrics_url")}
    targets = run_targets(controller_url, edge_url, devices)
    prom = RunPrometheus(targets, spec.output, interval_s=spec.metrics.scrape_interval_s,
                         netns=placement.metrics_netns)
    info = {"url": prom.url, "netns": placement.metrics_netns, "pid": prom.pid, "config": str(prom.config_path),
            "targets": [t.address for t in targets]}
    (spec.output / "prometheus.json").write_text(json.dumps(info))
    if not prom.wait_scraped():
        say(f"Prometheus has not scraped every target yet: see {prom.url}/targets")
    say(f"Prometheus on {prom.where}, scraping {len(targets)} exporter(s) every {spec.metrics.scrape_interval_s:g} s; "
        f"config {prom.config_path}")
    return prom, info
