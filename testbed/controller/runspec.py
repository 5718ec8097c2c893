"""`testbed run EXPERIMENT.yaml`: the experiment file, described and validated before anything starts (pure).

:func:`parse_runspec` turns a parsed YAML document into a frozen :class:`RunSpec` or raises :class:`RunSpecError`
listing every problem at once, one per line (unknown keys with a did-you-mean, wrong types, impossible splits,
unknown link profiles and device classes with the known ones, duplicate ids, link changes that cannot happen).
Human units ("30s", "5ms") are parsed here and nowhere else; inside, every duration is ``*_s`` seconds. Names are
resolved too: a device's link is a :class:`~testbed.net.link.LinkProfile`, its class a
:class:`~testbed.lab.devices.DeviceClass`. Every key is documented in docs/resplitting.md; examples:
experiments/run-*.yaml.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.controller.estimates import EstimatorConfig
from testbed.controller.replan import ReplanPolicy
from testbed.errors import TestbedError
from testbed.lab.devices import DeviceClass, load_device_class
from testbed.net.link import LinkProfile, load_link_profile
from testbed.net.units import parse_duration_us
from testbed.validation import (
    Problems,
    UniqueKeyLoader,
    boolean,
    choice,
    did_you_mean,
    integer,
    kind_of,
    mapping,
    number,
)

__all__ = [
    "CACHED_WEIGHTS", "DeviceSpec", "EdgeSpec", "LinkChange", "MetricsSpec", "ModelSpec", "PlacementSpec",
    "PlannerSpec", "RunSpec", "RunSpecError", "WorkloadSpec", "load_runspec", "parse_runspec", "zoo_num_blocks",
]

CACHED_WEIGHTS = "train-cached"  # train once per (model, dataset), as `testbed demo` does, then reuse
MODES = ("inference", "training")
PLACEMENTS = ("loopback", "lab", "inventory")
DATA = ("shard", "synthetic")
EDGE_DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("per-device", "common")
#: The planner, or a baseline of testbed.planning.baselines to measure against it (inference only).
ALGORITHMS = ("lscra", "fixed-middle", "neurosurgeon", "device-only")
DATASETS = ("auto", "fashion-mnist", "digits")
MAX_DEVICES = 200
MIN_PROBE_INTERVAL_S = 0.05  # the device agent's floor (agents.link_probe.MIN_INTERVAL_S)
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}\Z")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}\Z")

NumBlocks = Callable[[str, Mapping[str, Any]], int]


class RunSpecError(TestbedError):
    """The experiment file is invalid; the message lists every problem, one per line."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: tuple[tuple[str, Any], ...]  # build_model kwargs, sorted by key
    num_blocks: int  # L

    def kwargs(self) -> dict[str, Any]:
        return dict(self.config)


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    device_class: DeviceClass | None
    link: LinkProfile
    data: str  # shard (its share of the test set) | synthetic
    split: tuple[int, int] | None  # pinned: no plan moves it


@dataclass(frozen=True)
class EdgeSpec:
    device_class: DeviceClass | None
    device: str  # auto | cpu | cuda
    threads: int


@dataclass(frozen=True)
class PlacementSpec:
    kind: str  # loopback | lab | inventory
    lab_prefix: str = "tb"
    inventory: Path | None = None


@dataclass(frozen=True)
class PlannerSpec:
    splits: str  # per-device | common
    resplit: bool
    margin: float
    consecutive: int
    min_interval_s: float
    keep_slack: float
    evaluate_every_s: float
    time_constant_s: float
    window: int
    device_profile: Path | None  # None: profile the devices first
    edge_profile: Path | None
    profile_links: bool | None = None  # measure the links before the first plan; None: unless on loopback
    probe_interval_s: float = 1.0  # agents probe their link this often while they send (0: never)
    algorithm: str = "lscra"  # or a baseline to compare against (ALGORITHMS)

    def policy(self) -> ReplanPolicy:
        return ReplanPolicy(margin=self.margin, consecutive=self.consecutive, min_interval_s=self.min_interval_s,
                            common=self.splits == "common", keep_slack=self.keep_slack)

    def estimator(self) -> EstimatorConfig:
        return EstimatorConfig(time_constant_s=self.time_constant_s, window=self.window)


@dataclass(frozen=True)
class WorkloadSpec:
    batch_size: int
    requests: int | None  # per device; exactly one of requests and duration_s
    duration_s: float | None
    rate_rps: float | None  # requests per second per device; None: closed loop, as fast as answers come
    dataset: str


@dataclass(frozen=True)
class LinkChange:
    at_s: float
    device: str
    link: LinkProfile


@dataclass(frozen=True)
class MetricsSpec:
    enabled: bool
    prometheus: bool  # also start a Prometheus server scraping every exporter
    scrape_interval_s: float
    bind: str


@dataclass(frozen=True)
class RunSpec:
    name: str
    mode: str
    model: ModelSpec
    weights: str | Path | None  # CACHED_WEIGHTS, a weights file, or None (training trains)
    training: Path | None  # training experiment (mode training)
    devices: tuple[DeviceSpec, ...]
    edge: EdgeSpec
    placement: PlacementSpec
    planner: PlannerSpec
    workload: WorkloadSpec | None  # None in training mode
    link_changes: tuple[LinkChange, ...]
    metrics: MetricsSpec
    output: Path

    @property
    def profile_links(self) -> bool:
        """Measure the links before the first plan: as the planner says, else where links are real or shaped
        (lab, inventory); on loopback the nominal 'unshaped' link is as good as a measurement."""
        if self.planner.profile_links is not None:
            return self.planner.profile_links
        return self.mode == "inference" and self.placement.kind != "loopback"

    @property
    def fixed_splits(self) -> dict[str, tuple[int, int]]:
        return {d.id: d.split for d in self.devices if d.split is not None}


# ---------------------------------------------------------------------------------------------
# Validation helpers: each records a problem and returns a usable default, so every problem is listed


def _seconds(p: Problems, path: str, value: Any, default: float | None, positive: bool = False) -> float | None:
    """A duration with its unit ("30s", "500ms"); a bare number is refused (seconds or milliseconds?)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        p.add(path, f"expected a duration such as '30s' or '500ms', got {kind_of(value)} {value!r}")
        return default
    try:
        s = parse_duration_us(value) / 1e6
    except ValueError as exc:
        p.add(path, str(exc))
        return default
    if positive and s <= 0:
        p.add(path, f"must be longer than 0, got {value!r}")
        return default
    return s


def _path(p: Problems, path: str, value: Any, base: Path, what: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        p.add(path, f"expected the path of {what}, got {kind_of(value)} {value!r}")
        return None
    full = Path(value) if Path(value).is_absolute() else base / value
    if not full.is_file():
        p.add(path, f"{what} {full} does not exist")
        return None
    return full


def _link(p: Problems, path: str, value: Any) -> LinkProfile | None:
    if not isinstance(value, str) or not value:
        p.add(path, f"expected a link profile name (profiles/links/NAME.yaml) or path, got {kind_of(value)} {value!r}")
        return None
    try:
        return load_link_profile(value)
    except TestbedError as exc:
        p.add(path, str(exc))
        return None


def _device_class(p: Problems, path: str, value: Any) -> DeviceClass | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        p.add(path, f"expected a device class name (profiles/devices/NAME.yaml), got {kind_of(value)} {value!r}")
        return None
    try:
        return load_device_class(value)
    except TestbedError as exc:
        p.add(path, str(exc))
        return None


def zoo_num_blocks(name: str, config: Mapping[str, Any]) -> int:
    """L of a zoo model, built on torch's meta device (no weights, no memory)."""
    import torch

    from testbed.models import build_model

    with torch.device("meta"):
        return build_model(name, **dict(config)).num_blocks


# ---------------------------------------------------------------------------------------------
# Sections


def _model(p: Problems, value: Any, num_blocks: NumBlocks) -> ModelSpec:
    if isinstance(value, str):
        value = {"name": value}
    m = mapping(p, "model", value, ("name", "config"))
    name = m.get("name", "cnn")
    if not isinstance(name, str):
        p.add("model.name", f"expected a zoo model name, got {kind_of(name)} {name!r}")
        name = "cnn"
    config = m.get("config") or {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        p.add("model.config", f"expected a mapping of model options, got {config!r}")
        config = {}
    blocks = 0
    try:
        blocks = num_blocks(name, config)
    except TestbedError as exc:
        p.add("model", str(exc))
    except (TypeError, ValueError, RuntimeError) as exc:  # a factory's own complaint about its options
        p.add("model.config", f"cannot build {name!r} with {dict(config)}: {' '.join(str(exc).split())}")
    return ModelSpec(name, tuple(sorted(config.items())), blocks)


def _split(p: Problems, path: str, value: Any, num_blocks: int) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)):
        p.add(path, f"expected [a, b] with integers, got {value!r}")
        return None
    a, b = int(value[0]), int(value[1])
    if num_blocks and not 1 <= a <= b <= num_blocks - 1:
        p.add(path, f"impossible split [{a}, {b}] for a model of L={num_blocks} blocks: need 1 <= a <= b <= "
                    f"{num_blocks - 1} (head blocks[0:a] and tail blocks[b:L] stay on the device; a == b: no body)")
        return None
    return a, b


def _devices(p: Problems, value: Any, model: ModelSpec, mode: str
             ) -> tuple[tuple[DeviceSpec, ...], list[str] | None]:
    """The valid devices, and every id declared (None when the list itself is unusable)."""
    if not isinstance(value, list) or not value:
        p.add("devices", f"expected a non-empty list of devices ({{id, class, link, data, split}}), got {value!r}")
        return (), None
    if len(value) > MAX_DEVICES:
        p.add("devices", f"at most {MAX_DEVICES} devices, got {len(value)}")
        return (), None
    out: list[DeviceSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        where = f"devices[{i}]"
        d = mapping(p, where, item, ("id", "class", "link", "data", "split"))
        if not isinstance(item, Mapping):
            continue
        ident = d.get("id", f"dev{i + 1}")
        if not isinstance(ident, str) or not _ID_RE.match(ident) or ident == "edge":
            p.add(f"{where}.id", f"expected a name of letters, digits, '-' and '_' starting with a letter (at most "
                                 f"32; 'edge' is the edge server's), got {ident!r}")
            ident = f"dev{i + 1}"
        if ident in seen:
            p.add(f"{where}.id", f"duplicate device id {ident!r} (also devices[{seen[ident]}])")
        seen.setdefault(ident, i)
        link = _link(p, f"{where}.link", d.get("link", "unshaped"))
        data = choice(p, f"{where}.data", d.get("data"), "shard", DATA)
        if mode == "training" and "data" in d:
            p.add(f"{where}.data", "only for inference: training data comes from the training experiment")
        if mode == "training" and "split" in d:
            p.add(f"{where}.split", "only for inference: training splits come from the training experiment")
        split = _split(p, f"{where}.split", d.get("split"), model.num_blocks)
        cls = _device_class(p, f"{where}.class", d.get("class"))
        if link is not None:
            out.append(DeviceSpec(ident, cls, link, data, split))
    return tuple(out), list(seen)


def _placement(p: Problems, value: Any, base: Path) -> PlacementSpec:
    if value is None or isinstance(value, str):
        kind = choice(p, "placement", value, "loopback", PLACEMENTS)
        if kind == "inventory":
            p.add("placement", "give the inventory: {kind: inventory, inventory: PATH}")
        return PlacementSpec(kind)
    m = mapping(p, "placement", value, ("kind", "prefix", "inventory"))
    kind = choice(p, "placement.kind", m.get("kind"), "loopback", PLACEMENTS)
    prefix = m.get("prefix", "tb")
    if kind != "lab" and "prefix" in m:
        p.add("placement.prefix", "only for kind: lab")
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        p.add("placement.prefix", f"expected a lab prefix of 1-6 lower-case letters/digits, got {prefix!r}")
        prefix = "tb"
    inventory = _path(p, "placement.inventory", m.get("inventory"), base, "inventory")
    if kind == "inventory" and "inventory" not in m:
        p.add("placement.inventory", "required for kind: inventory (an Ansible inventory file)")
    if kind != "inventory" and "inventory" in m:
        p.add("placement.inventory", "only for kind: inventory")
    return PlacementSpec(kind, prefix, inventory)


def _probe_interval(p: Problems, value: Any) -> float:
    s = _seconds(p, "planner.probe_interval", value, 1.0)
    if s is None:
        return 1.0
    if s != 0 and not MIN_PROBE_INTERVAL_S <= s <= 3600:
        p.add("planner.probe_interval", f"must be 0s (no probes) or between {MIN_PROBE_INTERVAL_S * 1e3:g}ms and "
                                        f"3600s, got {value!r}")
        return 1.0
    return s


def _planner(p: Problems, value: Any, mode: str, base: Path) -> PlannerSpec:
    keys = ("algorithm", "splits", "resplit", "margin", "consecutive", "min_interval", "keep_slack",
            "evaluate_every", "estimator", "device_profile", "edge_profile", "profile_links", "probe_interval")
    m = mapping(p, "planner", value, keys)
    for key in ("profile_links", "probe_interval"):
        if mode == "training" and key in m:
            p.add(f"planner.{key}", "only for inference (`testbed run`'s device agents measure and probe links)")
    algorithm = choice(p, "planner.algorithm", m.get("algorithm"), "lscra", ALGORITHMS)
    if algorithm != "lscra" and mode == "training":
        p.add("planner.algorithm", f"{algorithm} is an inference baseline; training plans with lscra")
    e = mapping(p, "planner.estimator", m.get("estimator"), ("time_constant", "window"))
    defaults, est = ReplanPolicy(), EstimatorConfig()
    return PlannerSpec(
        splits=choice(p, "planner.splits", m.get("splits"), "common" if mode == "training" else "per-device",
                       SPLITS),
        resplit=boolean(p, "planner.resplit", m.get("resplit"), True),
        margin=number(p, "planner.margin", m.get("margin"), defaults.margin, 0.0, 10.0),
        consecutive=integer(p, "planner.consecutive", m.get("consecutive"), defaults.consecutive, 1, 1000) or 1,
        min_interval_s=_seconds(p, "planner.min_interval", m.get("min_interval"), defaults.min_interval_s) or 0.0,
        keep_slack=number(p, "planner.keep_slack", m.get("keep_slack"), defaults.keep_slack, 0.0, 1.0),
        evaluate_every_s=_seconds(p, "planner.evaluate_every", m.get("evaluate_every"), 1.0, positive=True) or 1.0,
        time_constant_s=_seconds(p, "planner.estimator.time_constant", e.get("time_constant"),
                                 est.time_constant_s, positive=True) or est.time_constant_s,
        window=integer(p, "planner.estimator.window", e.get("window"), est.window, 1, 64) or est.window,
        device_profile=_path(p, "planner.device_profile", m.get("device_profile"), base, "block profile"),
        edge_profile=_path(p, "planner.edge_profile", m.get("edge_profile"), base, "block profile"),
        profile_links=None if m.get("profile_links") is None else
        boolean(p, "planner.profile_links", m.get("profile_links"), False),
        probe_interval_s=_probe_interval(p, m.get("probe_interval")),
        algorithm=algorithm,
    )


def _check_profile(p: Problems, path: str, file: Path | None, model: ModelSpec) -> None:
    """A block profile must be of the run's model (a profile of another model would plan nonsense)."""
    if file is None:
        return
    from testbed.profiling.store import load_block_profile

    try:
        prof = load_block_profile(file)
    except TestbedError as exc:
        p.add(path, str(exc))
        return
    if prof.model != model.name or (model.num_blocks and len(prof.param_bytes) != model.num_blocks):
        p.add(path, f"{file} profiles {prof.model!r} with {len(prof.param_bytes)} blocks, but the run's model is "
                    f"{model.name!r} with {model.num_blocks}")


def _workload(p: Problems, value: Any) -> WorkloadSpec:
    m = mapping(p, "workload", value, ("batch_size", "requests", "duration", "rate", "dataset"))
    requests = integer(p, "workload.requests", m.get("requests"), None, 1, 10**9)
    duration = _seconds(p, "workload.duration", m.get("duration"), None, positive=True)
    if ("requests" in m) == ("duration" in m):
        p.add("workload", "give exactly one of requests (per device) and duration (e.g. '60s')")
    rate = m.get("rate")
    if isinstance(rate, str) and re.fullmatch(r"\d+(\.\d*)?/s", rate.strip()):
        rate = float(rate.strip()[:-2])
    rate_rps = None
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1e6:
            p.add("workload.rate", f"expected requests per second per device (a number > 0 or 'N/s'), got {rate!r}")
        else:
            rate_rps = float(rate)
    return WorkloadSpec(
        batch_size=integer(p, "workload.batch_size", m.get("batch_size"), 10, 1, 65536) or 10,
        requests=requests, duration_s=duration, rate_rps=rate_rps,
        dataset=choice(p, "workload.dataset", m.get("dataset"), "auto", DATASETS),
    )


def _link_changes(p: Problems, value: Any, ids: list[str] | None, timed: bool, duration_s: float | None,
                  placement: PlacementSpec | None) -> tuple[LinkChange, ...]:
    """``ids``/``placement`` None: already reported as broken, not checked again here."""
    if value is None:
        return ()
    if not isinstance(value, list):
        p.add("link_changes", f"expected a list of {{at, device, link}}, got {kind_of(value)}")
        return ()
    if value and placement is not None and placement.kind == "loopback":
        p.add("link_changes", "loopback has no shaped links to change; use placement: lab (or an inventory)")
    if value and not timed:
        p.add("link_changes", "link changes are timed: the workload needs a duration (e.g. duration: 60s)")
    out: list[LinkChange] = []
    for i, item in enumerate(value):
        where = f"link_changes[{i}]"
        c = mapping(p, where, item, ("at", "device", "link"))
        if not isinstance(item, Mapping):
            continue
        missing = [k for k in ("at", "device", "link") if k not in c]
        if missing:
            p.add(where, f"missing {', '.join(missing)}")
            continue
        at = _seconds(p, f"{where}.at", c["at"], None)
        device = c["device"]
        if ids is not None and device not in ids:
            p.add(f"{where}.device", f"unknown device {device!r}" + did_you_mean(str(device), ids))
        link = _link(p, f"{where}.link", c["link"])
        if at is not None and duration_s is not None and at >= duration_s:
            p.add(f"{where}.at", f"{c['at']} is not before the end of the run (workload.duration {duration_s:g} s)")
        if at is not None and link is not None and isinstance(device, str):
            out.append(LinkChange(at, device, link))
    clash = {(c.at_s, c.device) for c in out if sum((x.at_s, x.device) == (c.at_s, c.device) for x in out) > 1}
    for at, device in sorted(clash):
        p.add("link_changes", f"two changes of {device!r} at {at:g} s")
    return tuple(sorted(out, key=lambda c: (c.at_s, c.device)))


def _metrics(p: Problems, value: Any) -> MetricsSpec:
    if isinstance(value, bool):
        value = {"enabled": value}
    m = mapping(p, "metrics", value, ("enabled", "prometheus", "scrape_interval", "bind"))
    bind = m.get("bind", "127.0.0.1")
    if not isinstance(bind, str) or not bind:
        p.add("metrics.bind", f"expected an address, got {bind!r}")
        bind = "127.0.0.1"
    enabled = boolean(p, "metrics.enabled", m.get("enabled"), True)
    prometheus = boolean(p, "metrics.prometheus", m.get("prometheus"), False)
    if prometheus and not enabled:
        p.add("metrics.prometheus", "needs metrics.enabled: true (Prometheus scrapes the exporters)")
    return MetricsSpec(enabled, prometheus,
                       _seconds(p, "metrics.scrape_interval", m.get("scrape_interval"), 1.0, positive=True) or 1.0,
                       bind)


# ---------------------------------------------------------------------------------------------
# The document


_TOP = ("name", "mode", "model", "weights", "training", "devices", "edge", "placement", "planner", "workload",
        "link_changes", "metrics", "output")


def parse_runspec(data: Any, *, source: str = "<experiment>", base_dir: Path | None = None,
                  default_name: str = "run", num_blocks: NumBlocks = zoo_num_blocks) -> RunSpec:
    """Validate a parsed document. Relative paths are relative to ``base_dir`` (default: the working directory,
    where `testbed run` is started: the repository root)."""
    base = Path.cwd() if base_dir is None else Path(base_dir)
    if not isinstance(data, Mapping):
        raise RunSpecError(f"{source}: an experiment is a YAML mapping with keys {', '.join(_TOP)}, "
                           f"got {kind_of(data)}")
    p = Problems()
    top = mapping(p, "", data, _TOP)
    name = top.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        p.add("name", f"expected a short name of letters, digits, '-', '_' or '.', got {name!r}")
        name = default_name
    mode = choice(p, "mode", top.get("mode"), "inference", MODES)

    training: Path | None = None
    experiment = None
    if mode == "training":
        training = _path(p, "training", top.get("training"), base, "training experiment")
        if "training" not in top:
            p.add("training", "required in training mode: a training experiment file (experiments/psl-iid.yaml)")
        if training is not None:
            from testbed.training.experiment import load_experiment

            try:
                experiment = load_experiment(training)
            except TestbedError as exc:
                p.add("training", " / ".join(line.strip() for line in str(exc).splitlines()))
        for key in ("weights", "workload"):
            if key in top:
                p.add(key, "only for inference (the training experiment says what to train and how long)")
    elif "training" in top:
        p.add("training", "only for mode: training")

    model_value = top.get("model")
    if experiment is not None:
        if model_value is None:
            model_value = {"name": experiment.model.name, "config": experiment.model.kwargs()}
        if experiment.scheme == "centralized":
            p.add("training", "a centralized experiment has no devices or splits to run")
    model = _model(p, model_value, num_blocks)
    if experiment is not None and (model.name, model.kwargs()) != (experiment.model.name, experiment.model.kwargs()):
        p.add("model", f"{model.name!r} differs from the training experiment's {experiment.model.name!r}")

    weights: str | Path | None = None
    if mode == "inference":
        w = top.get("weights", CACHED_WEIGHTS)
        weights = CACHED_WEIGHTS if w == CACHED_WEIGHTS else _path(p, "weights", w, base, "weights file")
        if isinstance(weights, Path):
            from testbed.models.weights import read_weights_info

            try:
                info = read_weights_info(weights)
                if info["name"] != model.name:
                    p.add("weights", f"{weights} holds a {info['name']!r} model, not {model.name!r}")
            except TestbedError as exc:
                p.add("weights", str(exc))

    devices, ids = _devices(p, top.get("devices"), model, mode)
    if experiment is not None and devices and len(devices) != experiment.devices:
        p.add("devices", f"{len(devices)} devices listed, the training experiment has {experiment.devices}")

    e = mapping(p, "edge", top.get("edge"), ("class", "device", "threads"))
    edge = EdgeSpec(_device_class(p, "edge.class", e.get("class")),
                    choice(p, "edge.device", e.get("device"), "auto", EDGE_DEVICES),
                    integer(p, "edge.threads", e.get("threads"), 1, 1, 256) or 1)
    before = len(p.lines)
    placement = _placement(p, top.get("placement"), base)
    placement_ok = len(p.lines) == before
    planner = _planner(p, top.get("planner"), mode, base)
    _check_profile(p, "planner.device_profile", planner.device_profile, model)
    _check_profile(p, "planner.edge_profile", planner.edge_profile, model)
    fixed = {d.split for d in devices if d.split is not None}
    if planner.algorithm != "lscra" and fixed:
        p.add("planner.algorithm", f"the {planner.algorithm} baseline chooses every split itself, but devices pin "
              f"{', '.join(f'{a}:{b}' for a, b in sorted(fixed))} (pinned splits need lscra)")
    if planner.splits == "common" and len(fixed) > 1:
        p.add("planner.splits", f"common needs one split for all devices, but devices pin {sorted(fixed)}")

    workload = _workload(p, top.get("workload")) if mode == "inference" else None
    raw_workload = top.get("workload")
    timed = workload is not None and (workload.duration_s is not None
                                      or (isinstance(raw_workload, Mapping) and "duration" in raw_workload))
    changes = _link_changes(p, top.get("link_changes"), ids, timed, workload.duration_s if workload else None,
                            placement if placement_ok else None)
    metrics = _metrics(p, top.get("metrics"))
    out = top.get("output", f"runs/{name}")
    if not isinstance(out, str) or not out:
        p.add("output", f"expected a directory path, got {kind_of(out)} {out!r}")
        out = f"runs/{name}"
    output = Path(out) if Path(out).is_absolute() else base / out

    if p.lines:
        raise RunSpecError(f"{source} is not a valid run experiment:\n  " + "\n  ".join(p.lines))
    return RunSpec(name=name, mode=mode, model=model, weights=weights, training=training, devices=devices,
                   edge=edge, placement=placement, planner=planner, workload=workload, link_changes=changes,
                   metrics=metrics, output=output)


def load_runspec(path: str | Path, *, base_dir: Path | None = None, num_blocks: NumBlocks = zoo_num_blocks
                 ) -> RunSpec:
    """Read and validate an experiment file (its name defaults to the file's stem; duplicate keys are errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunSpecError(f"cannot read experiment file {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as exc:
        raise RunSpecError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        raise RunSpecError(f"{path} is empty")
    return parse_runspec(data, source=str(path), base_dir=base_dir, default_name=path.stem, num_blocks=num_blocks)
