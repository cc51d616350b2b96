"""Memory that is not monotone in the batch size: how much the probes show it jitter, and the max
safe batch that leaves that jitter under the budget (the search's last step, optimizer/search.py;
the cache's trust check, optimizer/trust.py)."""
from __future__ import annotations

from typing import Protocol

from .fit import memory_fit_of
from .probe import ProbeResult


class Prober(Protocol):
    """What jitter reads of the search's Prober (optimizer/search.py), which imports this module:
    named here so the two do not import each other."""

    probes: list[ProbeResult]
    base_bytes: int
    memory_budget_bytes: int

    def run(self, batch_size: int) -> ProbeResult: ...


def jitter_bytes(prober: "Prober | list[ProbeResult]", tolerance: float = 0.03, base_bytes: int | None = None
                 ) -> tuple[float, float]:
    """(J, the fit's slope): how far a measured size's peak lies off the line through the measured
    sizes nearest it, where one lies within `tolerance` of it (or one size away), and the bytes one
    sample adds by the fit.

    Over so short a step a smooth curve, however it bends, stays within a small part of a sample's
    memory of the line through its neighbours; what lies further off is jitter, or a step. Only
    deviations within 10% of what the batch added count: a workspace that steps up by more bounds
    the search by itself. A GPU's workspace differs size by size, so neighbouring sizes can lie
    several samples' memory off that line (ViT-B/16 near a 1 GiB budget: docs/benchmarks.md §4
    and §16); that is what J measures. `prober` may instead be
    a stored tuning's probes, with its `base_bytes` (optimizer/trust.py checks a cached one so)."""
    probes = prober if isinstance(prober, list) else prober.probes
    base = base_bytes if isinstance(prober, list) else prober.base_bytes
    fit = memory_fit_of(probes, base)
    if fit is None:
        return 0.0, 0.0
    measured = sorted({p.batch_size: p.peak_bytes for p in probes if p.peak_bytes is not None}.items())
    deviations = []
    for i, (b, m) in enumerate(measured):
        others = measured[:i] + measured[i + 1:]
        if not others or min(abs(b - o) for o, _ in others) > max(1, tolerance * b):
            continue
        below, above = measured[:i][-1:], measured[i + 1:][:1]
        pair = below + above if below and above else (measured[:i][-2:] if below else measured[i + 1:][:2])
        if len(pair) < 2:
            continue
        (b0, m0), (b1, m1) = pair
        # Only a peak over the line counts: that is a smaller size taking more than its neighbours
        # vouch for. One under it is what memory that bends upwards (a convex curve) shows across a
        # wide pair, and it cannot put a size under a measured good one over the budget.
        deviation = m - (m0 + (m1 - m0) * (b - b0) / (b1 - b0))
        if 0 < deviation <= 0.10 * max(m - base, 1):
            deviations.append(deviation)
    return (max(deviations) if deviations else 0.0), fit.slope


def jitter_bound(probes: list[ProbeResult], base_bytes: int, budget_bytes: int, tolerance: float = 0.03) -> int | None:
    """The largest size b with fit(b) + J <= budget where the probes show memory out of order size by
    size (2J > what a sample adds: `jitter_bytes`); None where they show it in order."""
    jitter, slope = jitter_bytes(probes, tolerance, base_bytes)
    if slope <= 0 or 2 * jitter <= slope:
        return None
    return memory_fit_of(probes, base_bytes).max_batch_within(budget_bytes - jitter)


def clear_of_jitter(prober: "Prober", good: int, tolerance: float, attempts: int = 3) -> int:
    """The max safe batch once memory that is not monotone in the batch size is allowed for.

    The batcher forms every size up to the max, so the max is safe only if every smaller size fits,
    and the search measured few of them. Let J be the jitter the probes show (`jitter_bytes`) and
    f the memory fit. Where 2J <= what one sample adds, memory is in order size by size as far as
    the probes show (f(b) + J <= f(b + 1) - J), and the measured good size vouches for those below
    it. Where 2J is more, a smaller size may take more than a larger one: the answer is then at most
    the largest b with f(b) + J <= budget, so every size under it fits wherever the curve keeps
    within J of the line, as it did where measured; and it is measured before it is believed (a
    measured good size within `tolerance` below b, or a probe at b, after which J is computed
    again). The answer is never over a size that succeeded, nor at or over one that failed."""
    budget = prober.memory_budget_bytes
    for attempt in range(attempts):
        bound = jitter_bound(prober.probes, prober.base_bytes, budget, tolerance)
        failed = [p.batch_size for p in prober.probes if p.ran and not p.ok]
        limit = min([good] + ([min(failed) - 1] if failed else []) + ([bound] if bound is not None else []))
        best = max((p.batch_size for p in prober.probes if p.ok and p.batch_size <= limit), default=1)
        if limit < 1 or best >= (1 - tolerance) * limit or attempt == attempts - 1:
            return best
        prober.run(limit)
    return good
