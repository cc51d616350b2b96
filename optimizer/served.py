"""The batch to serve when served batches run slower than the tuning measured.

The tuning chose its batch from probes that ran on a quiet device; a served batch also pays the
replica's host work and its neighbours on the card. When served batches take `ratio` times the
tuning's time for their size (optimizer/wait.py's ServedLatency: the median over recent batches),
the tuned batch may no longer fit the latency budget. The same selection rule the tuning used
(optimizer/select.py) then runs again over the tuning's own probes with their times scaled by the
ratio: the batch it picks is what the tuning would have picked on a device this slow.

Only ever lower than the tuning's batch: a larger size's memory and time were not what the tuning
chose, and a re-tune (user_config `retune`) measures them. Back at the tuning's batch once the
ratio falls again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .probe import ProbeResult
from .select import select_serve_batch

# Served batches at most this much slower than tuned keep the tuning's batch: the probes' own
# spread between runs, not a slower device.
SLOWER_THAN = 1.1
RETURN_FRACTION = 0.9


@dataclass(frozen=True)
class ServedBatch:
    """A batch re-decided from served times: the size, the tuning's, the ratio it came from, why."""

    size: int
    tuned_size: int
    ratio: float
    reason: str


def scaled(probes, ratio: float) -> list[ProbeResult]:
    """The probes as they would have measured on a device `ratio` times slower."""
    out = []
    for p in probes:
        if not (p.ok and p.latency_s):
            continue
        out.append(replace(p, latency_s=p.latency_s * ratio,
                           period_s=p.period_s * ratio if p.period_s else None,
                           throughput=p.throughput / ratio if p.throughput else p.throughput))
    return out


def served_batch(tuning, ratio: float | None, knee_fraction: float = 0.95, slower_than: float = SLOWER_THAN,
                 lowered: bool = False) -> ServedBatch | None:
    """The batch to serve at `ratio` (served seconds / tuned seconds), or None where the tuning's
    batch still holds (no ratio yet, a ratio under `slower_than`, or a budget it still meets as
    served). `lowered`: the batch is lowered now; it goes back to the tuning's only once that fits
    within `RETURN_FRACTION` of the budget, so that a ratio near the edge does not flip it each check."""
    if ratio is None or (ratio < slower_than and not lowered) or tuning.latency_budget_s is None:
        return None
    tuned = tuning.batch_size
    at_ratio = scaled(tuning.probes, ratio)
    tuned_s = next((p.latency_s for p in at_ratio if p.batch_size == tuned), tuning.serve_latency_s * ratio)
    budget_s = tuning.latency_budget_s * (RETURN_FRACTION if lowered else 1.0)
    if tuned_s <= budget_s:
        return None
    chosen = select_serve_batch(at_ratio, min(tuning.max_safe_batch, tuned), budget_s, knee_fraction)
    if chosen.batch_size >= tuned:
        return None
    return ServedBatch(chosen.batch_size, tuned, ratio,
                       f"served batches take {ratio:.2f}x the tuning's time for their size, so batch {tuned} would "
                       f"take {tuned_s * 1e3:.0f} ms, over the {tuning.latency_budget_s * 1e3:.0f} ms budget; the "
                       f"tuning's rule on its probes at that speed: {chosen.reason} (tuned batch {tuned}, now "
                       f"{chosen.batch_size})")


__all__ = ["ServedBatch", "served_batch", "scaled", "SLOWER_THAN"]
