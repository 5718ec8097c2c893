"""Split-learning schemes, controller side: U-shaped PSL, SFL, vanilla sequential SL, and centralized.

The controller prepares the run (dataset, partition, one data file per device, the initial model;
:mod:`testbed.training.preparation`), starts the edge (``python -m agents.train_edge``) and one trainer per
device (``python -m agents.train_device``), and drives them round by round over a control plane
(:mod:`testbed.training.control`; :mod:`testbed.training.runners`). Each round: run the round's segments
(see :func:`testbed.training.experiment.plan_round`); between segments FedAvg the device-side models (psl
with ``fedavg_every``) or relay them to the next device (sl); at the end average the edge's body copies and
the device-side models (sfl), collect every party's state, evaluate (:mod:`testbed.training.evaluation`),
and write one checkpoint atomically (:mod:`testbed.training.checkpoint`). The controller holds the test set
(it is the experimenter); labels and inputs of the training set reach only their device. The edge never
opens the dataset. Model state as named arrays and FedAvg: :mod:`testbed.training.state`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.models.weights import atomic_write_bytes
from testbed.training.checkpoint import CHECKPOINT, RunState, check_identity, load_checkpoint, save_checkpoint
from testbed.training.control import ControlPlane
from testbed.training.errors import ProtocolError, RunFailed
from testbed.training.evaluation import export_models
from testbed.training.experiment import ExperimentSpec
from testbed.training.preparation import prepare
from testbed.training.runners import CentralRunner, Event, Placement, SplitRunner
from testbed.training.state import Party, fedavg, load_spec_json
from testbed.wire.messages import CONTROL_LIMITS, DATA_LIMITS

__all__ = [
    "CONTROL_LIMITS",
    "DATA_LIMITS",
    "Party",
    "Placement",
    "ProtocolError",
    "RunFailed",
    "fedavg",
    "load_spec_json",
    "run_experiment",
]


def _control_bind(run_dir: Path, placement: Placement | None) -> str:
    """Loopback TCP; for agents in other network namespaces a Unix socket (reachable from all of them)."""
    if placement is None or not placement.control_ipc:
        return "tcp://127.0.0.1:*"
    path = run_dir.resolve() / "control.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        path = Path(tempfile.gettempdir()) / f"tb-train-{os.getpid()}.sock"
    return f"ipc://{path}"


def run_experiment(
    spec: ExperimentSpec,
    run_dir: Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    on_event: Event | None = None,
    edge_record: Path | None = None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment in ``run_dir``; return the results (also written there).

    ``on_event(kind, **info)`` is called with ``prepared`` (total, start, sizes, dataset), ``started`` (pids,
    and ``alive()``: which agents still run), ``round_started`` (round, pids), ``round_done`` (round, total,
    record) and ``exported``. :class:`testbed.training.monitor.TrainingMonitor` turns them into metrics.
    ``edge_record``: a file where the edge records every message it receives (see agents/train_edge.py).
    ``placement``: where the agents run (default: loopback; the lab's: :func:`testbed.cli.train.lab_placement`).
    """
    from testbed.supervisor import ProcessFailed, ProcessGroup
    from testbed.training.results import summarise, write_plots, write_tables

    emit: Event = on_event or (lambda kind, **info: None)
    run_dir = Path(run_dir)
    if placement and placement.max_devices is not None and spec.scheme != "centralized" \
            and spec.devices > placement.max_devices:
        raise RunFailed(f"the experiment has {spec.devices} devices, but {placement.description} has "
                        f"{placement.max_devices}: use a bigger lab or fewer devices")
    ckpt = run_dir / CHECKPOINT
    if fresh and run_dir.exists():
        for sub in ("data", "export", "logs"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for stale in [ckpt, run_dir / "pids.json", *run_dir.glob("rounds.*"), *run_dir.glob("devices.*"),
                      run_dir / "results.json", *run_dir.glob("*.png")]:
            stale.unlink(missing_ok=True)
    if ckpt.exists() and not resume:
        raise RunFailed(f"{run_dir} already holds a checkpoint; pass --resume to continue it or --fresh to start over")
    if resume and ckpt.exists():
        check_identity(ckpt, spec)  # before anything in the run directory is rewritten
    prep = prepare(spec, run_dir)
    state = RunState()
    if resume and ckpt.exists():
        state, init_hash = load_checkpoint(ckpt, spec)
        if init_hash != prep.init_hash:
            raise RunFailed(f"{ckpt}: the initial model differs from this experiment's (torch version changed?)")
    emit("prepared", total=prep.total_rounds, start=state.completed, sizes=prep.sizes, dataset=prep.dataset_name)
    t0 = time.perf_counter()
    if state.completed < prep.total_rounds:
        if spec.scheme == "centralized":
            CentralRunner(prep, state, emit).run()
        else:
            try:
                with ProcessGroup(run_dir / "logs") as group:
                    control = ControlPlane(group, spec.runtime.timeout_s, _control_bind(run_dir, placement))
                    try:
                        SplitRunner(prep, state, emit, group, control, edge_record, placement).run()
                    finally:
                        control.close()
            except (ProcessFailed, RunFailed) as exc:
                raise RunFailed(
                    f"{exc}\nthe run stopped after round {state.completed} of {prep.total_rounds}; "
                    f"`testbed train ... --resume` continues from its checkpoint ({ckpt})"
                ) from exc
    if state.history:
        save_checkpoint(ckpt, spec, state, prep.init_hash)  # with the last round's timing filled in
    exported = export_models(prep, state)
    emit("exported", models=exported)
    write_tables(run_dir, spec, state.history)
    results = summarise(spec, state.history, prep.sizes, prep.dataset_name, exported,
                        resumed=resume, session_s=time.perf_counter() - t0, batch_sizes=prep.batch_sizes,
                        steps=prep.steps)
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    write_plots(run_dir, [results])
    return results
