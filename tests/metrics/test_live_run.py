"""A real run scraped by a real Prometheus: every endpoint passes `promtool check metrics`, the metrics say
what happened, and every panel query of the overview and links dashboards returns data."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
import zmq

from testbed.metrics.prometheus import finite_values
from testbed.partition import activation_shape

from .conftest import BATCH, REQUESTS, SCRAPE_INTERVAL_S, SPLITS, LiveRun, sample, scrape, wait_finished, wait_until
from .dashboards import DASHBOARDS, load, queries, substitute

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                       reason="needs Debian's prometheus package (prometheus, promtool)"),
]

# What Grafana would put in: all devices, a rate window of four scrapes, a range covering the run.
# Grafana's $__rate_interval is at least 4 scrape intervals (2 s here); 10 s keeps rate() windows holding two
# samples when a loaded machine delays scrapes.
VARIABLES = {"device": ".*", "__rate_interval": "10s", "__interval": "1s", "__range": "5m", "datasource": "x"}


def endpoints(run: LiveRun) -> dict[str, str]:
    assert run.controller is not None
    return {"edge": run.edge_metrics_url, "controller": run.controller.url,
            **{name: dev.metrics_url for name, dev in run.devices.items()}}


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_every_endpoint_passes_promtool(live_run: LiveRun) -> None:
    wait_finished(live_run)
    for name, url in endpoints(live_run).items():
        text = scrape(url)
        assert "testbed_" in text, name
        check = promtool_check_metrics(text)
        assert check.returncode == 0 and not check.stdout.strip(), f"{name}: {check.stdout}{check.stderr}"


def test_promtool_check_metrics_can_fail() -> None:
    """The check above is meaningful: promtool rejects a counter without _total and an abbreviated unit."""
    bad = "# HELP testbed_x_ms latency\n# TYPE testbed_x_ms counter\ntestbed_x_ms 1\n"
    assert promtool_check_metrics(bad).returncode != 0


def test_device_and_edge_metrics_agree_with_the_run(live_run: LiveRun, cnn_weights) -> None:
    results = wait_finished(live_run)
    edge = scrape(live_run.edge_metrics_url)
    model = cnn_weights.model
    for name, (a, b) in SPLITS.items():
        assert results[name]["requests"] == REQUESTS
        dev = scrape(live_run.devices[name].metrics_url)
        stage = "testbed_device_stage_duration_seconds"
        for s in ("head", "uplink", "queue", "body", "downlink", "tail", "e2e"):
            assert sample(dev, f"{stage}_count", device=name, stage=s) == REQUESTS, s
        e2e_sum = sample(dev, f"{stage}_sum", device=name, stage="e2e")
        assert e2e_sum == pytest.approx(sum(results[name]["stages_ms"]["e2e"]) / 1e3, rel=1e-3)
        assert sample(dev, "testbed_device_requests_total", device=name) == REQUESTS
        assert sample(dev, "testbed_device_failures_total", device=name, reason="timeout") == 0
        up_bytes = REQUESTS * BATCH * 4 * int(np.prod(activation_shape(model, a)))
        down_bytes = REQUESTS * BATCH * 4 * int(np.prod(activation_shape(model, b)))
        assert sample(dev, "testbed_device_transfer_bytes_total", device=name, direction="uplink") == up_bytes
        assert sample(dev, "testbed_device_transfer_bytes_total", device=name, direction="downlink") == down_bytes
        assert sample(dev, "testbed_device_body_start_block", device=name) == a
        assert sample(dev, "testbed_device_body_end_block", device=name) == b
        assert sample(dev, "testbed_device_partition_info", device=name,
                      partition=f"{cnn_weights.weights_hash[:16]}:{a}:{b}") == 1
        assert sample(dev, "testbed_build_info", component="device") == 1
        # The edge counts the same requests and bytes from its side.
        assert sample(edge, "testbed_edge_requests_total", device=name) == REQUESTS
        assert sample(edge, "testbed_edge_stage_duration_seconds_count", device=name, stage="body") == REQUESTS
        assert sample(edge, "testbed_edge_transfer_bytes_total", device=name, direction="uplink") == up_bytes
        assert sample(edge, "testbed_edge_transfer_bytes_total", device=name, direction="downlink") == down_bytes
    assert sample(edge, "testbed_edge_share_ratio", device="dev1") == pytest.approx(0.25)
    assert sample(edge, "testbed_edge_share_ratio", device="dev2") == pytest.approx(0.75)
    assert sample(edge, "testbed_build_info", component="edge") == 1


def test_edge_counts_a_rejected_message_by_code(live_run: LiveRun) -> None:
    before = scrape(live_run.edge_metrics_url)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(live_run.edge_endpoint)
        sock.send_multipart([b"not a header"])
        assert sock.poll(20_000), "no error reply from the edge"
        sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()
    after = scrape(live_run.edge_metrics_url)
    key = "testbed_edge_rejected_total"
    grown = [code for code in ("bad_header", "bad_version", "frame_count")
             if (sample(after, key, code=code) or 0) - (sample(before, key, code=code) or 0) == 1]
    assert len(grown) == 1, after


def test_controller_collector_reads_the_live_run(live_run: LiveRun) -> None:
    wait_finished(live_run)
    assert live_run.controller is not None
    text = scrape(live_run.controller.url)
    for name, (a, b) in SPLITS.items():
        assert sample(text, "testbed_node_up", device=name) == 1
        assert sample(text, "testbed_plan_body_start_block", device=name) == a
        assert sample(text, "testbed_plan_body_end_block", device=name) == b
        assert (sample(text, "testbed_link_estimated_rate_bytes_per_second", device=name, direction="uplink") or 0) > 0
        assert (sample(text, "testbed_link_estimated_rtt_seconds", device=name) or 0) > 0
    assert sample(text, "testbed_node_up", device="edge") == 1
    assert sample(text, "testbed_node_info", device="edge", role="edge", device_class="cpu") == 1


def test_generated_scrape_config_passes_promtool(live_run: LiveRun, tmp_path) -> None:
    assert live_run.prometheus is not None
    config = tmp_path / "tb-prometheus.yml"
    config.write_text(live_run.prometheus.config_yaml)
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# The training dashboard is fed by a real `testbed train` run: tests/metrics/test_training_live.py.
INFERENCE_DASHBOARDS = [path for path in DASHBOARDS if path.stem != "testbed-training"]


def test_every_inference_dashboard_query_returns_data(live_run: LiveRun) -> None:
    prom = live_run.prometheus
    assert prom is not None
    wait_finished(live_run)
    finished = time.time()
    # Prometheus has all targets up, and has scraped the devices' final values.
    wait_until(lambda: len(prom.targets_up()) == 4 and all(prom.targets_up().values()), "all targets up", 30)
    time.sleep(4 * SCRAPE_INTERVAL_S)
    end = time.time()
    assert end > finished
    exprs = [(f"{path.name}: {where}", substitute(expr, VARIABLES))
             for path in INFERENCE_DASHBOARDS for where, expr in queries(load(path))]
    assert len(exprs) >= 20
    # The check can fail: a query for a metric nobody exports has no data.
    assert finite_values(prom.query_range("testbed_no_such_metric", live_run.started_s, end, 1.0)) == 0
    empty = []
    for where, expr in exprs:
        result = prom.query_range(expr, live_run.started_s, end, SCRAPE_INTERVAL_S)
        if finite_values(result) == 0:
            empty.append(f"{where}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
