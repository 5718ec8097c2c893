"""Summaries of latency samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50 and p95 (linear interpolation) of samples in milliseconds; NaN-free, 0 for no samples."""
    if len(samples) == 0:
        return {"p50_ms": 0.0, "p95_ms": 0.0}
    arr = np.asarray(samples, dtype=np.float64)
    p50, p95 = np.percentile(arr, [50, 95])
    return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4)}
