"""A real `testbed train` (psl, 2 devices, real agent processes) with --metrics-port, scraped by a real Prometheus:
the endpoint passes `promtool check metrics`, its figures are the run's own (results.json), and every panel query
of the training dashboard returns data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.metrics.prometheus import LocalPrometheus, finite_values
from testbed.metrics.scrape import JOB_CONTROLLER, ScrapeTarget, scrape_config_yaml

from ..conftest import REPO
from .conftest import free_port, sample, scrape, wait_until
from .dashboards import GRAFANA, load, queries, substitute
from .test_live_run import VARIABLES, promtool_check_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                       reason="needs Debian's prometheus package (prometheus, promtool)"),
]

# 2 devices, 2 epochs of 6 rounds of 2 steps on 384 images (as tests/training keeps runs short).
DOC = {
    "name": "metrics",
    "scheme": "psl",
    "devices": 2,
    "split": [3, 7],
    "data": {"train_samples": 384, "test_samples": 64},
    "training": {"batch_size": 16, "epochs": 2, "rounds_per_epoch": 6, "fedavg_every": 3},
    "runtime": {"export_onnx": False, "eval_batch_size": 64},
}
ROUNDS = 12
SCRAPE_INTERVAL_S = 0.5
TRAINING_DASHBOARD = GRAFANA / "dashboards" / "testbed-training.json"


@dataclass
class TrainingRun:
    prometheus: LocalPrometheus
    metrics_url: str
    run_dir: Path
    started_s: float  # wall clock before `testbed train` started
    ended_s: float  # after Prometheus had scraped the final values
    metrics_text: str  # the endpoint's page once the run was done (the process holding it up)
    results: dict[str, Any]  # results.json
    returncode: int
    stdout: str
    stderr: str
    agent_pids: dict[str, int]


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def instant(prom: LocalPrometheus, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in prom.api("query", {"query": expr, "time": f"{time.time():.3f}"})["result"]]


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingRun]:
    """Prometheus first (its scrapes fail until the endpoint is up), then the run; the run holds its endpoint
    after training until Prometheus has its final values, then gets SIGTERM (a normal end of the hold)."""
    tmp = tmp_path_factory.mktemp("tb-train-metrics")
    exp = tmp / "metrics.yaml"
    exp.write_text(yaml.safe_dump(DOC))
    run_dir = tmp / "run"
    port = free_port()
    config = scrape_config_yaml([ScrapeTarget(JOB_CONTROLLER, f"127.0.0.1:{port}")], interval_s=SCRAPE_INTERVAL_S)
    prom = LocalPrometheus(config, free_port(), workdir=tmp)
    prom.start()
    stderr_path = tmp / "tb-train.stderr"
    proc: subprocess.Popen[str] | None = None
    try:
        started = time.time()
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "testbed.cli.main", "train", str(exp), "--run-dir", str(run_dir),
                 "--metrics-port", str(port), "--metrics-hold-s", "600", "--json"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
            )

        def finished() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"testbed train exited with {proc.returncode}:\n{stderr_path.read_text()}")
            return (run_dir / "results.json").exists()

        wait_until(finished, "the run's results.json", 600)
        wait_until(lambda: instant(prom, "testbed_training_rounds_total") == [ROUNDS], "the final round scraped", 60)
        time.sleep(4 * SCRAPE_INTERVAL_S)  # a few more scrapes of the final values (rate() windows)
        metrics_text = scrape(f"http://127.0.0.1:{port}/metrics")
        ended = time.time()
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
        run = TrainingRun(prom, f"http://127.0.0.1:{port}/metrics", run_dir, started, ended, metrics_text,
                          json.loads((run_dir / "results.json").read_text()), proc.returncode, stdout,
                          stderr_path.read_text(), json.loads((run_dir / "pids.json").read_text()))
        yield run
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        prom.stop()
    assert proc is not None and proc.poll() is not None
    assert prom.proc is not None and prom.proc.poll() is not None
    left = [pid for pid in run.agent_pids.values() if not gone(pid)]
    assert not left, f"agents still running after the run: {left}"


def test_the_training_endpoint_passes_promtool(training_run: TrainingRun) -> None:
    assert "testbed_training_rounds_total" in training_run.metrics_text
    check = promtool_check_metrics(training_run.metrics_text)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_the_metrics_are_the_runs_own_figures(training_run: TrainingRun) -> None:
    text, res = training_run.metrics_text, training_run.results
    last = res["history"][-1]
    assert res["rounds"] == ROUNDS
    assert sample(text, "testbed_training_rounds_total") == ROUNDS
    assert sample(text, "testbed_training_planned_rounds") == ROUNDS
    assert sample(text, "testbed_training_loss") == pytest.approx(last["train_loss"], rel=1e-12)
    assert sample(text, "testbed_training_accuracy_ratio") == pytest.approx(last["test_acc"], rel=1e-12)
    assert sample(text, "testbed_training_test_loss") == pytest.approx(last["test_loss"], rel=1e-12)
    assert sample(text, "testbed_training_train_accuracy_ratio") == pytest.approx(last["train_acc"], rel=1e-12)
    assert sample(text, "testbed_training_round_seconds") == pytest.approx(last["wall_s"], rel=1e-12)
    assert sample(text, "testbed_training_info", scheme="psl", experiment="metrics", model="cnn") == 1
    steps_s = sum(r["train_s"] - r["sync_s"] for r in res["history"])
    assert sample(text, "testbed_training_phase_seconds_total", phase="steps") == pytest.approx(steps_s, rel=1e-9)
    eval_s = sum(r["eval_s"] for r in res["history"])
    assert sample(text, "testbed_training_phase_seconds_total", phase="eval") == pytest.approx(eval_s, rel=1e-9)
    for name, (a, b) in zip(("dev1", "dev2"), ((3, 7), (3, 7)), strict=True):
        tot = res["devices"][name]
        assert tot["samples"] == 384 // 2 * 2  # each device's half of the data, twice (2 epochs)
        assert sample(text, "testbed_training_device_samples_total", device=name) == tot["samples"]
        for direction, key in (("uplink", "bytes_up"), ("downlink", "bytes_down")):
            assert tot[key] > 0
            assert sample(text, "testbed_training_device_transfer_bytes_total", device=name,
                          direction=direction) == tot[key]
            assert sample(text, "testbed_training_device_control_bytes_total", device=name,
                          direction=direction) == tot[f"control_{key}"]
        for stage in ("head_fwd", "up_a1", "body_fwd", "down_a2", "tail", "up_g2", "body_bwd", "down_g1"):
            assert sample(text, "testbed_training_device_stage_seconds_total", device=name,
                          stage=stage) == pytest.approx(tot["times"][stage], rel=1e-9)
        dev_last = next(d for d in last["devices"] if d["device"] == name)
        assert sample(text, "testbed_training_device_loss", device=name) == pytest.approx(dev_last["loss"], rel=1e-12)
        assert sample(text, "testbed_plan_body_start_block", device=name) == a
        assert sample(text, "testbed_plan_body_end_block", device=name) == b
        assert sample(text, "testbed_node_up", device=name) == 0  # the run is over: its agents have exited
    assert sample(text, "testbed_node_up", device="edge") == 0
    assert sample(text, "testbed_build_info", component="trainer") == 1


def test_prometheus_saw_the_agents_up_during_the_run(training_run: TrainingRun) -> None:
    prom = training_run.prometheus
    window = f"{int(training_run.ended_s - training_run.started_s) + 60}s"
    for node in ("edge", "dev1", "dev2"):
        assert instant(prom, f'max_over_time(testbed_node_up{{device="{node}"}}[{window}])') == [1.0], node


def test_every_training_dashboard_query_returns_data(training_run: TrainingRun) -> None:
    prom = training_run.prometheus
    start, end = training_run.started_s, training_run.ended_s
    exprs = [(where, substitute(expr, VARIABLES)) for where, expr in queries(load(TRAINING_DASHBOARD))]
    assert len(exprs) >= 15
    assert finite_values(prom.query_range("testbed_no_such_metric", start, end, 1.0)) == 0  # the check can fail
    empty = [f"{where}: {expr}" for where, expr in exprs
             if finite_values(prom.query_range(expr, start, end, SCRAPE_INTERVAL_S)) == 0]
    assert not empty, "training dashboard queries without data:\n" + "\n".join(empty)


def test_json_summary_on_stdout_and_a_clean_end(training_run: TrainingRun) -> None:
    assert training_run.returncode == 0, training_run.stderr  # SIGTERM while holding the endpoint is a normal end
    summary = json.loads(training_run.stdout)  # stdout holds the JSON only: no progress display
    res = training_run.results
    assert summary["scheme"] == "psl" and summary["rounds"] == ROUNDS
    assert summary["final_test_acc"] == res["final"]["test_acc"]
    assert summary["test_acc_by_round"] == [r["test_acc"] for r in res["history"]]
    assert summary["metrics_url"] == training_run.metrics_url
    assert set(summary["outputs"]) >= {"rounds.csv", "devices.csv", "results.json", "checkpoint.safetensors"}
    assert all(Path(path).exists() for path in summary["outputs"].values())
    assert f"metrics on {training_run.metrics_url}" in training_run.stderr
    assert os.path.samefile(summary["run_dir"], training_run.run_dir)
