"""Running the rounds: centralized training in the controller, or the split schemes over the control plane."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from testbed.models.weights import atomic_write_bytes
from testbed.training.checkpoint import CHECKPOINT, RunState, save_checkpoint
from testbed.training.control import ControlPlane
from testbed.training.errors import RunFailed
from testbed.training.evaluation import evaluate_all
from testbed.training.experiment import RoundPlan, batch_order, plan_round
from testbed.training.preparation import Prepared
from testbed.training.state import Party, device_blocks, edge_blocks, edge_copies, fedavg, in_blocks
from testbed.wire.envelope import Kind

__all__ = ["CentralRunner", "Event", "Placement", "SplitRunner"]

Event = Callable[..., None]


def _same_host(host: str, argv: list[str]) -> list[str]:
    return argv


@dataclass(frozen=True)
class Placement:
    """Where the agents run: on loopback (the default), or inside the emulated lab's hosts.

    ``wrap(host, argv)`` gives the command that runs ``argv`` on a host (``edge``, ``dev1``...);
    ``edge_bind`` is where the edge's data plane listens (its address on the shaped links);
    ``control_ipc``: the control plane listens on a Unix socket in the run directory instead of loopback
    TCP, so agents in other network namespaces reach it (it is the experimenter's plane: not shaped).
    """

    wrap: Callable[[str, list[str]], list[str]] = _same_host
    edge_bind: str = "tcp://127.0.0.1:*"
    control_ipc: bool = False
    max_devices: int | None = None
    description: str = "loopback"


class Runner:
    def __init__(self, prep: Prepared, state: RunState, on_event: Event) -> None:
        self.prep = prep
        self.spec = prep.spec
        self.state = state
        self.on_event = on_event
        self.ckpt = prep.run_dir / CHECKPOINT

    # ---- shared round bookkeeping ----
    def finish_round(self, plan: RoundPlan, record: dict[str, Any], t_start: float, t_trained: float) -> None:
        t0 = time.perf_counter()
        evals, _ = evaluate_all(self.prep, self.state)
        t_eval = time.perf_counter() - t0
        accs = [e["test_acc"] for e in evals.values()]
        losses = [e["test_loss"] for e in evals.values()]
        record.update(
            round=plan.round + 1,
            epoch=plan.epoch + 1,
            epoch_progress=plan.epoch_progress,
            scheme=self.spec.scheme,
            test_acc=float(np.mean(accs)),
            test_loss=float(np.mean(losses)),
            test_acc_by_model={k: v["test_acc"] for k, v in evals.items()},
            train_s=t_trained - t_start,
            eval_s=t_eval,
        )
        self.state.history.append(record)
        self.state.completed = plan.round + 1
        t1 = time.perf_counter()
        save_checkpoint(self.ckpt, self.spec, self.state, self.prep.init_hash)
        # The checkpoint just written lacks these two figures of its last round; the next one (or the
        # final save in run_experiment) has them.
        record["checkpoint_s"] = time.perf_counter() - t1
        record["wall_s"] = time.perf_counter() - t_start
        from testbed.training.results import write_tables

        write_tables(self.prep.run_dir, self.spec, self.state.history)
        self.on_event("round_done", round=plan.round + 1, total=self.prep.total_rounds, record=record)


class CentralRunner(Runner):
    def run(self) -> None:
        spec, prep = self.spec, self.prep
        torch.set_num_threads(spec.runtime.device_threads)
        party = Party(spec, ["main"], range(spec.num_blocks))
        model, opt = party.models["main"], party.optimizers["main"]
        initial = {f"w/main/{k}": v.numpy().copy() for k, v in prep.init_model.state_dict().items()}
        party.load(self.state.parties.get("central") or initial)
        x, y = prep.shards[0]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        loss_fn = nn.CrossEntropyLoss()
        B = spec.training.batch_size
        for r in range(self.state.completed, prep.total_rounds):
            plan = plan_round("centralized", prep.sizes, B, spec.training.rounds_per_epoch, 0, r)
            self.on_event("round_started", round=r + 1, pids={})
            t_start = time.perf_counter()
            order = torch.from_numpy(batch_order(spec.training.seed, 0, plan.epoch, len(y)))
            loss_sum, correct, samples, steps = 0.0, 0, 0, 0
            model.train()
            for seg in plan.segments:
                for part in seg.parts:
                    for s in range(part.first, part.end):
                        idx = order[s * B : (s + 1) * B]
                        opt.zero_grad(set_to_none=True)
                        logits = model(xt[idx])
                        loss = loss_fn(logits, yt[idx])
                        loss.backward()
                        opt.step()
                        loss_sum += float(loss.detach()) * len(idx)
                        correct += int((logits.argmax(1) == yt[idx]).sum())
                        samples += len(idx)
                        steps += 1
            t_trained = time.perf_counter()
            self.state.parties = {"central": party.dump(optimizer=True)}
            record = {
                "train_loss": loss_sum / max(samples, 1),
                "train_acc": correct / max(samples, 1),
                "samples": samples,
                "steps": steps,
                "devices": [{"device": "central", "samples": samples, "steps": steps,
                             "loss": loss_sum / max(samples, 1), "acc": correct / max(samples, 1),
                             "times": {"compute": t_trained - t_start}, "bytes_up": 0, "bytes_down": 0,
                             "control_bytes_up": 0, "control_bytes_down": 0}],
            }
            self.finish_round(plan, record, t_start, t_trained)


class SplitRunner(Runner):
    def __init__(self, prep: Prepared, state: RunState, on_event: Event, group: Any, control: ControlPlane,
                 edge_record: Path | None = None, placement: Placement | None = None) -> None:
        super().__init__(prep, state, on_event)
        self.edge_record = edge_record
        self.placement = placement or Placement()
        self.batch_sizes = prep.batch_sizes  # the largest batch per device (the edge checks it)
        self.group = group
        self.control = control
        self.names = list(self.spec.device_names)
        self.edge_endpoint = ""

    def start(self) -> None:
        spec, prep = self.spec, self.prep
        python = sys.executable
        parent = str(os.getpid())
        spec_path = prep.run_dir / "experiment.json"
        common = ["--control", self.control.endpoint, "--spec", str(spec_path), "--parent-pid", parent]
        edge_argv = [python, "-m", "agents.train_edge", "--name", "edge", *common]
        if self.placement.edge_bind != Placement.edge_bind:
            edge_argv += ["--bind", self.placement.edge_bind]
        if self.edge_record is not None:  # the privacy test: the edge records every message it receives
            edge_argv += ["--record", str(self.edge_record)]
        wrap = self.placement.wrap
        children = [self.group.start("edge", wrap("edge", edge_argv))]
        for i, name in enumerate(self.names):
            children.append(self.group.start(name, wrap(name, [
                python, "-m", "agents.train_device", "--name", name, "--index", str(i),
                "--data", str(prep.run_dir / "data" / f"{name}.npz"), *common,
            ])))
        self.control.children = children
        atomic_write_bytes(prep.run_dir / "pids.json", json.dumps(self.group.pids()).encode())
        hello = self.control.gather({name: Kind.PING for name in ["edge", *self.names]})
        self.edge_endpoint = str(hello["edge"][0].get("endpoint", ""))
        if not self.edge_endpoint.startswith("tcp://"):
            raise RunFailed("the edge did not report its endpoint")
        # Initial (or checkpointed) state to everybody.
        init = {f"w/main/{k}": v.numpy().copy() for k, v in prep.init_model.state_dict().items()}
        messages: dict[str, tuple[Kind, Mapping[str, Any], Mapping[str, np.ndarray] | None]] = {}
        run_id = prep.init_hash[:16]
        edge_state = self.state.parties.get("edge") or self._initial_edge(init)
        messages["edge"] = (Kind.SYNC, {"op": "load", "run": run_id}, edge_state)
        for i, name in enumerate(self.names):
            dev_state = self.state.parties.get(name) or self._restrict(init, device_blocks(spec, i))
            messages[name] = (Kind.SYNC, {"op": "load", "run": run_id, "edge": self.edge_endpoint}, dev_state)
        self.control.request(messages, Kind.SYNC_REPLY)

    def alive(self) -> dict[str, bool]:
        """Which agents' processes still run (safe from another thread: Popen.poll takes a lock)."""
        return {child.name: child.popen.poll() is None for child in self.group.children}

    @staticmethod
    def _restrict(init: Mapping[str, np.ndarray], blocks: Iterable[int], copy: str = "main") -> dict[str, np.ndarray]:
        keep = frozenset(blocks)
        return {f"w/{copy}/{k[len('w/main/'):]}": v for k, v in init.items() if in_blocks(k[len("w/main/"):], keep)}

    def _initial_edge(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for copy in edge_copies(self.spec):
            out.update(self._restrict(init, edge_blocks(self.spec), copy))
        return out

    def _dump(self, names: list[str], optimizer: bool) -> dict[str, dict[str, np.ndarray]]:
        got = self.control.request({n: (Kind.SYNC, {"op": "dump", "optimizer": optimizer}, None) for n in names},
                                   Kind.SYNC_REPLY)
        return {n: tensors for n, (_, tensors) in got.items()}

    def _load(self, states: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.control.request({n: (Kind.SYNC, {"op": "load"}, dict(s)) for n, s in states.items()}, Kind.SYNC_REPLY)

    def _device_fedavg(self, optimizer: bool = False) -> None:
        """FedAvg of the device-side models, weighted by shard size: the weights, and with ``optimizer`` the
        optimizer state too (Adam's moments and step); otherwise each device keeps its optimizer state."""
        states = self._dump(self.names, optimizer=optimizer)
        if all(set(states[n]) == set(states[self.names[0]]) for n in self.names):
            avg = fedavg([states[n] for n in self.names], [float(s) for s in self.prep.sizes])
            self._load(dict.fromkeys(self.names, avg))
            return
        # Different splits (or a device without optimizer state yet): average each entry over its holders.
        new: dict[str, dict[str, np.ndarray]] = {n: dict(states[n]) for n in self.names}
        keys = sorted({k for s in states.values() for k in s})
        for key in keys:
            holders = [i for i, n in enumerate(self.names) if key in states[n]]
            avg = fedavg([{key: states[self.names[i]][key]} for i in holders],
                         [float(self.prep.sizes[i]) for i in holders])
            for i in holders:
                new[self.names[i]][key] = avg[key]
        self._load(new)

    def _relay(self, src: int, dst: int) -> None:
        """Vanilla SL: the next device continues from the previous device's head, tail and optimizer."""
        state = self._dump([self.names[src]], optimizer=True)[self.names[src]]
        self._load({self.names[dst]: state})

    def run(self) -> None:
        spec, prep = self.spec, self.prep
        self.start()
        self.on_event("started", pids=self.group.pids(), alive=self.alive)
        for r in range(self.state.completed, prep.total_rounds):
            plan = plan_round(spec.scheme, prep.sizes, spec.training.batch_size, spec.training.rounds_per_epoch,
                              spec.training.fedavg_every, r, prep.steps)
            t_start = time.perf_counter()
            dev_metrics: dict[str, list[dict[str, Any]]] = {n: [] for n in self.names}
            edge_metrics: list[dict[str, Any]] = []
            bytes_before = (dict(self.control.bytes_out), dict(self.control.bytes_in))
            sync_s = 0.0
            started = False
            for seg in plan.segments:
                if spec.scheme == "sl" and seg.parts[0].device != self.state.holder:
                    t0 = time.perf_counter()
                    self._relay(self.state.holder, seg.parts[0].device)
                    self.state.holder = seg.parts[0].device
                    sync_s += time.perf_counter() - t0
                messages: dict[str, tuple[Kind, Mapping[str, Any], Mapping[str, np.ndarray] | None]] = {}
                messages["edge"] = (Kind.ROUND_START, {
                    "round": r + 1,
                    "parts": {self.names[p.device]: [p.seq0, p.seq0 + p.end - p.first] for p in seg.parts},
                    "batch_sizes": {self.names[p.device]: self.batch_sizes[p.device] for p in seg.parts},
                }, None)
                for p in seg.parts:
                    messages[self.names[p.device]] = (Kind.ROUND_START, {
                        "round": r + 1, "epoch": seg.epoch, "first": p.first, "end": p.end, "seq0": p.seq0,
                        "epoch_steps": prep.steps[p.device],
                    }, None)
                for name, (kind, meta, tensors) in messages.items():
                    self.control.send(name, kind, meta, tensors)
                if not started:
                    self.on_event("round_started", round=r + 1, pids=self.group.pids())
                    started = True
                got = self.control.gather(dict.fromkeys(messages, Kind.ROUND_END))
                for name, (meta, _) in got.items():
                    (edge_metrics.append(meta) if name == "edge" else dev_metrics[name].append(meta))
                if seg.fedavg_after:
                    t0 = time.perf_counter()
                    self._device_fedavg(optimizer=spec.training.fedavg_optimizer)
                    sync_s += time.perf_counter() - t0
            if spec.scheme == "sfl":
                t0 = time.perf_counter()
                weights = {n: float(s) for n, s in zip(self.names, prep.sizes, strict=True)}
                self.control.request({"edge": (Kind.SYNC, {"op": "average", "weights": weights}, None)},
                                     Kind.SYNC_REPLY)
                self._device_fedavg()
                sync_s += time.perf_counter() - t0
            t_trained = time.perf_counter()
            record = self._record(dev_metrics, edge_metrics, bytes_before, sync_s)
            self.state.parties = self._dump(["edge", *self.names], optimizer=True)  # for evaluation and checkpoint
            record["collect_s"] = time.perf_counter() - t_trained
            self.finish_round(plan, record, t_start, t_trained)

    def _record(self, dev_metrics: Mapping[str, list[dict[str, Any]]], edge_metrics: list[dict[str, Any]],
                bytes_before: tuple[dict[str, int], dict[str, int]], sync_s: float) -> dict[str, Any]:
        devices = []
        loss_sum, correct, samples, steps = 0.0, 0, 0, 0
        for name in self.names:
            ms = dev_metrics[name]
            d_samples = sum(m["samples"] for m in ms)
            d_loss = sum(m["loss_sum"] for m in ms)
            d_correct = sum(m["correct"] for m in ms)
            times: dict[str, float] = {}
            for m in ms:
                for k, v in m["times"].items():
                    times[k] = times.get(k, 0.0) + v
            devices.append({
                "device": name,
                "split": list(self.spec.splits[self.names.index(name)]),
                "samples": d_samples,
                "steps": sum(m["steps"] for m in ms),
                "loss": d_loss / d_samples if d_samples else None,
                "acc": d_correct / d_samples if d_samples else None,
                "times": times,
                "bytes_up": sum(m["bytes_up"] for m in ms),
                "bytes_down": sum(m["bytes_down"] for m in ms),
                "control_bytes_up": self.control.bytes_in.get(name, 0) - bytes_before[1].get(name, 0),
                "control_bytes_down": self.control.bytes_out.get(name, 0) - bytes_before[0].get(name, 0),
            })
            loss_sum += d_loss
            correct += d_correct
            samples += d_samples
            steps = max(steps, devices[-1]["steps"]) if self.spec.scheme != "sl" else steps + devices[-1]["steps"]
        edge_times: dict[str, float] = {}
        for m in edge_metrics:
            for k, v in m["times"].items():
                edge_times[k] = edge_times.get(k, 0.0) + v
        return {
            "train_loss": loss_sum / max(samples, 1),
            "train_acc": correct / max(samples, 1),
            "samples": samples,
            "steps": steps,
            "sync_s": sync_s,
            "devices": devices,
            "edge": {
                "times": edge_times,
                "batches": sum(m["batches"] for m in edge_metrics),
                "max_batch": max((m["max_batch"] for m in edge_metrics), default=0),
                "control_bytes_up": self.control.bytes_in.get("edge", 0) - bytes_before[1].get("edge", 0),
                "control_bytes_down": self.control.bytes_out.get("edge", 0) - bytes_before[0].get("edge", 0),
            },
        }
