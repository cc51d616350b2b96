"""The search for the largest batch that is safe: predict, then try.

1. Probe batch 1. The memory with the model loaded and no batch is the base.
2. Grow. Before every probe, fit memory ~ intercept + per_sample * b to what was measured (and
   latency the same way). While the fit has not yet predicted a probe within 10%, sizes double;
   once it has, the next size is the largest one predicted to fit budget / (1 + margin): one jump
   instead of a dozen doublings. A size predicted over that is not run (outcome `predicted`).
3. Refine between the last good and the first bad size: try the size the fit predicts to be the
   limit (without the margin, now that we are close and have measured on both sides), else the
   middle, until the gap is within `tolerance` of the bad size.

Bad = OOM, over the memory budget, over the latency budget, or predicted over the memory budget.
The answer is always a size that ran and was measured within both budgets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .devices import MemoryMeter
from .probe import OOM, OVER_LATENCY, OVER_MEMORY, PREDICTED, ProbeResult, probe


class BatchOneDoesNotFit(RuntimeError):
    """Even a single sample exceeds the memory budget: no batch size can be served."""


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
        return int(math.floor((limit - self.intercept) / self.slope))


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


@dataclass
class SearchResult:
    max_safe_batch: int
    probes: list[ProbeResult]
    base_bytes: int
    stopped_by: str  # what bounds max_safe_batch: memory, latency, max_batch, oom
    memory_fit: AffineFit | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def oom_events(self) -> int:
        return sum(p.outcome == OOM for p in self.probes)

    @property
    def predicted_skips(self) -> int:
        return sum(p.outcome == PREDICTED for p in self.probes)


class Prober:
    """Runs probes, records every one (skips included), and keeps the fits up to date. Shared by
    the search and the knee refinement of the selection, so both see the same measurements."""

    def __init__(
        self,
        run_batch: Callable[[int], None],
        meter: MemoryMeter,
        *,
        memory_budget_bytes: int,
        latency_budget_s: float | None,
        base_bytes: int,
        warmup: int = 1,
        repeats: int = 3,
        on_probe: Callable[[ProbeResult], None] | None = None,
    ):
        self.run_batch = run_batch
        self.meter = meter
        self.memory_budget_bytes = memory_budget_bytes
        self.latency_budget_s = latency_budget_s
        self.base_bytes = base_bytes
        self.warmup = warmup
        self.repeats = repeats
        self.on_probe = on_probe or (lambda r: None)
        self.probes: list[ProbeResult] = []

    def by_size(self, batch_size: int) -> ProbeResult | None:
        for p in self.probes:
            if p.batch_size == batch_size:
                return p
        return None

    def memory_fit(self) -> AffineFit | None:
        points = [(p.batch_size, float(p.peak_bytes)) for p in self.probes if p.peak_bytes is not None]
        if len(points) == 1:  # only batch 1 so far: the line from the base through it
            points.append((0, float(self.base_bytes)))
        return fit_affine(points)

    def prediction_error_bytes(self) -> float:
        """The largest miss of the memory prediction over the probes run so far (past batch 1)."""
        misses = [abs(p.peak_bytes - p.predicted_bytes) for p in self.probes
                  if p.peak_bytes is not None and p.predicted_bytes is not None and p.batch_size > 1]
        return max(misses, default=0.0)

    def latency_fit(self) -> AffineFit | None:
        return fit_affine([(p.batch_size, p.latency_s) for p in self.probes if p.latency_s is not None])

    def skip(self, batch_size: int, predicted_bytes: float) -> ProbeResult:
        result = ProbeResult(batch_size, PREDICTED, predicted_bytes=int(predicted_bytes))
        self.probes.append(result)
        self.on_probe(result)
        return result

    def run(self, batch_size: int) -> ProbeResult:
        known = self.by_size(batch_size)
        if known is not None and known.ran:
            return known
        fit = self.memory_fit()
        result = probe(
            self.run_batch,
            batch_size,
            self.meter,
            memory_budget_bytes=self.memory_budget_bytes,
            latency_budget_s=self.latency_budget_s,
            warmup=self.warmup,
            repeats=self.repeats,
            predicted_bytes=int(fit.predict(batch_size)) if fit else None,
        )
        self.probes.append(result)
        self.on_probe(result)
        return result


def _fit_is_trusted(probes: list[ProbeResult], base_bytes: int, within: float = 0.10) -> bool:
    """The last measured probe landed within 10% of what the fit predicted for the part of its
    memory that the batch adds (peak - base). Measured against the whole peak instead, a GPU's
    batches 1 and 2 (a few MiB over a GiB of weights) would always look "predicted" while saying
    nothing about the slope, and the search would leap 500x on a guess (seen on an H200)."""
    for p in reversed(probes):
        if p.peak_bytes is not None:
            added = max(p.peak_bytes - base_bytes, 1)
            return p.predicted_bytes is not None and abs(p.peak_bytes - p.predicted_bytes) <= within * added
    return False


def find_max_safe_batch(
    prober: Prober,
    *,
    max_batch: int = 1024,
    margin: float = 0.10,
    tolerance: float = 0.02,
    max_jump: int = 64,
    model_name: str = "model",
) -> SearchResult:
    budget = prober.memory_budget_bytes
    guarded_budget = budget / (1 + margin)
    latency_budget = prober.latency_budget_s

    first = prober.run(1)
    if first.outcome in (OOM, OVER_MEMORY):
        needed = f"{first.peak_bytes / 2**20:.0f} MiB" if first.peak_bytes else "more than the device has (OOM)"
        raise BatchOneDoesNotFit(
            f"{model_name}: batch 1 does not fit the memory budget of {budget / 2**20:.0f} MiB "
            f"(it needed {needed}); raise --memory-budget-mb / --memory-fraction, use a smaller "
            f"dtype, or a larger device"
        )
    if first.outcome == OVER_LATENCY:
        return SearchResult(1, prober.probes, prober.base_bytes, "latency", prober.memory_fit(), [
            f"batch 1 already takes {first.latency_s * 1e3:.0f} ms, over the latency budget of "
            f"{latency_budget * 1e3:.0f} ms: serving unbatched (raise --latency-budget-ms to batch)"
        ])

    good, hard_bad = 1, None  # largest size measured good; smallest size that ran and failed
    bad_reason = "max_batch"

    def predicted_limit(memory_limit: float) -> int:
        """Largest size the fits say stays within memory_limit and the latency budget."""
        limit = max_batch
        mem = prober.memory_fit()
        if mem is not None:
            limit = min(limit, mem.max_batch_within(memory_limit))
        lat = prober.latency_fit()
        if lat is not None and latency_budget is not None:
            limit = min(limit, lat.max_batch_within(latency_budget))
        return limit

    def proportional_latency_limit() -> int:
        measured = prober.by_size(good)
        if latency_budget is None or measured is None or not measured.latency_s:
            return max_batch
        return max(good + 1, int(good * latency_budget / measured.latency_s))

    def run(size: int) -> None:
        nonlocal good, hard_bad, bad_reason
        result = prober.run(size)
        if result.ok:
            good = max(good, size)
        elif hard_bad is None or size < hard_bad:
            hard_bad = size
            bad_reason = {OOM: "oom", OVER_MEMORY: "memory", OVER_LATENCY: "latency"}[result.outcome]

    # Grow: double until the fit is trusted, then jump to the largest size predicted to fit
    # budget / (1 + margin). A size predicted over that is recorded as skipped, never run.
    while hard_bad is None and good < max_batch:
        # No fit yet (sizes so small that the allocator rounds them to the same peak) means no
        # prediction at all: keep doubling rather than leap to max_batch unguarded.
        trusted = prober.memory_fit() is not None and _fit_is_trusted(prober.probes, prober.base_bytes)
        # Even a trusted fit is not extrapolated more than max_jump x past what was measured, nor
        # past the size whose latency would reach the budget if latency grew in proportion to the
        # batch (it grows no faster than that: per-sample cost only falls with batching), so a
        # CPU, where latency is proportional, never leaps to a size that takes seconds a run.
        size = min(predicted_limit(guarded_budget), max_jump * good, proportional_latency_limit()) if trusted else 2 * good
        size = min(size, max_batch)
        fit = prober.memory_fit()
        if fit is not None and fit.predict(size) > guarded_budget:
            if prober.by_size(size) is None:
                prober.skip(size, fit.predict(size))
            size = min(size - 1, predicted_limit(guarded_budget))
        if size <= good:
            break
        run(size)

    # Refine between the last good and the first bad size, now against the budget itself: the
    # margin kept the jumps safe; here the measurements on both sides keep the steps small.
    last_guess_was_slow = False
    while good < max_batch:
        upper = hard_bad if hard_bad is not None else max_batch + 1
        fit = prober.memory_fit()
        if fit is not None:
            # A size is ruled out unrun only when predicted over the budget by more than the fit
            # has been wrong so far: step-shaped memory (CPU workspaces) is then measured, while an
            # affine model (no error) skips it and so never goes near an OOM.
            predicted_upper = fit.max_batch_within(budget + prober.prediction_error_bytes()) + 1
            if predicted_upper < upper:
                upper = max(predicted_upper, good + 1)
                if prober.by_size(upper) is None:
                    prober.skip(upper, fit.predict(upper))
                if hard_bad is None or upper < hard_bad:
                    bad_reason = "memory"
        if upper - good <= max(1, tolerance * upper):
            break
        guess = predicted_limit(budget)
        # A fit's guess may crawl towards a curved limit one step at a time; when the last guess did
        # not halve the bracket, bisect instead, so refinement never takes more than log2 steps.
        use_guess = good < guess < upper and prober.by_size(guess) is None and not last_guess_was_slow
        size = guess if use_guess else (good + upper) // 2
        gap = upper - good
        run(size)
        new_upper = hard_bad if hard_bad is not None else max_batch + 1
        last_guess_was_slow = use_guess and (min(new_upper, upper) - good) > gap / 2

    return SearchResult(good, prober.probes, prober.base_bytes, bad_reason, prober.memory_fit())
