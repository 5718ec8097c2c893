"""From measured profiles to the planner's input: a :class:`~testbed.planning.model.PlanningProblem`.

Ingredients:

* a **device-side block profile** (``testbed profile --runtime onnxruntime`` for inference, ``--runtime torch
  --training`` for training): the per-block device times, activation and parameter sizes;
* optionally an **edge-side block profile** of the same model (``--runtime torch`` on the edge machine, CUDA
  there): the body times. Without one, the device profile's times stand for the edge too;
* **device classes** (``profiles/devices/NAME.yaml``): a device of class C runs the profiled device times at
  speed ``C.speed_vs_pi4 / P.speed_vs_pi4``, where ``P.speed_vs_pi4`` is the speed of the machine that measured
  the profile, recorded in it (this host's estimate, ``TESTBED_HOST_SPEED``, or the class given with
  ``--device-class`` when measuring on a real device). A profile measured on a Pi 4 gives a Pi 5 (2.5) speed 2.5;
  one measured on this host (6.0, an estimate) gives a Pi 4 speed 1/6. Equal classes give speed 1: exact;
  everything else is as good as the two CPU factors (fp32, single-thread figures; see docs/profiling.md);
* **links**: named link profiles (``profiles/links/NAME.yaml``: uplink/downlink rate, the mean of the two one-way
  delays; jitter and loss are not in the latency model) or link measurements from ``testbed profile --edge``
  (measured rates, half the measured round trip, and — when measured — the edge's per-request handling,
  ``DeviceProfile.edge_request_s``; a link profile has none, 0).

N devices cycle through the classes and the links: device ``i`` gets ``classes[i % len]`` and ``links[i % len]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import yaml

from testbed.errors import TestbedError
from testbed.lab.devices import DeviceClass, load_device_class
from testbed.net.link import DirectionSpec, LinkProfile, load_link_profile
from testbed.planning.model import MODES, DeviceProfile, PlanningError, PlanningProblem
from testbed.profiling.records import BlockProfile, LinkMeasurement, ProfileError, to_model_profile
from testbed.profiling.store import FORMAT, load_block_profile, load_link_measurement

__all__ = ["LinkLike", "ProfileLike", "build_problem", "device_speed", "link_bursts", "link_rates", "link_request_s",
           "resolve_link"]

ProfileLike = str | Path | BlockProfile
LinkLike = str | Path | LinkProfile | LinkMeasurement

MAX_DEVICES = 100_000


def _block_profile(p: ProfileLike, what: str) -> BlockProfile:
    if isinstance(p, BlockProfile):
        return p
    if isinstance(p, str | Path):
        return load_block_profile(p)
    raise ProfileError(f"{what}: expected a block profile or its path, got {type(p).__name__}")


def _device_class(c: str | DeviceClass) -> DeviceClass:
    if isinstance(c, DeviceClass):
        return c
    try:
        return load_device_class(str(c))
    except TestbedError as exc:
        raise ProfileError(str(exc)) from None


def _is_measured_link_file(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def resolve_link(link: LinkLike) -> LinkProfile | LinkMeasurement:
    """A link profile name (profiles/links/NAME.yaml), a path to a link profile or to a measured link, or
    either object as is."""
    if isinstance(link, LinkProfile | LinkMeasurement):
        return link
    if not isinstance(link, str | Path):
        raise ProfileError(f"a link is a profile name, a path or a profile, not {type(link).__name__}")
    path = Path(link)
    if path.suffix in (".yaml", ".yml") and path.is_file() and _is_measured_link_file(path):
        return load_link_measurement(path)
    try:
        return load_link_profile(str(link))
    except TestbedError as exc:
        raise ProfileError(str(exc)) from None


def _link_name(link: LinkProfile | LinkMeasurement) -> str:
    if isinstance(link, LinkProfile):
        return link.name
    return f"measured:{link.endpoint.split('://')[-1]}"


def link_rates(link: LinkProfile | LinkMeasurement, unlimited_rate_bps: float | None = None
               ) -> tuple[float, float, float]:
    """``(uplink_bps, downlink_bps, one-way delay_s)`` of a link as the latency model takes them.

    A link profile's unlimited direction takes ``unlimited_rate_bps`` (ProfileError if None); its delay is the
    mean of the two one-way delays (the model charges one delay per crossing, either way). A measured link
    takes its measured rates and half its median round trip.
    """
    if isinstance(link, LinkMeasurement):
        if link.downlink_bps is None:
            raise ProfileError(
                f"link measurement of {link.endpoint} has no downlink rate ({link.notes or 'not measured'}); "
                "measure it with the edge's weights (testbed profile --edge ... --weights ...) or use a link profile")
        return link.uplink_bps, link.downlink_bps, link.delay_s

    def rate(d: DirectionSpec, which: str) -> float:
        if d.rate_bps is not None:
            return float(d.rate_bps)
        if unlimited_rate_bps is None:
            raise ProfileError(f"link profile {link.name!r} has an unlimited {which}: the latency model needs a "
                               "rate (give unlimited_rate_bps, or a measured link)")
        return float(unlimited_rate_bps)

    spec = link.spec
    return (rate(spec.uplink, "uplink"), rate(spec.downlink, "downlink"),
            (spec.uplink.delay_us + spec.downlink.delay_us) / 2 * 1e-6)


def link_request_s(link: LinkProfile | LinkMeasurement) -> float:
    """The edge's fixed handling of one request over this link: measured (``edge_request_s``) or 0."""
    if isinstance(link, LinkMeasurement) and link.edge_request_s is not None:
        return link.edge_request_s
    return 0.0


def link_bursts(link: LinkProfile | LinkMeasurement) -> tuple[int, int]:
    """``(uplink, downlink)`` bytes a message passes of the link's token bucket at no cost: measured, or 0."""
    if isinstance(link, LinkMeasurement):
        return link.uplink_burst_bytes, link.downlink_burst_bytes
    return 0, 0


def device_speed(profile: BlockProfile, device_class: DeviceClass | None) -> float:
    """How fast a device of ``device_class`` runs the profile's device times (1.0 without a class)."""
    if device_class is None:
        return 1.0
    return device_class.speed_vs_pi4 / profile.speed_vs_pi4


def build_problem(
    device_profile: ProfileLike,
    links: Sequence[LinkLike],
    *,
    devices: int = 1,
    mode: str = "inference",
    device_classes: Sequence[str | DeviceClass] = (),
    edge_profile: ProfileLike | None = None,
    edge_class: str | DeviceClass | None = None,
    batch_size: int | None = None,
    batches_per_round: int = 1,
    min_head: int = 1,
    min_tail: int = 1,
    memory: bool = True,
    unlimited_rate_bps: float | None = None,
) -> PlanningProblem:
    """A planning problem for ``devices`` devices from measured profiles (see the module docstring).

    Args:
        device_profile: the device-side block profile (object or YAML path).
        links: link profile names/paths or measured links; device ``i`` uses ``links[i % len(links)]``.
        devices: the number of devices N.
        mode: ``inference`` or ``training`` (training needs backward times in both profiles).
        device_classes: device class names; device ``i`` is ``device_classes[i % len]``. Empty: every device is
            the machine that measured the profile (speed 1).
        edge_profile: the edge-side block profile; default: the device profile.
        edge_class: scale the edge profile's times to this class (``class.speed_vs_pi4 / profile.speed_vs_pi4``);
            default: the edge runs them as measured. Prefer measuring the edge: a GPU is not a CPU factor.
        batch_size: the batch size whose times and activation bytes are used (default: the only one measured).
        batches_per_round, min_head, min_tail: as in :class:`~testbed.planning.model.PlanningProblem`.
        memory: limit each device's head + tail parameters to its class's ``memory_mb``.
        unlimited_rate_bps: the rate given to an unlimited direction of a link profile.
    """
    if mode not in MODES:
        raise ProfileError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise ProfileError(f"devices must be an integer in 1..{MAX_DEVICES}, got {devices!r}")
    if isinstance(links, str | Path | LinkProfile | LinkMeasurement):
        links = [links]
    if not links:
        raise ProfileError("give at least one link (a link profile name such as 5g-sub6, or a measured link)")
    if unlimited_rate_bps is not None and not (isinstance(unlimited_rate_bps, int | float)
                                               and math.isfinite(unlimited_rate_bps) and unlimited_rate_bps > 0):
        raise ProfileError(f"unlimited_rate_bps must be a number > 0, got {unlimited_rate_bps!r}")
    dev_prof = _block_profile(device_profile, "device profile")
    edge_prof = dev_prof if edge_profile is None else _block_profile(edge_profile, "edge profile")
    if mode == "training":
        for what, p in (("device", dev_prof), ("edge", edge_prof)):
            if not p.training:
                raise ProfileError(f"training needs backward times, but the {what} profile of {p.model!r} "
                                   f"({p.runtime}, {p.host_name}) was measured for inference; measure it with "
                                   "--runtime torch --training")
    edge_scale = 1.0
    if edge_class is not None:
        edge_scale = _device_class(edge_class).speed_vs_pi4 / edge_prof.speed_vs_pi4
    model = to_model_profile(dev_prof, edge_prof, batch_size, edge_scale=edge_scale)
    classes: list[DeviceClass | None] = [_device_class(c) for c in device_classes] or [None]
    resolved = [resolve_link(link) for link in links]
    rates = [link_rates(link, unlimited_rate_bps) for link in resolved]
    width = len(str(devices - 1))
    profiles: list[DeviceProfile] = []
    for i in range(devices):
        cls = classes[i % len(classes)]
        k = i % len(resolved)
        up, down, delay = rates[k]
        mem = None
        if memory and cls is not None and cls.memory_mb > 0:
            mem = cls.memory_mb * 2**20
        name = f"{cls.name if cls else 'device'}-{_link_name(resolved[k])}-{i:0{width}d}"
        try:
            up_burst, down_burst = link_bursts(resolved[k])
            profiles.append(DeviceProfile(name=name, speed=device_speed(dev_prof, cls), uplink_bps=up,
                                          downlink_bps=down, delay_s=delay, memory_bytes=mem,
                                          edge_request_s=link_request_s(resolved[k]),
                                          uplink_burst_bytes=up_burst, downlink_burst_bytes=down_burst))
        except PlanningError as exc:
            raise ProfileError(str(exc)) from None
    try:
        return PlanningProblem(model=model, devices=tuple(profiles), min_head=min_head, min_tail=min_tail,
                               mode=mode,  # type: ignore[arg-type]
                               batches_per_round=batches_per_round)
    except PlanningError as exc:
        raise ProfileError(str(exc)) from None
