"""Partition a training set across devices: IID or non-IID (Dirichlet over the class proportions).

Pure functions of their arguments: the same labels, device count, alpha and seed give the same
partition on every machine (NumPy's ``default_rng``, a PCG64 stream, is stable across platforms).
Every function returns one sorted ``int64`` index array per device; the arrays are disjoint and
together cover every sample exactly once.

Dirichlet: for each class, the class's samples (in a seeded random order) are cut among the devices
in proportions drawn from ``Dir(alpha, ..., alpha)`` (Hsu, Qi and Brown, 2019). A small ``alpha``
(0.1) gives each device a few dominant classes; a large one (100) approaches IID. Draws that leave a
device with fewer than ``min_samples`` samples are redrawn (from the same seeded stream, so the
result is still a pure function of the arguments).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from testbed.errors import TestbedError

__all__ = [
    "PARTITION_KINDS",
    "PartitioningError",
    "label_histogram",
    "partition",
    "partition_dirichlet",
    "partition_iid",
]

PARTITION_KINDS = ("iid", "dirichlet")
_MAX_TRIES = 1000


class PartitioningError(TestbedError):
    """The data cannot be partitioned as asked (bad arguments, or too few samples per device)."""


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise PartitioningError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def partition_iid(num_samples: int, num_devices: int, seed: int) -> list[np.ndarray]:
    """A seeded random split into ``num_devices`` parts whose sizes differ by at most one."""
    n = _check_int("num_samples", num_samples, 0)
    k = _check_int("num_devices", num_devices, 1)
    seed = _check_int("seed", seed, 0)
    if n < k:
        raise PartitioningError(f"cannot give each of {k} devices a sample: only {n} samples")
    order = np.random.default_rng([seed, 0x11D]).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, k)]


def partition_dirichlet(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Non-IID split: per class, device shares drawn from ``Dir(alpha)``; every device gets >= ``min_samples``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitioningError(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}")
    k = _check_int("num_devices", num_devices, 1)
    seed = _check_int("seed", seed, 0)
    min_samples = _check_int("min_samples", min_samples, 0)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise PartitioningError(f"alpha must be a positive finite number, got {alpha!r}")
    n = len(labels)
    if n < k * max(min_samples, 1):
        raise PartitioningError(
            f"{n} samples cannot give each of {k} devices at least {max(min_samples, 1)} samples"
        )
    rng = np.random.default_rng([seed, 0xD1C])
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for device, piece in enumerate(np.split(idx, cuts)):
                parts[device].append(piece)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in result) >= min_samples:
            return result
    raise PartitioningError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_TRIES} tries gave each of {k} devices at least "
        f"{min_samples} of the {n} samples; raise alpha, lower min_samples or use fewer devices"
    )


def partition(
    labels: np.ndarray,
    num_devices: int,
    kind: str,
    seed: int,
    alpha: float | None = None,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Dispatch on ``kind`` (``iid`` or ``dirichlet``; the latter needs ``alpha``)."""
    if kind == "iid":
        parts = partition_iid(len(labels), num_devices, seed)
        small = min(len(p) for p in parts)
        if small < min_samples:
            raise PartitioningError(
                f"an IID split of {len(labels)} samples over {num_devices} devices gives {small} per device, "
                f"fewer than min_samples={min_samples}"
            )
        return parts
    if kind == "dirichlet":
        if alpha is None:
            raise PartitioningError("the dirichlet partition needs alpha")
        return partition_dirichlet(labels, num_devices, alpha, seed, min_samples)
    raise PartitioningError(f"unknown partition {kind!r}; choose one of {', '.join(PARTITION_KINDS)}")


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples per (device, class): shape ``(len(parts), num_classes)``."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts])
