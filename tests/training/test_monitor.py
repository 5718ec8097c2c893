"""The training monitor on its own: run_experiment's events folded into the snapshots the collectors read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from testbed.training.experiment import parse_experiment
from testbed.training.monitor import TrainingMonitor, fold_round

SPEC = parse_experiment({"name": "mon", "scheme": "psl", "devices": 2, "split": [[3, 7], [2, 8]]})


def record(round_: int, up: int) -> dict:
    """A round's record as the runner writes it (rounds.json)."""
    return {
        "round": round_, "train_loss": 2.0 / round_, "train_acc": 0.1 * round_, "test_loss": 1.5 / round_,
        "test_acc": 0.2 * round_, "train_s": 3.0, "sync_s": 1.0, "collect_s": 0.5, "eval_s": 0.25,
        "checkpoint_s": 0.125, "wall_s": 4.0,
        "devices": [
            {"device": "dev1", "samples": 64, "loss": 1.0, "acc": 0.5, "bytes_up": up, "bytes_down": 2 * up,
             "control_bytes_up": 7, "control_bytes_down": 9,
             "times": {"head_fwd": 0.5, "up_a1": 0.25, "made_up_stage": 9.0}},
            {"device": "dev2", "samples": 32, "loss": None, "acc": None, "bytes_up": 0, "bytes_down": 0,
             "control_bytes_up": 0, "control_bytes_down": 0, "times": {}},
        ],
    }


def test_rounds_accumulate_into_totals_and_latest_values() -> None:
    monitor = TrainingMonitor(SPEC)
    monitor.on_event("prepared", total=8, start=0, sizes=[30000, 30000], dataset="digits")
    monitor.on_event("round_done", round=1, total=8, record=record(1, 100))
    monitor.on_event("round_done", round=2, total=8, record=record(2, 1000))
    snap = monitor.training_snapshot()
    assert (snap.name, snap.scheme, snap.dataset, snap.planned_rounds, snap.rounds_done) == ("mon", "psl", "digits",
                                                                                             8, 2)
    assert (snap.test_loss, snap.train_accuracy, snap.round_s) == (0.75, 0.2, 4.0)
    assert dict(snap.phase_s) == {"steps": 4.0, "sync": 2.0, "collect": 1.0, "eval": 0.5, "checkpoint": 0.25}
    dev1, dev2 = snap.devices
    assert (dev1.samples, dev1.bytes_up, dev1.bytes_down, dev1.control_bytes_up, dev1.control_bytes_down) == \
        (128, 1100, 2200, 14, 18)
    assert dev1.stage_s == (("head_fwd", 1.0), ("up_a1", 0.5))  # known stages only: bounded label values
    assert (dev1.loss, dev1.accuracy) == (1.0, 0.5)
    assert (dev2.samples, dev2.loss, dev2.stage_s) == (64, None, ())
    ctl = monitor.controller_snapshot()
    assert (ctl.training_loss, ctl.training_accuracy) == (1.0, 0.4)
    assert ctl.devices == ()  # no agent started yet: no node is known


def test_resume_starts_the_round_counter_at_the_checkpoint() -> None:
    monitor = TrainingMonitor(SPEC)
    monitor.on_event("prepared", total=8, start=5, sizes=[1, 1], dataset="digits")
    assert monitor.training_snapshot().rounds_done == 5
    assert fold_round(monitor.training_snapshot(), record(6, 1)).rounds_done == 6


def test_nodes_are_up_while_their_process_runs_and_carry_their_split() -> None:
    running = {"edge": True, "dev1": True, "dev2": False}
    monitor = TrainingMonitor(SPEC)
    monitor.on_event("started", pids={"edge": 1, "dev1": 2, "dev2": 3}, alive=lambda: dict(running))
    nodes = {n.name: n for n in monitor.controller_snapshot().devices}
    assert {name: n.up for name, n in nodes.items()} == running
    assert (nodes["dev2"].a, nodes["dev2"].b, nodes["dev2"].role) == (2, 8, "device")
    assert nodes["edge"].role == "edge"
    running["edge"] = False
    assert not {n.name: n for n in monitor.controller_snapshot().devices}["edge"].up


def test_register_exports_both_collectors() -> None:
    registry = CollectorRegistry()
    monitor = TrainingMonitor(SPEC)
    monitor.register(registry)
    monitor.on_event("round_done", round=1, total=8, record=record(1, 100))
    assert registry.get_sample_value("testbed_training_loss") == 2.0
    assert registry.get_sample_value("testbed_training_rounds_total") == 1
    assert registry.get_sample_value("testbed_training_device_transfer_bytes_total",
                                     {"device": "dev1", "direction": "uplink"}) == 100
