"""Which batch to serve, given the probes: policy only, no measuring.

The largest safe batch is rarely the one to serve. Past the throughput knee a bigger batch adds
latency and gains nothing (on a CPU it often loses throughput past b~4-8), so we serve the
smallest measured size whose throughput is within `knee_fraction` (95%) of the best measured, among
sizes whose latency fits the budget and that are no larger than the max safe batch.

The knee is only as sharp as the sizes measured around it; `next_knee_probe` names one more size
to measure (in the geometric middle of the bracket around the knee) until the bracket is narrow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .probe import ProbeResult
from .wait import batch_wait_timeout_s  # noqa: F401 - the wait's rule lives in wait.py; re-exported for tune.py until it imports from there


@dataclass(frozen=True)
class Selection:
    batch_size: int
    throughput: float
    latency_s: float
    best_throughput: float
    best_batch: int
    reason: str


def _candidates(probes: list[ProbeResult], max_safe_batch: int, latency_budget_s: float | None):
    return sorted(
        (p for p in probes
         if p.ok and p.batch_size <= max_safe_batch
         and (latency_budget_s is None or p.latency_s <= latency_budget_s)),
        key=lambda p: p.batch_size,
    )


def select_serve_batch(
    probes: list[ProbeResult],
    max_safe_batch: int,
    latency_budget_s: float | None,
    knee_fraction: float = 0.95,
) -> Selection:
    candidates = _candidates(probes, max_safe_batch, latency_budget_s)
    if not candidates:
        return Selection(1, 0.0, 0.0, 0.0, 1, "no probe fit the budgets; serving unbatched")
    best = max(candidates, key=lambda p: p.throughput)
    for p in candidates:
        if p.throughput >= knee_fraction * best.throughput:
            if p.batch_size == best.batch_size:
                reason = f"batch {p.batch_size} has the best measured throughput ({p.throughput:.1f}/s)"
            else:
                reason = (
                    f"batch {p.batch_size} is the smallest within {knee_fraction:.0%} of the best "
                    f"throughput ({p.throughput:.1f}/s vs {best.throughput:.1f}/s at batch "
                    f"{best.batch_size}); larger batches add latency for little gain"
                )
            return Selection(p.batch_size, p.throughput, p.latency_s, best.throughput, best.batch_size, reason)
    raise AssertionError("the best candidate is always within the knee fraction of itself")


def next_knee_probe(
    probes: list[ProbeResult],
    max_safe_batch: int,
    latency_budget_s: float | None,
    knee_fraction: float = 0.95,
    resolution: float = 1.3,
) -> int | None:
    """The size to measure next to sharpen the knee, or None when the bracket is narrow enough.

    The bracket is (largest measured size below the knee, selected size]; we measure its
    geometric middle until selected / below <= `resolution`.
    """
    chosen = select_serve_batch(probes, max_safe_batch, latency_budget_s, knee_fraction)
    measured = {p.batch_size for p in probes if p.ran}
    below = [p.batch_size for p in _candidates(probes, max_safe_batch, latency_budget_s)
             if p.batch_size < chosen.batch_size]
    if not below:
        return None
    lower = max(below)
    if chosen.batch_size / lower <= resolution or chosen.batch_size - lower <= 1:
        return None
    middle = int(round(math.sqrt(lower * chosen.batch_size)))
    middle = min(max(middle, lower + 1), chosen.batch_size - 1)
    return None if middle in measured else middle
