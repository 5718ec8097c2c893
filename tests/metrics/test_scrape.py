"""The generated Prometheus configuration: shape, refusals, and promtool's verdict."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from testbed.metrics.scrape import (
    JOB_DEVICE,
    JOB_EDGE,
    ScrapeConfigError,
    ScrapeTarget,
    prometheus_duration,
    scrape_config,
    scrape_config_yaml,
)

TARGETS = [ScrapeTarget(JOB_EDGE, "10.0.0.1:9101"),
           ScrapeTarget(JOB_DEVICE, "10.0.0.2:9100", {"host": "pi-1"}),
           ScrapeTarget(JOB_DEVICE, "[fd00::3]:9100")]


def test_one_job_per_kind_one_static_config_per_target() -> None:
    config = yaml.safe_load(scrape_config_yaml(TARGETS, interval_s=2.0))
    assert config["global"]["scrape_interval"] == "2s"
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs[JOB_EDGE] == [{"targets": ["10.0.0.1:9101"]}]
    assert jobs[JOB_DEVICE] == [{"targets": ["10.0.0.2:9100"], "labels": {"host": "pi-1"}},
                                {"targets": ["[fd00::3]:9100"]}]


def test_durations() -> None:
    assert prometheus_duration(0.5) == "500ms" and prometheus_duration(15) == "15s"
    assert prometheus_duration(1.25) == "1250ms"
    with pytest.raises(ScrapeConfigError):
        prometheus_duration(0.0001)


@pytest.mark.parametrize(("targets", "settings", "message"), [
    ([], {}, "no scrape targets"),
    ([ScrapeTarget("bad job", "h:1")], {}, "job name"),
    ([ScrapeTarget("j", "nohostport")], {}, "HOST:PORT"),
    ([ScrapeTarget("j", "h:70000")], {}, "HOST:PORT"),
    ([ScrapeTarget("j", "h:1", {"__address__": "x"})], {}, "label name"),
    ([ScrapeTarget("j", "h:1"), ScrapeTarget("j", "h:1")], {}, "twice"),
    ([ScrapeTarget("j", "h:1")], {"interval_s": 1.0, "timeout_s": 2.0}, "exceeds"),
])
def test_refuses_what_prometheus_would_refuse(targets, settings, message) -> None:
    with pytest.raises(ScrapeConfigError, match=message):
        scrape_config(targets, **settings)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus package")
def test_promtool_accepts_the_generated_config(tmp_path) -> None:
    path = tmp_path / "tb-prometheus.yml"
    path.write_text(scrape_config_yaml(TARGETS, interval_s=0.5, external_labels={"run": "r1"}))
    check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
