"""The metric classes on their own: names, labels, values, the exporter, and promtool on everything."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from testbed.metrics.common import STAGE_BUCKETS_S
from testbed.metrics.controller import ControllerCollector, ControllerSnapshot, NodeState
from testbed.metrics.device import DeviceMetrics
from testbed.metrics.edge import OTHER_DEVICE, EdgeMetrics
from testbed.metrics.exporter import ExporterError, start_exporter

from .registry import SNAPSHOT, full_registry


def test_stage_buckets_span_100us_to_30s() -> None:
    assert STAGE_BUCKETS_S[0] == 0.0001 and STAGE_BUCKETS_S[-1] == 30.0
    assert list(STAGE_BUCKETS_S) == sorted(set(STAGE_BUCKETS_S))


def test_device_metrics_record_stages_bytes_failures_and_partition() -> None:
    reg = CollectorRegistry()
    m = DeviceMetrics(reg, "dev1", "pi4")
    m.observe_request({"head": 0.00015, "e2e": 0.02, "bogus": 1.0}, bytes_up=100, bytes_down=40)
    m.observe_request({"head": 0.5, "e2e": 0.7}, bytes_up=100, bytes_down=40)
    m.observe_failure("timeout")
    m.observe_failure("something a peer made up")
    m.set_partition("aaaa:2:6", 2, 6)
    m.set_partition("aaaa:3:7", 3, 7)
    get = reg.get_sample_value
    stage = "testbed_device_stage_duration_seconds"
    assert get(f"{stage}_count", {"device": "dev1", "stage": "head"}) == 2
    assert get(f"{stage}_bucket", {"device": "dev1", "stage": "head", "le": "0.00025"}) == 1
    assert get(f"{stage}_count", {"device": "dev1", "stage": "uplink"}) == 0  # created up front
    assert get(f"{stage}_count", {"device": "dev1", "stage": "bogus"}) is None
    assert get("testbed_device_requests_total", {"device": "dev1"}) == 2
    assert get("testbed_device_transfer_bytes_total", {"device": "dev1", "direction": "uplink"}) == 200
    assert get("testbed_device_transfer_bytes_total", {"device": "dev1", "direction": "downlink"}) == 80
    assert get("testbed_device_failures_total", {"device": "dev1", "reason": "timeout"}) == 1
    assert get("testbed_device_failures_total", {"device": "dev1", "reason": "other"}) == 1
    assert get("testbed_device_body_start_block", {"device": "dev1"}) == 3
    assert get("testbed_device_body_end_block", {"device": "dev1"}) == 7
    assert get("testbed_device_partition_info", {"device": "dev1", "partition": "aaaa:3:7"}) == 1
    assert get("testbed_device_partition_info", {"device": "dev1", "partition": "aaaa:2:6"}) is None
    assert get("testbed_device_info", {"device": "dev1", "device_class": "pi4"}) == 1


def test_edge_metrics_shares_are_normalised_and_replaced() -> None:
    reg = CollectorRegistry()
    m = EdgeMetrics(reg)
    m.set_shares({"a": 1.0, "b": 3.0})
    assert reg.get_sample_value("testbed_edge_share_ratio", {"device": "b"}) == 0.75
    m.set_shares({"c": 2.0})
    assert reg.get_sample_value("testbed_edge_share_ratio", {"device": "a"}) is None
    assert reg.get_sample_value("testbed_edge_share_ratio", {"device": "c"}) == 1.0


def test_edge_metrics_bound_the_number_of_device_series() -> None:
    reg = CollectorRegistry()
    m = EdgeMetrics(reg, max_devices=2)
    for device in ("d1", "d2", "d3", "d4"):
        m.observe_request(device, 0.001, 0.002, 10, 20)
    assert reg.get_sample_value("testbed_edge_requests_total", {"device": "d2"}) == 1
    assert reg.get_sample_value("testbed_edge_requests_total", {"device": "d3"}) is None
    assert reg.get_sample_value("testbed_edge_requests_total", {"device": OTHER_DEVICE}) == 2
    m.observe_rejected("bad_shape")
    assert reg.get_sample_value("testbed_edge_rejected_total", {"code": "bad_shape"}) == 1
    assert reg.get_sample_value("testbed_edge_rejected_total", {"code": "bad_header"}) == 0


def test_controller_collector_reads_the_snapshot_at_every_scrape() -> None:
    state = {"snap": SNAPSHOT}
    reg = CollectorRegistry()
    reg.register(ControllerCollector(lambda: state["snap"]))
    get = reg.get_sample_value
    assert get("testbed_node_up", {"device": "dev1"}) == 1 and get("testbed_node_up", {"device": "dev2"}) == 0
    assert get("testbed_plan_body_start_block", {"device": "dev1"}) == 2
    assert get("testbed_plan_body_start_block", {"device": "dev2"}) is None  # unknown, not 0
    assert get("testbed_plan_edge_share_ratio", {"device": "dev1"}) == 0.25
    assert get("testbed_link_estimated_rate_bytes_per_second", {"device": "dev1", "direction": "uplink"}) == 1e6
    assert get("testbed_link_estimated_rtt_seconds", {"device": "dev1"}) == 0.004
    assert get("testbed_planner_replans_total") == 2
    assert get("testbed_training_accuracy_ratio") == 0.8
    assert get("testbed_node_info", {"device": "edge", "role": "edge", "device_class": "gpu"}) == 1
    state["snap"] = ControllerSnapshot(devices=(NodeState("dev1", "device", False),), replans_total=3)
    assert get("testbed_node_up", {"device": "dev1"}) == 0
    assert get("testbed_planner_replans_total") == 3
    assert get("testbed_training_loss") is None


def test_controller_collector_survives_a_failing_snapshot() -> None:
    calls = []

    def broken() -> ControllerSnapshot:
        calls.append(1)
        raise RuntimeError("controller mid-update")

    reg = CollectorRegistry()
    reg.register(ControllerCollector(broken))
    assert calls == []  # registering must not call the snapshot
    assert reg.get_sample_value("testbed_controller_snapshot_failures_total") == 1
    assert reg.get_sample_value("testbed_controller_snapshot_failures_total") == 2


def test_exporter_serves_the_registry_it_was_given_and_closes() -> None:
    exporter = start_exporter(full_registry())
    try:
        assert exporter.port > 0 and exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(exporter.url, timeout=10) as resp:
            text = resp.read().decode()
        assert "testbed_device_requests_total" in text
        assert "python_gc" not in text  # not the process-wide default registry
    finally:
        exporter.close()
    with socket.socket() as s:  # nothing listens there any more (REUSEADDR: TIME_WAIT is fine, a listener not)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", exporter.port))


def test_exporter_reports_a_taken_port_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ExporterError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            start_exporter(CollectorRegistry(), port=s.getsockname()[1])
    with pytest.raises(ExporterError, match="outside"):
        start_exporter(CollectorRegistry(), port=70000)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus package")
def test_everything_together_passes_promtool() -> None:
    text = generate_latest(full_registry()).decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
