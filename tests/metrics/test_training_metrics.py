"""The training collector on its own: a snapshot in, metric families out (no HTTP, no training)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from testbed.metrics.training import PHASES, DeviceTotals, TrainingCollector, TrainingSnapshot

from .registry import TRAINING


def registry_of(snapshot) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TrainingCollector(snapshot))
    return registry


def test_a_snapshot_becomes_counters_and_gauges() -> None:
    get = registry_of(lambda: TRAINING).get_sample_value
    assert get("testbed_training_info", {"experiment": "psl-iid", "scheme": "psl", "dataset": "fashion-mnist",
                                         "model": "cnn"}) == 1
    assert get("testbed_training_rounds_total") == 2
    assert get("testbed_training_planned_rounds") == 4
    assert get("testbed_training_test_loss") == 0.5
    assert get("testbed_training_train_accuracy_ratio") == 0.75
    assert get("testbed_training_round_seconds") == 1.5
    assert get("testbed_training_phase_seconds_total", {"phase": "steps"}) == 2.0
    assert get("testbed_training_phase_seconds_total", {"phase": "checkpoint"}) == 0.0  # every phase, from 0
    assert get("testbed_training_device_samples_total", {"device": "dev1"}) == 128
    assert get("testbed_training_device_transfer_bytes_total", {"device": "dev1", "direction": "uplink"}) == 1000
    assert get("testbed_training_device_transfer_bytes_total", {"device": "dev1", "direction": "downlink"}) == 2000
    assert get("testbed_training_device_control_bytes_total", {"device": "dev1", "direction": "uplink"}) == 300
    assert get("testbed_training_device_control_bytes_total", {"device": "dev1", "direction": "downlink"}) == 400
    assert get("testbed_training_device_stage_seconds_total", {"device": "dev1", "stage": "up_a1"}) == 0.2
    assert get("testbed_training_device_loss", {"device": "dev1"}) == 0.6
    assert get("testbed_training_device_accuracy_ratio", {"device": "dev1"}) == 0.7
    assert get("testbed_training_snapshot_failures_total") == 0


def test_unknown_values_are_absent_not_zero() -> None:
    snap = TrainingSnapshot(name="x", scheme="sl", devices=(DeviceTotals("dev1"),))
    text = "\n".join(line for line in generate_latest(registry_of(lambda: snap)).decode().splitlines()
                     if not line.startswith("#"))
    for name in ("testbed_training_planned_rounds ", "testbed_training_test_loss ", "testbed_training_round_seconds ",
                 "testbed_training_device_loss{", "testbed_training_device_stage_seconds_total{"):
        assert name not in text, name
    assert 'testbed_training_device_samples_total{device="dev1"} 0.0' in text
    assert len([line for line in text.splitlines() if line.startswith("testbed_training_phase_seconds_total{")]) \
        == len(PHASES)


def test_a_failing_snapshot_is_counted_and_the_scrape_still_answers() -> None:
    def broken() -> TrainingSnapshot:
        raise RuntimeError("mid-update")

    registry = registry_of(broken)
    generate_latest(registry)
    assert registry.get_sample_value("testbed_training_snapshot_failures_total") == 2  # this scrape and the one above
    assert registry.get_sample_value("testbed_training_rounds_total") == 0
