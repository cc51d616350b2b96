"""Affine fits of memory (or latency) against the batch size, from measured probes: what the
search predicts with (optimizer/search.py) and what the jitter check measures against (jitter.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .probe import ProbeResult


@dataclass(frozen=True)
class AffineFit:
    """y ~ intercept + slope * b, from measurements; `None` slopes are never built."""

    intercept: float
    slope: float

    def predict(self, batch_size: int) -> float:
        return self.intercept + self.slope * batch_size

    def max_batch_within(self, limit: float) -> int:
        """Largest b with predict(b) <= limit (huge when the slope is flat)."""
        if self.slope <= 0:
            return 1 << 30 if self.intercept <= limit else 0
        return int(math.floor((limit - self.intercept) / self.slope + 1e-9))  # a size exactly at the limit fits


def fit_affine(points: list[tuple[int, float]]) -> AffineFit | None:
    """Least squares over the upper part of the measured range (b >= largest/4), where memory and
    latency are closest to linear; small batches carry fixed workspaces that would bend the line."""
    points = sorted(set(points))
    if len(points) < 2:
        return None
    # Take sizes from the top down until they span at least half the top size: a short lever arm
    # (two probes at 631 and 645, say) turns a few percent of noise into a wild slope.
    top = points[-1][0]
    upper = [p for p in points if p[0] >= top / 4]
    while len(upper) < len(points) and (len(upper) < 2 or top - upper[0][0] < top / 2):
        upper = points[len(points) - len(upper) - 1:]
    n = len(upper)
    mean_b = sum(b for b, _ in upper) / n
    mean_y = sum(y for _, y in upper) / n
    var_b = sum((b - mean_b) ** 2 for b, _ in upper)
    if var_b == 0:
        return None
    slope = sum((b - mean_b) * (y - mean_y) for b, y in upper) / var_b
    if slope <= 0:  # noise between nearby sizes, not a real trend: predict nothing rather than nonsense
        return None
    return AffineFit(intercept=mean_y - slope * mean_b, slope=slope)


def memory_fit_of(probes: list[ProbeResult], base_bytes: int) -> AffineFit | None:
    """The memory fit through these probes (`Prober.memory_fit`)."""
    points = [(p.batch_size, float(p.peak_bytes)) for p in probes if p.peak_bytes is not None]
    if len(points) == 1:  # only batch 1 so far: the line from the base through it
        points.append((0, float(base_bytes)))
    return fit_affine(points)
