from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.training.partitioning import (
    PartitioningError,
    label_histogram,
    partition,
    partition_dirichlet,
    partition_iid,
)


def balanced_labels(n: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % classes).astype(np.int64)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicates"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_iid_is_an_exact_cover_with_balanced_sizes(n: int, k: int, seed: int) -> None:
    if n < k:
        with pytest.raises(PartitioningError, match="only"):
            partition_iid(n, k, seed)
        return
    parts = partition_iid(n, k, seed)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [a.tolist() for a in partition_iid(n, k, seed)] == [a.tolist() for a in parts]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 400),
    k=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32),
    classes=st.integers(1, 10),
)
def test_dirichlet_is_a_deterministic_exact_cover(n: int, k: int, alpha: float, seed: int, classes: int) -> None:
    labels = balanced_labels(n, classes, seed % 7)
    try:
        parts = partition_dirichlet(labels, k, alpha, seed, min_samples=1)
    except PartitioningError as exc:
        assert "tries" in str(exc)  # only an unlucky tiny alpha with many devices may fail, and says so
        return
    assert len(parts) == k
    assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 1
    again = partition_dirichlet(labels.copy(), k, alpha, seed, min_samples=1)
    assert [a.tolist() for a in again] == [a.tolist() for a in parts]


def test_seed_changes_the_partition() -> None:
    labels = balanced_labels(1000)
    assert partition_iid(1000, 4, 0)[0].tolist() != partition_iid(1000, 4, 1)[0].tolist()
    a = partition_dirichlet(labels, 4, 0.5, 0)
    b = partition_dirichlet(labels, 4, 0.5, 1)
    assert [p.tolist() for p in a] != [p.tolist() for p in b]


def test_known_values_are_stable_across_versions() -> None:
    # Pinned so that a change of the algorithm (which would silently change every experiment) fails here.
    assert [p.tolist() for p in partition_iid(10, 3, 0)] == [[3, 4, 6, 9], [0, 2, 5], [1, 7, 8]]
    assert [len(p) for p in partition_dirichlet(balanced_labels(1000), 4, 0.5, 0)] == [226, 197, 350, 227]


def class_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over devices of the largest class's share of the device's data."""
    hist = label_histogram(labels, parts, 10)
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


def test_small_alpha_is_skewed_and_large_alpha_is_nearly_iid() -> None:
    labels = balanced_labels(6000)
    skewed = class_skew(labels, partition_dirichlet(labels, 4, 0.1, 3))
    near_iid = class_skew(labels, partition_dirichlet(labels, 4, 1000.0, 3))
    iid = class_skew(labels, partition_iid(6000, 4, 3))
    assert skewed > 0.3
    assert near_iid < 0.13 and iid < 0.13  # a perfectly balanced device has 0.10
    hist = label_histogram(labels, partition_iid(6000, 4, 3), 10)
    assert hist.sum() == 6000 and hist.shape == (4, 10)


def test_min_samples_is_respected_or_explained() -> None:
    labels = balanced_labels(200)
    parts = partition_dirichlet(labels, 5, 0.3, 0, min_samples=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(PartitioningError, match="raise alpha"):
        partition_dirichlet(labels, 5, 0.01, 0, min_samples=39)
    with pytest.raises(PartitioningError, match="cannot give each of 5 devices at least 41"):
        partition_dirichlet(labels, 5, 0.5, 0, min_samples=41)
    with pytest.raises(PartitioningError, match="fewer than min_samples=60"):
        partition(labels, 4, "iid", 0, min_samples=60)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition_iid(10, 0, 0), "num_devices must be an integer >= 1"),
        (lambda: partition_iid(10, 2, -1), "seed must be an integer >= 0"),
        (lambda: partition_iid(10, True, 0), "num_devices"),
        (lambda: partition_dirichlet(np.zeros(10, np.int64), 2, 0.0, 0), "alpha must be a positive"),
        (lambda: partition_dirichlet(np.zeros(10, np.int64), 2, float("nan"), 0), "alpha must be a positive"),
        (lambda: partition_dirichlet(np.zeros(10, np.float32), 2, 1.0, 0), "1-D integer array"),
        (lambda: partition(np.zeros(10, np.int64), 2, "zipf", 0), "unknown partition 'zipf'"),
        (lambda: partition(np.zeros(10, np.int64), 2, "dirichlet", 0), "needs alpha"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(PartitioningError, match=message):
        call()
