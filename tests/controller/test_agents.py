"""The control plane with real processes on loopback: an edge server and two torch-free device agents register
with a controller, take deployments and split changes under load, and one of them is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from testbed.controller.api import Controller
from testbed.controller.deploy import sha256_hex
from testbed.controller.protocol import CommandError
from testbed.controller.server import CommandFailed
from testbed.partition import PartitionId
from testbed.profiling.links import empty_body_echo
from testbed.profiling.records import LinkMeasurement
from testbed.profiling.store import profile_from_dict

from ..agents.test_device import no_torch_env
from ..conftest import REPO, stop_process, wait_for_file
from ..test_supervisor import alive, wait_gone
from .test_server import Recorder

pytestmark = pytest.mark.slow

HB = 0.3


@dataclass
class Cluster:
    ctl: Controller
    rec: Recorder
    edge_endpoint: str
    tmp: Path
    parts: dict[tuple[int, int], tuple[str, bytes, bytes]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    every_pid: list[int] = field(default_factory=list)

    def start_device(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}-{len(self.every_pid)}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "agents.device", "serve", "--controller", self.ctl.endpoint, "--device-id", name,
             "--device-class", "pi4", "--work-dir", str(self.tmp / name), "--heartbeat-s", str(HB),
             "--parent-pid", str(os.getpid())],
            env=no_torch_env(self.tmp), cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        self.every_pid.append(proc.pid)
        return proc

    def deploy(self, device: str, split: tuple[int, int], activate: bool = True) -> str:
        pid, head, tail = self.parts[split]
        assert self.ctl.deploy(device, head, tail, pid, activate=activate)["partition"] == pid
        return pid

    def wait_requests(self, device: str, at_least: int, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.ctl.report(device)
            if report["requests"] >= at_least or not report["running"]:
                return report
            assert time.monotonic() < deadline, f"{device} made only {report['requests']} requests: {report}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(cnn_weights, onnx_cache, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    parts = {}
    for a, b in ((2, 6), (4, 8)):
        head, tail = onnx_cache.partition(cnn_weights.model, cnn_weights.weights_hash, a, b)
        parts[(a, b)] = (str(PartitionId(cnn_weights.weights_hash, a, b)), head.read_bytes(), tail.read_bytes())
    rec = Recorder()
    with Controller(heartbeat_s=HB, run_dir=tmp / "run", command_timeout_s=60) as ctl:
        ctl.on_change(rec)
        ready = tmp / "edge-ready.json"
        edge = subprocess.Popen(
            [sys.executable, "-m", "agents.edge", "--weights", str(cnn_weights.path), "--threads", "1",
             "--ready-file", str(ready), "--controller", ctl.endpoint, "--heartbeat-s", str(HB),
             "--parent-pid", str(os.getpid())],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        c = Cluster(ctl, rec, "", tmp, parts, {"edge": edge}, [edge.pid])
        try:
            c.edge_endpoint = str(wait_for_file(ready, edge)["endpoint"])
            c.start_device("dev1")
            c.start_device("dev2")
            ctl.wait_for(2, timeout_s=120)
            yield c
        finally:
            for proc in c.procs.values():
                stop_process(proc)


def test_edge_and_devices_register_with_their_facts(cluster: Cluster) -> None:
    nodes = {n.name: n for n in cluster.ctl.nodes()}
    assert set(nodes) == {"edge", "dev1", "dev2"}
    assert nodes["edge"].role == "edge" and nodes["dev1"].role == nodes["dev2"].role == "device"
    assert all(n.up and n.incarnation == 1 for n in nodes.values())
    assert nodes["dev1"].device_class == "pi4"
    facts = nodes["dev1"].facts
    assert facts["hostname"] and facts["logical_cores"] >= 1
    assert facts["libraries"]["onnxruntime"] and facts["accelerator"] is None  # the agent never probes torch
    assert nodes["edge"].status.get("served", 0) == 0
    for name in nodes:  # changes reach callbacks on the controller's event thread: maybe after wait_for returned
        cluster.rec.wait("registered", name)
    assert [c.kind for c in cluster.rec.changes].count("registered") == 3


def test_a_deployment_with_a_wrong_hash_is_refused(cluster: Cluster) -> None:
    pid, head, tail = cluster.parts[(2, 6)]
    args = {"partition": pid, "version": 1, "head_sha256": sha256_hex(head), "tail_sha256": sha256_hex(tail + b"x"),
            "activate": True}
    tensors = {"head": np.frombuffer(head, np.uint8), "tail": np.frombuffer(tail, np.uint8)}
    with pytest.raises(CommandFailed) as info:
        cluster.ctl.command("dev1", "deploy", args, tensors)
    assert info.value.code == "hash_mismatch" and "tail" in str(info.value)
    assert not (cluster.tmp / "dev1" / "partitions").exists(), "nothing is written before the hashes match"
    report = cluster.ctl.report("dev1")
    assert report["deployed"] == [] and report["partition"] is None
    with pytest.raises(CommandFailed) as info:
        cluster.ctl.start_workload("dev1", cluster.edge_endpoint, requests=1)
    assert info.value.code == "no_partition"


def test_set_split_under_load_drops_no_request(cluster: Cluster) -> None:
    ctl = cluster.ctl
    old = cluster.deploy("dev1", (2, 6))
    new = cluster.deploy("dev1", (4, 8), activate=False)
    ctl.take_samples()
    # Paced, so the switch surely lands mid-run (about 3 s of requests are left when it arrives).
    ctl.start_workload("dev1", cluster.edge_endpoint, batch_size=4, requests=150, rate_rps=40.0)
    cluster.wait_requests("dev1", 30)
    assert ctl.set_split("dev1", new) == {"partition": new, "previous": old}
    report = cluster.wait_requests("dev1", 150)
    while report["running"]:
        time.sleep(0.1)
        report = ctl.report("dev1", requests=True)
    report = ctl.report("dev1", requests=True)
    assert report["failed"] == 0 and report["requests"] == 150 and report["error"] == ""
    served = [r["partition"] for r in report["records"]]
    assert all(r["ok"] for r in report["records"])
    switch = served.index(new)
    assert 30 <= switch < 150 and served == [old] * switch + [new] * (150 - switch)
    assert report["by_partition"] == {old: switch, new: 150 - switch}
    time.sleep(3 * HB)  # the samples travel with the next heartbeats
    samples = [s for s in ctl.take_samples()["dev1"] if not s.get("probe")]  # link probes name no partition
    assert {s["partition"] for s in samples} == {old, new}
    assert all(s["bytes_up"] > 0 and s["uplink_s"] >= 0 and s["batch"] == 4 for s in samples)
    assert ctl.snapshot().devices[[d.name for d in ctl.snapshot().devices].index("dev1")].a == 4


def test_testbed_status_json_against_the_running_controller(cluster: Cluster) -> None:
    proc = subprocess.run([sys.executable, "-m", "testbed.cli.main", "status", "--run-dir",
                           str(cluster.tmp / "run"), "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == {"edge", "dev1", "dev2"} and all(n["up"] for n in nodes.values())
    assert nodes["dev1"]["split"] == [4, 8] and nodes["dev1"]["status"]["requests"] == 150
    assert nodes["dev1"]["link"]["uplink_bps"] > 0 and nodes["dev1"]["link"]["source"] == "raw"
    assert nodes["edge"]["status"]["served"] >= 150
    assert status["down_after_s"] == pytest.approx(3 * HB)


def test_profile_measures_the_agents_link_to_the_real_edge(cluster: Cluster, cnn_weights) -> None:
    """The torch-free agent (torch blocked in its environment) measures its path to the edge with
    testbed.profiling.links and answers with the measurement in the profile store's form."""
    echo = empty_body_echo(cnn_weights.model, cnn_weights.weights_hash)
    # The largest payload must take measurably longer than an empty message even on a loaded loopback:
    # 64 KiB did not once in CI (the agent then refuses, rightly, to report an unresolved rate).
    data = cluster.ctl.profile("dev2", cluster.edge_endpoint, sizes=[4096, 4 << 20], count=6, warmup=1,
                               budget_s=20.0, echo_partition=echo.partition, echo_shape=list(echo.sample_shape))
    link = profile_from_dict(data, where="dev2's answer")
    assert isinstance(link, LinkMeasurement)
    assert link.endpoint == cluster.edge_endpoint and link.sizes == (4096, 4 << 20)
    assert link.downlink_method == "ping-echo" and link.uplink_bps > 0
    # On loopback the downlink costs what the uplink does; under CI load the echo's extra cost can drown in
    # scheduling noise, and then the measurement says so rather than inventing a rate.
    assert link.downlink_bps is not None or "downlink not resolved" in link.notes, link.notes
    assert link.rtt.n == 6 and link.rtt.median > 0
    assert link.request_bytes == echo.sample_bytes and link.edge_request_s is not None  # the empty-body echo
    assert link.host["hostname"] and link.host["accelerator"] is None  # the agent's own facts, torch never probed


def test_profile_with_bad_arguments_or_no_edge_is_refused_and_the_agent_goes_on(cluster: Cluster) -> None:
    for args, code, words in (({"edge": cluster.edge_endpoint, "count": 0}, "bad_args", "count"),
                              ({"edge": cluster.edge_endpoint, "sizes": [4096]}, "bad_args", "sizes"),
                              ({"edge": cluster.edge_endpoint, "budget_s": 1e9}, "bad_args", "budget_s"),
                              ({"edge": cluster.edge_endpoint, "echo_shape": [8]}, "bad_args", "together"),
                              ({"edge": "http://x"}, "bad_args", "endpoint"),
                              ({"edge": "tcp://127.0.0.1:1", "timeout_s": 0.3, "budget_s": 2.0}, "failed",
                               "no reply from the edge")):
        with pytest.raises(CommandFailed) as info:  # past the controller's own check, on purpose
            cluster.ctl._send("dev2", {"command": "profile", "args": args}, {}, timeout_s=30)
        assert info.value.code == code and words in str(info.value), (args, info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(CommandError, match="count"):  # the controller refuses it before sending
        cluster.ctl.profile("dev2", cluster.edge_endpoint, count=0)
    assert cluster.ctl.report("dev2")["device"] == "dev2"
    assert cluster.procs["dev2"].poll() is None


def test_a_real_agent_answers_garbage_with_an_error_and_goes_on(cluster: Cluster) -> None:
    for meta, code in (({"command": "start", "args": {"edge": 5, "requests": 1}}, "bad_args"),
                       ({"command": "set_split", "args": {"partition": "0123456789abcdef:2:6"}}, "not_deployed"),
                       ({"command": "set_shares", "args": {"shares": {"dev1": 1}}}, "unsupported_command"),
                       ({"command": "explode"}, "unknown_command")):
        with pytest.raises(CommandFailed) as info:
            cluster.ctl._send("dev2", meta, {}, timeout_s=30)  # past the controller's own check, on purpose
        assert info.value.code == code
    assert cluster.ctl.report("dev2")["device"] == "dev2"


def test_sigkill_marks_a_device_down_the_others_keep_going_and_it_comes_back(cluster: Cluster) -> None:
    ctl, rec = cluster.ctl, cluster.rec
    cluster.deploy("dev2", (2, 6))
    for dev in ("dev1", "dev2"):
        ctl.start_workload(dev, cluster.edge_endpoint, batch_size=2, duration_s=120.0, rate_rps=20.0)
    cluster.wait_requests("dev2", 5)
    victim = cluster.procs["dev2"]
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    down = rec.wait("down", "dev2", timeout_s=30)
    print(f"dev2 marked down {down.at - killed_at:.2f} s after SIGKILL (heartbeat {HB} s, 3 missed = {3 * HB} s)")
    assert set(ctl.registry.up()) == {"dev1", "edge"}
    before = ctl.report("dev1")["requests"]
    after = cluster.wait_requests("dev1", before + 10)
    assert after["running"] and after["failed"] == 0 and after["requests"] >= before + 10
    with pytest.raises(CommandFailed, match="not up"):
        ctl.report("dev2")
    cluster.start_device("dev2")
    rec.wait("readmitted", "dev2", timeout_s=60)
    assert ctl.registry.get("dev2").incarnation == 2
    pid = cluster.deploy("dev2", (4, 8))  # a restarted agent starts empty and takes a deployment again
    assert ctl.report("dev2")["partition"] == pid
    stopped = ctl.stop_workload("dev1")
    assert stopped["stopped"] and stopped["failed"] == 0 and not stopped["running"]


def test_no_process_is_left_behind(cluster: Cluster) -> None:
    for proc in cluster.procs.values():
        stop_process(proc)
    assert wait_gone(cluster.every_pid) == []
    assert not any(alive(p) for p in cluster.every_pid)


def test_standing_controller_serves_status_and_stops_on_sigterm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli.main", "controller", "serve", "--bind",
                             "tcp://127.0.0.1:*", "--run-dir", str(run), "--heartbeat-s", "0.5"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = wait_for_file(run / "controller.json", proc)
        status = subprocess.run([sys.executable, "-m", "testbed.cli.main", "status", "--controller",
                                 str(info["endpoint"]), "--json"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["nodes"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not (run / "controller.json").exists()
        gone = subprocess.run([sys.executable, "-m", "testbed.cli.main", "status", "--run-dir", str(run)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert gone.returncode == 2 and "no " in gone.stderr and "Traceback" not in gone.stderr
    finally:
        stop_process(proc)
    assert wait_gone([proc.pid]) == []
