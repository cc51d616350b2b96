"""Which batch to serve, given the probes: policy only, no measuring.

The largest safe batch is rarely the one to serve. Past the throughput knee a bigger batch adds
latency and gains nothing (on a CPU it often loses throughput past b~4-8), so we serve the
smallest measured size whose throughput is within `knee_fraction` (95%) of the best measured, among
sizes whose latency fits the budget and that are no larger than the max safe batch.

The knee is only as sharp as the sizes measured around it; `next_knee_probe` names one more size
to measure (where the throughput curve through the bracket's ends crosses the knee), at most
`MAX_KNEE_PROBES` times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .probe import ProbeResult

MAX_KNEE_PROBES = 2  # probes after the search, to sharpen the knee


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

    The bracket is (largest measured size below the knee, selected size]. A batch that takes
    a + c*b seconds serves b / (a + c*b) samples/s, so 1/throughput = a/b + c: a line in 1/b. The
    line through the bracket's two ends says where throughput reaches `knee_fraction` of the best;
    we measure there (rounded up, to land on the side that qualifies). Exact for affine latency,
    one or two probes land on the knee where bisecting the bracket took four; the bracket's
    geometric middle only when the line cannot tell. None once selected / below <= `resolution`,
    or when the line puts the knee at the selected size itself.
    """
    chosen = select_serve_batch(probes, max_safe_batch, latency_budget_s, knee_fraction)
    candidates = _candidates(probes, max_safe_batch, latency_budget_s)
    measured = {p.batch_size for p in probes if p.ran}
    below = [p for p in candidates if p.batch_size < chosen.batch_size]
    if not below:
        return None
    lower = max(below, key=lambda p: p.batch_size)
    upper = next(p for p in candidates if p.batch_size == chosen.batch_size)
    if upper.batch_size / lower.batch_size <= resolution or upper.batch_size - lower.batch_size <= 1:
        return None
    middle = int(round(math.sqrt(lower.batch_size * upper.batch_size)))
    wanted = knee_fraction * chosen.best_throughput
    # lower's throughput < wanted <= upper's, so the line's crossing lies inside the bracket
    slope = (1 / lower.throughput - 1 / upper.throughput) / (1 / lower.batch_size - 1 / upper.batch_size)
    intercept = 1 / upper.throughput - slope / upper.batch_size
    if slope > 0 and 1 / wanted > intercept:
        middle = math.ceil(slope / (1 / wanted - intercept) - 1e-9)
        if middle >= upper.batch_size:
            return None
    middle = min(max(middle, lower.batch_size + 1), upper.batch_size - 1)
    return None if middle in measured else middle
