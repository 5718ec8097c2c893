"""Split-learning schemes, controller side: U-shaped PSL, SFL, vanilla sequential SL, and centralized.

The controller prepares the run (dataset, partition, one data file per device, the initial model),
starts the edge (``python -m agents.train_edge``) and one trainer per device
(``python -m agents.train_device``) on loopback, and drives them round by round over a control
plane (its ROUTER, their DEALERs). Each round: run the round's segments (see
:func:`testbed.training.experiment.plan_round`); between segments FedAvg the device-side models
(psl with ``fedavg_every``) or relay them to the next device (sl); at the end average the edge's
body copies and the device-side models (sfl), collect every party's state, evaluate, and write one
checkpoint atomically. The controller holds the test set (it is the experimenter); labels and
inputs of the training set reach only their device. The edge never opens the dataset.

The first part of this module is the control protocol the agents share (message helpers, model
state as named arrays, optimizer state, FedAvg); it imports neither the dataset nor the agents.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from torch import nn

from testbed.errors import TestbedError
from testbed.models import BlockModel, build_model
from testbed.models.weights import atomic_write_bytes, save_weights, state_hash
from testbed.wire.envelope import Kind, WireError
from testbed.wire.messages import (
    CONTROL_LIMITS,
    DATA_LIMITS,
    META,
    recv_message,
    send_message,
    unpack_meta,
)

from testbed.training.experiment import (  # isort: skip
    ExperimentError,
    ExperimentSpec,
    RoundPlan,
    TrainingSpec,
    batch_order,
    parse_experiment,
    plan_round,
)

__all__ = [
    "CONTROL_LIMITS",
    "DATA_LIMITS",
    "Party",
    "ProtocolError",
    "RunFailed",
    "fedavg",
    "run_experiment",
]

# Messages (send_message, recv_message, META, the limits) live in testbed.wire.messages, shared with the
# controller's control plane and the training agents.
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "1"


class ProtocolError(TestbedError):
    """A training message is well formed on the wire but wrong for the protocol (kind, meta, shapes)."""


class RunFailed(TestbedError):
    """A training run stopped before its end; the message says how to resume."""


# ---------------------------------------------------------------------------------------------
# Model state as named arrays: "w/<copy>/<state key>" and "o/<copy>/<param name>/<field>"


def make_optimizer(params: Iterable[nn.Parameter], training: TrainingSpec) -> torch.optim.Optimizer:
    params = list(params)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


def _in_blocks(key: str, blocks: frozenset[int]) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) in blocks


class Party:
    """One participant's model copies, restricted to the blocks it owns, each with its own optimizer.

    A device has one copy (``main``) of its head and tail blocks; the psl/sl edge one copy of the
    body; the sfl edge one body copy per device. ``dump``/``load`` move the state (weights, buffers
    and optionally the optimizer state) as named numpy arrays.
    """

    def __init__(self, spec: ExperimentSpec, copies: Iterable[str], blocks: Iterable[int]) -> None:
        self.spec = spec
        self.blocks = frozenset(int(b) for b in blocks)
        self.models: dict[str, BlockModel] = {}
        self.params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for copy in copies:
            model = build_model(spec.model.name, **spec.model.kwargs())
            model.train()
            named = [(n, p) for n, p in model.named_parameters() if _in_blocks(n, self.blocks)]
            self.models[copy] = model
            self.params[copy] = named
            self.optimizers[copy] = make_optimizer([p for _, p in named], spec.training)

    def state_keys(self, copy: str) -> list[str]:
        return [k for k in self.models[copy].state_dict() if _in_blocks(k, self.blocks)]

    def dump(self, optimizer: bool = False) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for copy, model in self.models.items():
            for key, value in model.state_dict().items():
                if _in_blocks(key, self.blocks):
                    out[f"w/{copy}/{key}"] = value.detach().cpu().numpy().copy()
            if optimizer:
                opt = self.optimizers[copy]
                for name, param in self.params[copy]:
                    for fname, fvalue in opt.state.get(param, {}).items():
                        if isinstance(fvalue, torch.Tensor):
                            out[f"o/{copy}/{name}/{fname}"] = fvalue.detach().cpu().numpy().copy()
                        else:  # pragma: no cover - torch keeps every field as a tensor
                            out[f"o/{copy}/{name}/{fname}"] = np.asarray(fvalue, dtype=np.float64)
        return out

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load weights (all required) and, if any ``o/`` entries are present, the whole optimizer state."""
        weights = {k: v for k, v in arrays.items() if k.startswith("w/")}
        opt_entries = {k: v for k, v in arrays.items() if k.startswith("o/")}
        unknown = sorted(set(arrays) - set(weights) - set(opt_entries) - {META})
        if unknown:
            raise ProtocolError(f"unexpected state entries {unknown[:4]}")
        for copy, model in self.models.items():
            keys = self.state_keys(copy)
            expected = {f"w/{copy}/{k}" for k in keys}
            given = {k for k in weights if k.startswith(f"w/{copy}/")}
            if given != expected:
                missing, extra = sorted(expected - given), sorted(given - expected)
                raise ProtocolError(f"state for copy {copy!r}: missing {missing[:4]}, unexpected {extra[:4]}")
            current = model.state_dict()
            with torch.no_grad():
                for key in keys:
                    arr = weights[f"w/{copy}/{key}"]
                    target = current[key]
                    if tuple(arr.shape) != tuple(target.shape):
                        raise ProtocolError(f"state {copy}/{key}: shape {arr.shape}, expected {tuple(target.shape)}")
                    target.copy_(torch.from_numpy(np.array(arr, copy=True)))
        if not opt_entries:
            return
        for copy in self.models:
            opt = self.optimizers[copy]
            by_name = dict(self.params[copy])
            opt.state.clear()
            for key, arr in opt_entries.items():
                _, c, rest = key.split("/", 2)
                if c != copy:
                    continue
                pname, fname = rest.rsplit("/", 1)
                param = by_name.get(pname)
                if param is None:
                    raise ProtocolError(f"optimizer state for unknown parameter {copy}/{pname}")
                opt.state[param][fname] = torch.from_numpy(np.array(arr, copy=True))
        known = {f"o/{c}/" for c in self.models}
        stray = [k for k in opt_entries if not any(k.startswith(p) for p in known)]
        if stray:
            raise ProtocolError(f"optimizer state for unknown copies {stray[:4]}")


def fedavg(states: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Weighted average of same-keyed states, entry by entry in a fixed order (deterministic).

    Float entries are averaged in float64 and cast back; integer entries (BatchNorm's batch counter)
    take the maximum.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state")
    keys = list(states[0])
    if any(list(s) != keys and set(s) != set(keys) for s in states):
        raise ProtocolError("fedavg: the states do not have the same entries")
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = states[0][key]
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros(first.shape, dtype=np.float64)
            for s, w in zip(states, weights, strict=True):
                acc += (w / total) * s[key].astype(np.float64)
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max(np.stack([s[key] for s in states]), axis=0).astype(first.dtype)
    return out


def device_blocks(spec: ExperimentSpec, index: int) -> list[int]:
    a, b = spec.splits[index]
    return [*range(0, a), *range(b, spec.num_blocks)]


def edge_blocks(spec: ExperimentSpec) -> list[int]:
    return list(range(min(a for a, _ in spec.splits), max(b for _, b in spec.splits)))


def edge_copies(spec: ExperimentSpec) -> list[str]:
    return list(spec.device_names) if spec.scheme == "sfl" else ["main"]


# ---------------------------------------------------------------------------------------------
# Controller


Event = Callable[..., None]


@dataclass
class Prepared:
    spec: ExperimentSpec
    run_dir: Path
    x_test: np.ndarray
    y_test: np.ndarray
    shards: list[tuple[np.ndarray, np.ndarray]]  # per device (centralized: one, all the data)
    sizes: list[int]
    total_rounds: int
    dataset_name: str
    init_model: BlockModel
    init_hash: str


@dataclass
class RunState:
    """Everything a checkpoint holds: the parties' states, the sl holder, and the per-round records."""

    completed: int = 0
    parties: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    holder: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _subset(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    if n is None:
        return x, y
    return x[:n], y[:n]


_DATASET_CACHE: dict[tuple[str, str], Any] = {}


def _load_dataset(name: str) -> Any:
    """The dataset, decoded once per process (a benchmark or a test suite runs several experiments)."""
    from testbed.training.datasets import load_dataset

    key = (name, os.environ.get("TESTBED_FASHION_MNIST_DIR", ""))
    if key not in _DATASET_CACHE:
        _DATASET_CACHE.clear()  # keep one: Fashion-MNIST is about 220 MB as float32
        _DATASET_CACHE[key] = load_dataset(name)
    return _DATASET_CACHE[key]


def prepare(spec: ExperimentSpec, run_dir: Path) -> Prepared:
    """Load and partition the data, write the device shards, build the initial model (seeded)."""
    from testbed.training.partitioning import partition

    dataset = _load_dataset(spec.data.dataset)
    x_train, y_train = _subset(dataset.x_train, dataset.y_train, spec.data.train_samples)
    x_test, y_test = _subset(dataset.x_test, dataset.y_test, spec.data.test_samples)
    if spec.scheme == "centralized":
        parts = [np.arange(len(y_train), dtype=np.int64)]
    else:
        parts = partition(y_train, spec.devices, spec.data.partition, spec.training.seed,
                          alpha=spec.data.alpha, min_samples=spec.data.min_samples)
    sizes = [len(p) for p in parts]
    plan_round(spec.scheme, sizes, spec.training.batch_size, spec.training.rounds_per_epoch,
               spec.training.fedavg_every, 0)  # raises ExperimentError if the schedule is impossible
    shards = [(np.ascontiguousarray(x_train[p]), np.ascontiguousarray(y_train[p])) for p in parts]
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec.scheme != "centralized":
        data_dir = run_dir / "data"
        data_dir.mkdir(exist_ok=True)
        for name, (x, y) in zip(spec.device_names, shards, strict=True):
            path = data_dir / f"{name}.npz"
            tmp = data_dir / f".{name}.{os.getpid()}.npz"
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
    atomic_write_bytes(run_dir / "experiment.json", json.dumps(spec.to_dict(), indent=2).encode())
    torch.manual_seed(spec.training.seed)
    model = build_model(spec.model.name, **spec.model.kwargs())
    return Prepared(
        spec=spec, run_dir=run_dir, x_test=x_test, y_test=y_test, shards=shards, sizes=sizes,
        total_rounds=spec.training.epochs * spec.training.rounds_per_epoch, dataset_name=dataset.name,
        init_model=model, init_hash=state_hash(model),
    )


# ---- checkpoints ----


def save_checkpoint(path: Path, spec: ExperimentSpec, state: RunState, init_hash: str) -> None:
    from safetensors.numpy import save

    tensors = {f"{party}#{name}": np.ascontiguousarray(arr) for party, arrs in state.parties.items()
               for name, arr in arrs.items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "identity": spec.identity_hash(),
        "init_hash": init_hash,
        "completed": str(state.completed),
        "holder": str(state.holder),
        "history": json.dumps(state.history),
    }
    atomic_write_bytes(path, save(tensors, metadata=meta))


def check_identity(path: Path, spec: ExperimentSpec) -> dict[str, str]:
    """The checkpoint's metadata, after checking that it belongs to this experiment (reads no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise RunFailed(f"cannot read checkpoint {path}: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunFailed(f"{path} is not a training checkpoint of this version")
    if meta.get("identity") != spec.identity_hash():
        raise RunFailed(
            f"{path} belongs to a different experiment (the model, data or training settings changed); "
            "resume with the same YAML, or start afresh with --fresh"
        )
    return meta


def load_checkpoint(path: Path, spec: ExperimentSpec) -> tuple[RunState, str]:
    from safetensors.numpy import load_file

    meta = check_identity(path, spec)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise RunFailed(f"cannot read checkpoint {path}: {exc}") from exc
    parties: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        party, name = key.split("#", 1)
        parties.setdefault(party, {})[name] = arr
    state = RunState(int(meta["completed"]), parties, int(meta["holder"]), json.loads(meta["history"]))
    return state, meta["init_hash"]


# ---- evaluation and assembly ----


def assemble(spec: ExperimentSpec, init: BlockModel, device_state: Mapping[str, np.ndarray] | None,
             edge_state: Mapping[str, np.ndarray] | None, index: int, edge_copy: str) -> BlockModel:
    """Device ``index``'s whole model: its head and tail, and the edge's body (copy ``edge_copy``)."""
    model = build_model(spec.model.name, **spec.model.kwargs())
    merged = {k: v.clone() for k, v in init.state_dict().items()}
    for source, prefix in ((edge_state, f"w/{edge_copy}/"), (device_state, "w/main/")):
        for key, arr in (source or {}).items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if name in merged:
                    merged[name] = torch.from_numpy(np.array(arr, copy=True))
    model.load_state_dict(merged, strict=True)
    model.eval()
    return model


@torch.inference_mode()
def evaluate(model: BlockModel, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a test set."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))
        yb = torch.from_numpy(np.ascontiguousarray(y[i : i + batch_size]))
        logits = model(xb)
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return correct / n, loss / n


def _models_to_evaluate(prep: Prepared, state: RunState) -> dict[str, BlockModel]:
    """The models the devices hold now: per device (deduplicated by weights), the sl holder's only."""
    spec = prep.spec
    if spec.scheme == "centralized":
        return {"central": assemble(spec, prep.init_model, state.parties.get("central"), None, 0, "main")}
    names = spec.device_names
    indices = [state.holder] if spec.scheme == "sl" else list(range(spec.devices))
    out: dict[str, BlockModel] = {}
    for i in indices:
        copy = names[i] if spec.scheme == "sfl" else "main"
        out[names[i]] = assemble(spec, prep.init_model, state.parties.get(names[i]), state.parties.get("edge"), i,
                                 copy)
    return out


def _evaluate_all(prep: Prepared, state: RunState) -> tuple[dict[str, dict[str, Any]], dict[str, BlockModel]]:
    models = _models_to_evaluate(prep, state)
    results: dict[str, dict[str, Any]] = {}
    seen: dict[str, dict[str, Any]] = {}
    torch.set_num_threads(prep.spec.runtime.eval_threads)
    for name, model in models.items():
        digest = state_hash(model)
        if digest not in seen:
            acc, loss = evaluate(model, prep.x_test, prep.y_test, prep.spec.runtime.eval_batch_size)
            seen[digest] = {"test_acc": acc, "test_loss": loss, "weights": digest}
        results[name] = dict(seen[digest])
    return results, models


# ---- the control plane ----


class ControlPlane:
    """The controller's ROUTER; agents dial in (DEALER, routing id = their name)."""

    def __init__(self, group: Any, timeout_s: float) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_LIMITS.max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.children: list[Any] = []
        self.seq = 0
        self.bytes_out: dict[str, int] = {}
        self.bytes_in: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def send(self, name: str, kind: Kind, meta: Mapping[str, Any],
             tensors: Mapping[str, np.ndarray] | None = None) -> int:
        self.seq += 1
        n = send_message(self.sock, kind, "controller", self.seq, meta=meta, tensors=tensors,
                         route=name.encode(), limits=CONTROL_LIMITS)
        self.bytes_out[name] = self.bytes_out.get(name, 0) + n
        return self.seq

    def gather(self, expected: Mapping[str, Kind]) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Wait for one message of the given kind from each named agent, watching every child process."""
        pending = dict(expected)
        got: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            self.group.check_alive(self.children)
            if time.monotonic() > deadline:
                raise RunFailed(f"no answer from {', '.join(sorted(pending))} within {self.timeout_s:.0f} s")
            if not self.sock.poll(100):
                continue
            try:
                route, env, tensors, nbytes = recv_message(self.sock, routed=True, limits=CONTROL_LIMITS)
            except WireError as exc:
                raise RunFailed(f"a malformed control message arrived: {exc}") from exc
            name = (route or b"").decode(errors="replace")
            self.bytes_in[name] = self.bytes_in.get(name, 0) + nbytes
            if env.kind is Kind.ERROR:
                detail = f"{env.error.code}: {env.error.message}" if env.error else "?"
                raise RunFailed(f"{name} failed: {detail}")
            if name not in pending or env.kind is not pending[name]:
                raise RunFailed(f"unexpected {env.kind.value} from {name!r}")
            got[name] = (unpack_meta(tensors), {k: v for k, v in tensors.items() if k != META})
            del pending[name]
        return got

    def request(self, messages: Mapping[str, tuple[Kind, Mapping[str, Any], Mapping[str, np.ndarray] | None]],
                reply: Kind) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        for name, (kind, meta, tensors) in messages.items():
            self.send(name, kind, meta, tensors)
        return self.gather({name: reply for name in messages})


# ---- the run ----


class _Runner:
    def __init__(self, prep: Prepared, state: RunState, on_event: Event) -> None:
        self.prep = prep
        self.spec = prep.spec
        self.state = state
        self.on_event = on_event
        self.ckpt = prep.run_dir / CHECKPOINT

    # ---- shared round bookkeeping ----
    def finish_round(self, plan: RoundPlan, record: dict[str, Any], t_start: float, t_trained: float) -> None:
        t0 = time.perf_counter()
        evals, _ = _evaluate_all(self.prep, self.state)
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


class _CentralRunner(_Runner):
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


class _SplitRunner(_Runner):
    def __init__(self, prep: Prepared, state: RunState, on_event: Event, group: Any, control: ControlPlane,
                 edge_record: Path | None = None) -> None:
        super().__init__(prep, state, on_event)
        self.edge_record = edge_record
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
        if self.edge_record is not None:  # the privacy test: the edge records every message it receives
            edge_argv += ["--record", str(self.edge_record)]
        children = [self.group.start("edge", edge_argv)]
        for i, name in enumerate(self.names):
            children.append(self.group.start(name, [
                python, "-m", "agents.train_device", "--name", name, "--index", str(i),
                "--data", str(prep.run_dir / "data" / f"{name}.npz"), *common,
            ]))
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

    @staticmethod
    def _restrict(init: Mapping[str, np.ndarray], blocks: Iterable[int], copy: str = "main") -> dict[str, np.ndarray]:
        keep = frozenset(blocks)
        return {f"w/{copy}/{k[len('w/main/'):]}": v for k, v in init.items() if _in_blocks(k[len("w/main/"):], keep)}

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

    def _device_fedavg(self) -> None:
        """FedAvg of the device-side models (weights only; each device keeps its optimizer state)."""
        states = self._dump(self.names, optimizer=False)
        spec = self.spec
        if len(set(spec.splits)) == 1:
            avg = fedavg([states[n] for n in self.names], [float(s) for s in self.prep.sizes])
            self._load(dict.fromkeys(self.names, avg))
            return
        # Different splits: average each entry over the devices that hold it.
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
        self.on_event("started", pids=self.group.pids())
        for r in range(self.state.completed, prep.total_rounds):
            plan = plan_round(spec.scheme, prep.sizes, spec.training.batch_size, spec.training.rounds_per_epoch,
                              spec.training.fedavg_every, r)
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
                }, None)
                for p in seg.parts:
                    messages[self.names[p.device]] = (Kind.ROUND_START, {
                        "round": r + 1, "epoch": seg.epoch, "first": p.first, "end": p.end, "seq0": p.seq0,
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
                    self._device_fedavg()
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


def export_models(prep: Prepared, state: RunState) -> dict[str, Any]:
    """Save each distinct trained model and export its devices' heads and tails to ONNX."""
    from testbed.partition import ArtifactCache, PartitionId

    spec = prep.spec
    out_dir = prep.run_dir / "export"
    models = _models_to_evaluate(prep, state)
    cache = ArtifactCache(out_dir / "onnx")
    exported: dict[str, Any] = {}
    by_hash: dict[str, str] = {}
    for name, model in models.items():
        digest = state_hash(model)
        weights = out_dir / f"model-{digest[:16]}.safetensors"
        if digest not in by_hash:
            save_weights(model, weights)
            by_hash[digest] = str(weights)
        entry: dict[str, Any] = {"weights": str(weights), "weights_hash": digest}
        if spec.scheme != "centralized" and spec.runtime.export_onnx:
            index = spec.device_names.index(name)
            a, b = spec.splits[index]
            head, tail = cache.partition(model, digest, a, b)
            entry.update(partition=str(PartitionId(digest, a, b)), head=str(head), tail=str(tail))
        exported[name] = entry
    if spec.scheme == "sl":  # every device continues from the last holder's model
        for name in spec.device_names:
            exported.setdefault(name, exported[spec.device_names[state.holder]])
    atomic_write_bytes(out_dir / "models.json", json.dumps(exported, indent=2).encode())
    return exported


def run_experiment(
    spec: ExperimentSpec,
    run_dir: Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    on_event: Event | None = None,
    edge_record: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment in ``run_dir``; return the results (also written there).

    ``on_event(kind, **info)`` is called with ``prepared`` (total, start), ``started`` (pids),
    ``round_started`` (round, pids), ``round_done`` (round, total, record) and ``exported``.
    ``edge_record``: a file where the edge records every message it receives (see agents/train_edge.py).
    """
    from testbed.supervisor import ProcessFailed, ProcessGroup
    from testbed.training.results import summarise, write_plots, write_tables

    emit: Event = on_event or (lambda kind, **info: None)
    run_dir = Path(run_dir)
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
            _CentralRunner(prep, state, emit).run()
        else:
            try:
                with ProcessGroup(run_dir / "logs") as group:
                    control = ControlPlane(group, spec.runtime.timeout_s)
                    try:
                        _SplitRunner(prep, state, emit, group, control, edge_record).run()
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
                        resumed=resume, session_s=time.perf_counter() - t0)
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    write_plots(run_dir, [results])
    return results


def load_spec_json(path: Path) -> ExperimentSpec:
    """The normalised experiment the controller wrote for its agents."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"cannot read {path}: {exc}") from exc
    return parse_experiment(data, source=str(path))

