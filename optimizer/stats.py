"""The one percentile helper, for latencies (`autobatch bench`) and batch arrivals (optimizer/wait.py)."""
from __future__ import annotations

import math
from typing import Iterable

LINEAR = "linear"  # interpolate between the closest ranks: numpy's default
OBSERVED = "observed"  # the sorted value at index floor(q/100 * n): always a value that occurred


def percentile(values: Iterable[float], q: float, method: str = LINEAR) -> float | None:
    """The q-th percentile (0 <= q <= 100) of `values`; None when there are none.

    LINEAR reads rank (n - 1) * q / 100 of the sorted values, interpolating, as numpy does by default:
    the right summary of a latency sample. OBSERVED returns the value at index floor(q / 100 * n)
    (the last one at q = 100): a controller that compares a batch's spread with its wait wants a
    batch that really happened, not a blend of two."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    xs = sorted(values)
    if not xs:
        return None
    if method == OBSERVED:
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]
    if method != LINEAR:
        raise ValueError(f"unknown percentile method {method!r}; use {LINEAR!r} or {OBSERVED!r}")
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)
