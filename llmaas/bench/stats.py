"""Percentiles and the per-level summary of a load run (floats: these are measurements, not money)."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    None for no values. percentile([1, 2, 3, 4], 50) == 2.5; percentile([x], q) == x.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 and count of `values` (None where there are none)."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["count"] = len(values)
    return out
