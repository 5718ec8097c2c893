"""Split-learning experiments: the YAML file, its validation, and the pure training schedule.

An experiment is described first (:class:`ExperimentSpec`, a frozen dataclass built only by
:func:`parse_experiment` / :func:`load_experiment`, which reject unknown keys, wrong types and
impossible splits with every problem listed at once) and run second (``testbed.training.schemes``).
The schedule (``plan_round`` and friends) lives in :mod:`testbed.training.schedule`, re-exported here.
Example (every key but ``scheme`` has a default)::

    name: psl-iid
    scheme: psl                 # psl | sfl | sl | centralized
    model: {name: cnn, config: {}}
    data:
      dataset: fashion-mnist    # fashion-mnist | digits | auto
      train_samples: null       # first N training images (null: all)
      test_samples: null        # first N test images used for evaluation (null: all)
      partition: iid            # iid | dirichlet
      alpha: null               # dirichlet concentration (required for dirichlet)
      min_samples: 1            # every device gets at least this many samples
    devices: 4
    split: [3, 7]               # (a, b) for every device, or one [a, b] per device
    training:
      optimizer: adam           # adam | sgd
      lr: 0.001
      momentum: 0.0             # sgd only
      weight_decay: 0.0
      batch_size: 64            # per device and step (by_shard: the mean per device)
      batch_sizes: equal        # psl/sfl: equal | by_shard (the same steps for all, batches ~ shard sizes)
      epochs: 1
      rounds_per_epoch: 4       # a round ends with FedAvg (sfl), evaluation and a checkpoint
      seed: 0
      fedavg_every: 0           # psl: average the device-side models every K steps (0: never)
      fedavg_optimizer: false   # psl: average the devices' optimizer state too (Adam moments)
      mode: sync                # psl: sync | async
    runtime:                    # how, not what: not part of the experiment's identity
      edge_threads: 1           # torch threads of the edge
      device_threads: 1         # torch threads of each device trainer (and of centralized training)
      eval_threads: 1           # torch threads of the controller's evaluation
      eval_batch_size: 500
      timeout_s: 600
      export_onnx: true

The schedule (which device runs which steps in which round, with which batch) is a pure function of the
spec and the shard sizes: see :mod:`testbed.training.schedule` (``device_steps``, ``plan_round``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.training.errors import ExperimentError
from testbed.training.schedule import (
    RoundPlan,
    Segment,
    SegmentPart,
    batch_bounds,
    batch_order,
    device_steps,
    max_batch,
    plan_round,
    steps_per_epoch,
)
from testbed.validation import Problems, UniqueKeyLoader, boolean, choice, integer, kind_of, mapping, number

__all__ = [
    "DATASETS",
    "MODES",
    "OPTIMIZERS",
    "SCHEMES",
    "DataSpec",
    "ExperimentError",
    "ExperimentSpec",
    "ModelSpec",
    "RoundPlan",
    "RuntimeSpec",
    "Segment",
    "SegmentPart",
    "TrainingSpec",
    "batch_bounds",
    "batch_order",
    "device_steps",
    "load_experiment",
    "max_batch",
    "parse_experiment",
    "plan_round",
    "steps_per_epoch",
]

SCHEMES = ("psl", "sfl", "sl", "centralized")
OPTIMIZERS = ("adam", "sgd")
DATASETS = ("fashion-mnist", "digits", "auto")
PARTITIONS = ("iid", "dirichlet")
MODES = ("sync", "async")
BATCH_SIZES = ("equal", "by_shard")
MAX_DEVICES = 64


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class ModelSpec:
    name: str = "cnn"
    config: tuple[tuple[str, Any], ...] = ()  # build_model kwargs, sorted by key

    def kwargs(self) -> dict[str, Any]:
        return dict(self.config)


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "fashion-mnist"
    train_samples: int | None = None
    test_samples: int | None = None
    partition: str = "iid"
    alpha: float | None = None
    min_samples: int = 1


@dataclass(frozen=True)
class TrainingSpec:
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 1
    rounds_per_epoch: int = 4
    seed: int = 0
    fedavg_every: int = 0
    mode: str = "sync"
    batch_sizes: str = "equal"
    fedavg_optimizer: bool = False


#: Training keys added after the first release: left out of the identity while at their default, so the
#: checkpoints of earlier runs still resume.
_LATER_KEYS = {"batch_sizes": "equal", "fedavg_optimizer": False}


@dataclass(frozen=True)
class RuntimeSpec:
    edge_threads: int = 1
    device_threads: int = 1
    eval_threads: int = 1
    eval_batch_size: int = 500
    timeout_s: float = 600.0
    export_onnx: bool = True


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment. ``splits`` holds one ``(a, b)`` per device (empty for centralized)."""

    name: str
    scheme: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    devices: int = 1
    splits: tuple[tuple[int, int], ...] = ()
    training: TrainingSpec = field(default_factory=TrainingSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    num_blocks: int = 0  # L of the model, filled in by validation

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(f"dev{i + 1}" for i in range(self.devices)) if self.scheme != "centralized" else ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; ``parse_experiment(spec.to_dict())`` gives the spec back."""
        d = asdict(self)
        d["model"] = {"name": self.model.name, "config": self.model.kwargs()}
        if self.splits:
            d["split"] = [list(s) for s in self.splits]
        del d["splits"], d["num_blocks"]
        return d

    def identity_hash(self) -> str:
        """Hash of everything that decides the result (not ``name`` or ``runtime``): resume checks it."""
        d = self.to_dict()
        del d["name"], d["runtime"]
        for key, default in _LATER_KEYS.items():
            if d["training"][key] == default:
                del d["training"][key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Validation (the checkers, each recording a problem and returning a default, are testbed.validation's)


def _model_blocks(p: Problems, model: ModelSpec) -> int:
    """L of the model, built on the meta device (no weights); 0 after reporting a problem."""
    import torch

    from testbed.errors import ModelError
    from testbed.models import build_model

    try:
        with torch.device("meta"):
            return build_model(model.name, **model.kwargs()).num_blocks
    except ModelError as exc:
        p.add("model", str(exc))
    except TypeError as exc:
        p.add("model.config", str(exc))
    return 0


def _splits(p: Problems, value: Any, devices: int, num_blocks: int) -> tuple[tuple[int, int], ...]:
    example = "expected [a, b] (one split for every device) or a list of one [a, b] per device"

    def pair(path: str, item: Any) -> tuple[int, int] | None:
        if not isinstance(item, list | tuple) or len(item) != 2:
            p.add(path, f"{example}, got {item!r}")
            return None
        a, b = item
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (a, b)):
            p.add(path, f"a and b must be integers, got {item!r}")
            return None
        a, b = int(a), int(b)
        if num_blocks and not 1 <= a < b <= num_blocks - 1:
            p.add(path, f"impossible split [{a}, {b}] for a model of L={num_blocks} blocks: need "
                        f"1 <= a < b <= {num_blocks - 1} (head = blocks[0:a] and tail = blocks[b:L] on the "
                        "device, a non-empty body blocks[a:b] on the edge)")
            return None
        return (a, b)

    if value is None:
        p.add("split", f"required for split schemes: {example}")
        return ()
    if not isinstance(value, list | tuple) or not value:
        p.add("split", f"{example}, got {value!r}")
        return ()
    if all(isinstance(v, list | tuple) for v in value):
        if len(value) != devices:
            p.add("split", f"{len(value)} splits given for {devices} devices")
            return ()
        pairs = [pair(f"split[{i}]", v) for i, v in enumerate(value)]
        return tuple(x for x in pairs if x is not None) if all(pairs) else ()
    one = pair("split", value)
    return (one,) * devices if one else ()


def parse_experiment(data: Any, source: str = "<experiment>", default_name: str = "experiment") -> ExperimentSpec:
    """Validate a parsed YAML/JSON document; raise ExperimentError listing every problem."""
    p = Problems()
    top = mapping(p, "", data, ("name", "scheme", "model", "data", "devices", "split", "training", "runtime"))
    if data is not None and not isinstance(data, Mapping):
        raise ExperimentError(f"{source}: the experiment must be a YAML mapping, got {kind_of(data)}")

    name = top.get("name", default_name)
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        p.add("name", f"expected a short name of letters, digits, '-', '_' or '.', got {name!r}")
        name = default_name
    if "scheme" not in top:
        p.add("scheme", f"required: one of {', '.join(SCHEMES)}")
    scheme = choice(p, "scheme", top.get("scheme"), "psl", SCHEMES)

    m = mapping(p, "model", top.get("model"), ("name", "config"))
    model_name = m.get("name", "cnn")
    if not isinstance(model_name, str):
        p.add("model.name", f"expected a string, got {kind_of(model_name)}")
        model_name = "cnn"
    config = m.get("config") or {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        p.add("model.config", f"expected a mapping of constructor arguments, got {config!r}")
        config = {}
    model = ModelSpec(model_name, tuple(sorted(config.items())))

    d = mapping(p, "data", top.get("data"),
                 ("dataset", "train_samples", "test_samples", "partition", "alpha", "min_samples"))
    partition = choice(p, "data.partition", d.get("partition"), "iid", PARTITIONS)
    alpha = number(p, "data.alpha", d.get("alpha"), None, 0.0, strict=True, nullable=True, bound_format="")
    if partition == "dirichlet" and alpha is None and d.get("alpha") is None:
        p.add("data.alpha", "required for the dirichlet partition (e.g. 0.5)")
    if partition == "iid" and alpha is not None:
        p.add("data.alpha", "only applies to the dirichlet partition")
    data_spec = DataSpec(
        dataset=choice(p, "data.dataset", d.get("dataset"), "fashion-mnist", DATASETS),
        train_samples=integer(p, "data.train_samples", d.get("train_samples"), None, 1, nullable=True),
        test_samples=integer(p, "data.test_samples", d.get("test_samples"), None, 1, nullable=True),
        partition=partition,
        alpha=alpha,
        min_samples=integer(p, "data.min_samples", d.get("min_samples"), 1, 1) or 1,
    )

    devices = integer(p, "devices", top.get("devices"), 1, 1, MAX_DEVICES) or 1

    t = mapping(p, "training", top.get("training"), tuple(f.name for f in TrainingSpec.__dataclass_fields__.values()))
    defaults = TrainingSpec()
    optimizer = choice(p, "training.optimizer", t.get("optimizer"), defaults.optimizer, OPTIMIZERS)
    momentum = number(p, "training.momentum", t.get("momentum"), 0.0, 0.0, bound_format="") or 0.0
    if optimizer != "sgd" and momentum:
        p.add("training.momentum", "only applies to optimizer: sgd")
    fedavg_every = integer(p, "training.fedavg_every", t.get("fedavg_every"), 0, 0) or 0
    mode = choice(p, "training.mode", t.get("mode"), "sync", MODES)
    if scheme != "psl":
        if fedavg_every:
            p.add("training.fedavg_every", f"only applies to psl ({scheme} "
                  + ("averages every round)" if scheme == "sfl" else "has no device-side averaging)"))
        if mode != "sync":
            p.add("training.mode", "only psl has an asynchronous mode")
    batch_sizes = choice(p, "training.batch_sizes", t.get("batch_sizes"), "equal", BATCH_SIZES)
    if batch_sizes != "equal" and scheme not in ("psl", "sfl"):
        p.add("training.batch_sizes", f"only applies to the parallel schemes psl and sfl, not {scheme}")
    if batch_sizes != "equal" and mode != "sync":
        p.add("training.batch_sizes", "by_shard needs the synchronous mode (the edge weighs each step's batches)")
    fedavg_optimizer = boolean(p, "training.fedavg_optimizer", t.get("fedavg_optimizer"), False)
    if fedavg_optimizer and (scheme != "psl" or not fedavg_every):
        p.add("training.fedavg_optimizer", "only applies to psl with fedavg_every > 0")
    training = TrainingSpec(
        optimizer=optimizer,
        lr=number(p, "training.lr", t.get("lr"), defaults.lr, 0.0, strict=True, bound_format="") or defaults.lr,
        momentum=momentum,
        weight_decay=number(p, "training.weight_decay", t.get("weight_decay"), 0.0, 0.0, bound_format="") or 0.0,
        batch_size=integer(p, "training.batch_size", t.get("batch_size"), defaults.batch_size, 1, 65536) or 1,
        epochs=integer(p, "training.epochs", t.get("epochs"), defaults.epochs, 1, 10000) or 1,
        rounds_per_epoch=integer(p, "training.rounds_per_epoch", t.get("rounds_per_epoch"),
                              defaults.rounds_per_epoch, 1, 100000) or 1,
        seed=integer(p, "training.seed", t.get("seed"), 0, 0, 2**32 - 1) or 0,
        fedavg_every=fedavg_every,
        mode=mode,
        batch_sizes=batch_sizes,
        fedavg_optimizer=fedavg_optimizer,
    )

    r = mapping(p, "runtime", top.get("runtime"), tuple(RuntimeSpec.__dataclass_fields__))
    rd = RuntimeSpec()
    runtime = RuntimeSpec(
        edge_threads=integer(p, "runtime.edge_threads", r.get("edge_threads"), rd.edge_threads, 1, 256) or 1,
        device_threads=integer(p, "runtime.device_threads", r.get("device_threads"), rd.device_threads, 1, 256) or 1,
        eval_threads=integer(p, "runtime.eval_threads", r.get("eval_threads"), rd.eval_threads, 1, 256) or 1,
        eval_batch_size=integer(p, "runtime.eval_batch_size", r.get("eval_batch_size"), rd.eval_batch_size, 1) or 1,
        timeout_s=number(p, "runtime.timeout_s", r.get("timeout_s"), rd.timeout_s, 0.0, strict=True,
                         bound_format="") or 1.0,
        export_onnx=boolean(p, "runtime.export_onnx", r.get("export_onnx"), rd.export_onnx),
    )

    num_blocks = _model_blocks(p, model)
    splits: tuple[tuple[int, int], ...] = ()
    if scheme == "centralized":
        if top.get("split") is not None:
            p.add("split", "centralized training has no split; remove it")
    else:
        splits = _splits(p, top.get("split"), devices, num_blocks)
        if scheme == "sfl" and len(set(splits)) > 1:
            p.add("split", "sfl needs one split for all devices (its body copies are averaged)")

    if p.lines:
        raise ExperimentError(f"{source} is not a valid experiment:\n  " + "\n  ".join(p.lines))
    return ExperimentSpec(
        name=name, scheme=scheme, model=model, data=data_spec, devices=devices,
        splits=splits, training=training, runtime=runtime, num_blocks=num_blocks,
    )


def load_experiment(path: Path) -> ExperimentSpec:
    """Read and validate an experiment YAML file (the name defaults to the file's stem)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExperimentError(f"cannot read experiment file {path}: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        raise ExperimentError(f"{path} is empty")
    return parse_experiment(data, source=str(path), default_name=path.stem)
