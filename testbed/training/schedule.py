"""The training schedule: which device runs which steps, on which samples, in which round (pure functions).

Everything here is a function of the experiment and the shard sizes, so a run is deterministic for a seed
and ``--resume`` replays the same schedule (property-tested in tests/training/test_experiment.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from testbed.training.errors import ExperimentError

__all__ = [
    "RoundPlan",
    "Segment",
    "SegmentPart",
    "batch_bounds",
    "batch_order",
    "device_steps",
    "max_batch",
    "plan_round",
    "steps_per_epoch",
]


@dataclass(frozen=True)
class SegmentPart:
    """Device ``device`` (an index) runs its epoch-local steps ``[first, end)``; step ``s`` has seq
    ``seq0 + s - first``."""

    device: int
    first: int
    end: int
    seq0: int


@dataclass(frozen=True)
class Segment:
    """Steps run without a pause; parts of a parallel segment run at the same time, in lockstep."""

    epoch: int
    parts: tuple[SegmentPart, ...]
    fedavg_after: bool = False

    @property
    def steps(self) -> int:
        return max((p.end - p.first for p in self.parts), default=0)


@dataclass(frozen=True)
class RoundPlan:
    round: int
    epoch: int
    segments: tuple[Segment, ...]
    epoch_progress: float  # epochs completed at the end of this round (e.g. 1.25)


def _batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def device_steps(mode: str, sizes: Sequence[int], batch_size: int) -> list[int]:
    """Steps each device takes per epoch. ``equal``: ``ceil(n_i / batch_size)`` (a device whose shard is
    exhausted sits out the epoch's last steps). ``by_shard``: every device exactly
    ``S = ceil(sum(n) / (batch_size x devices))`` steps -- the step count of a centralized epoch with the
    global batch -- its shard cut into ``S`` nearly equal batches (see :func:`batch_bounds`), so each
    step's union of batches is a stratified sample of the whole training set of about the global batch."""
    if mode == "equal":
        return [_batches(n, batch_size) for n in sizes]
    if mode != "by_shard":
        raise ExperimentError(f"unknown batch_sizes {mode!r}")
    steps = _batches(sum(sizes), batch_size * len(sizes))
    if min(sizes) < steps:
        raise ExperimentError(
            f"training.batch_sizes=by_shard: a shard of {min(sizes)} samples cannot fill the {steps} steps of "
            f"an epoch with a global batch of {batch_size * len(sizes)}; raise data.min_samples or the batch size"
        )
    return [steps] * len(sizes)


def batch_bounds(mode: str, n: int, batch_size: int, steps: int, s: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` in a device's epoch order (of its ``n`` samples, ``steps`` per epoch) of step ``s``."""
    if mode == "by_shard":
        return s * n // steps, (s + 1) * n // steps
    return s * batch_size, min(n, (s + 1) * batch_size)


def max_batch(mode: str, n: int, batch_size: int, steps: int) -> int:
    """The largest batch a device sends in an epoch (the edge refuses larger ones)."""
    return _batches(n, steps) if mode == "by_shard" else batch_size


def steps_per_epoch(scheme: str, sizes: list[int], batch_size: int, steps: Sequence[int] | None = None) -> int:
    """Synchronous steps in one epoch: parallel schemes take the longest shard, sl walks every shard in turn.

    ``steps``: each device's steps per epoch when not ``ceil(n_i / batch_size)`` (see :func:`device_steps`)."""
    per_device = list(steps) if steps is not None else [_batches(n, batch_size) for n in sizes]
    if scheme in ("psl", "sfl"):
        return max(per_device)
    if scheme == "sl":
        return sum(per_device)
    if scheme == "centralized":
        return _batches(sum(sizes), batch_size)
    raise ExperimentError(f"unknown scheme {scheme!r}")


def _round_range(r: int, steps: int, rounds_per_epoch: int) -> tuple[int, int, int]:
    epoch, j = divmod(r, rounds_per_epoch)
    return epoch, j * steps // rounds_per_epoch, (j + 1) * steps // rounds_per_epoch


def plan_round(
    scheme: str, sizes: list[int], batch_size: int, rounds_per_epoch: int, fedavg_every: int, r: int,
    steps: Sequence[int] | None = None,
) -> RoundPlan:
    """What runs in round ``r``: a pure function of the scheme, the shard sizes and the training spec.

    Every epoch has ``S = steps_per_epoch(...)`` steps, cut into ``rounds_per_epoch`` rounds of
    ``S / rounds_per_epoch`` steps, so round ``r`` covers the same share of an epoch in every scheme.
    psl/sfl: in epoch step ``s`` every device with a ``s``-th batch runs it, all at once; a psl
    segment ends every ``fedavg_every`` global steps with a FedAvg. sl: device 0 runs all its
    batches, then device 1, ... (a segment per device turn). centralized: one "device" holding all data.
    """
    if rounds_per_epoch < 1 or batch_size < 1 or not sizes or min(sizes) < 1:
        raise ExperimentError("plan_round needs rounds_per_epoch >= 1, batch_size >= 1 and non-empty shards")
    own = list(steps) if steps is not None else [_batches(n, batch_size) for n in sizes]
    if len(own) != len(sizes) or min(own) < 1:
        raise ExperimentError("plan_round needs one positive step count per shard")
    total = steps_per_epoch(scheme, sizes, batch_size, own)
    if total < rounds_per_epoch:
        raise ExperimentError(
            f"training.rounds_per_epoch={rounds_per_epoch} is more than the {total} steps in an epoch "
            f"(batch size {batch_size}, shards of {min(sizes)}..{max(sizes)} samples); lower it"
        )
    steps = total
    epoch, lo, hi = _round_range(r, steps, rounds_per_epoch)
    base = epoch * steps
    segments: list[Segment] = []
    if scheme in ("psl", "sfl"):
        cuts = [lo]
        if scheme == "psl" and fedavg_every > 0:
            first = -(-(base + lo + 1) // fedavg_every) * fedavg_every - base  # next multiple of K after lo
            cuts += list(range(first, hi, fedavg_every))
        cuts.append(hi)
        for s0, s1 in itertools.pairwise(cuts):
            if s1 <= s0:
                continue
            parts = tuple(
                SegmentPart(d, s0, min(s1, own[d]), base + s0)
                for d in range(len(sizes))
                if s0 < own[d]
            )
            fedavg = scheme == "psl" and fedavg_every > 0 and (base + s1) % fedavg_every == 0
            segments.append(Segment(epoch, parts, fedavg))
    elif scheme == "sl":
        offset = 0
        for d in range(len(sizes)):
            k = own[d]
            s0, s1 = max(lo - offset, 0), min(hi - offset, k)
            if s0 < s1:
                segments.append(Segment(epoch, (SegmentPart(d, s0, s1, base + offset + s0),)))
            offset += k
    else:  # centralized
        segments.append(Segment(epoch, (SegmentPart(0, lo, hi, base + lo),)))
    progress = epoch + hi / steps
    return RoundPlan(r, epoch, tuple(segments), round(progress, 6))


def batch_order(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    """The order in which a device (``stream`` = its index; centralized uses 0) visits its ``n`` samples in an epoch."""
    return np.random.default_rng([seed, stream, epoch]).permutation(n)
