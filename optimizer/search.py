"""The search for the largest batch that is safe: predict, verify, stop.

1. Probe batch 1. The memory with the model loaded and no batch is the base.
2. Grow while the memory fit is unverified: at most 8x the last good size, and no further than
   memory growing in proportion to the batch would allow (a fixed workspace plus a per-sample cost
   never grows faster): batches 1, 8, 64 on a GPU, where doubling took 1, 2, 4, 8.
3. Once a probe lands within 10% of the fit's prediction, jump to the largest size the fit says
   stays within the budget less its last miss and less `margin` x the memory it extrapolates
   (at most `max_jump` x the last good size).
4. Stop once the last good size is within `tolerance` (3%) of the largest size that may fit (the
   fit plus its last miss, after two predictions in a row held; or the first measured failure).
   A verified jump usually ends it, in fewer probes than refining a bracket to 2% takes
   (docs/benchmarks.md §4). Brackets of measurements shrink by a quarter at least.

Bad = OOM, over the memory budget, over the latency budget. The answer is always a size that ran
and was measured within both budgets. `find_max_safe_batch` says why >= 95% follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .devices import MemoryMeter
from .fit import AffineFit, fit_affine, memory_fit_of  # noqa: F401 - fit_affine: tests and benchmarks import it from here
from .jitter import clear_of_jitter, jitter_bytes  # noqa: F401 - jitter_bytes: the property tests
from .probe import OOM, OVER_LATENCY, OVER_MEMORY, PREDICTED, ProbeResult, probe


class BatchOneDoesNotFit(RuntimeError):
    """Even a single sample exceeds the memory budget: no batch size can be served."""


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
        self.predicted_latency_s: dict[int, float] = {}  # what the latency fit said before each probe

    def by_size(self, batch_size: int) -> ProbeResult | None:
        for p in self.probes:
            if p.batch_size == batch_size:
                return p
        return None

    def memory_fit(self) -> AffineFit | None:
        return memory_fit_of(self.probes, self.base_bytes)

    def verified_errors(self, within: float = 0.10) -> tuple[float | None, float | None]:
        """How far off the latest memory and latency predictions were (bytes, seconds), when they
        landed within `within` of what the batch added (peak - base) or took. None when the latest
        prediction missed by more, or none was made yet: that fit is not verified. Only the latest:
        an earlier miss came from a longer extrapolation (64 to 512, say) and would keep the steps
        near the limit needlessly short.

        Measured against the whole peak instead, a GPU's batches 1 and 2 (a few MiB over a GiB of
        weights) would always look "predicted" while saying nothing about the slope, and the search
        would leap hundreds of times the last size on a guess (docs/benchmarks.md §16)."""
        def misses(pairs, needed: int = 1) -> float | None:
            found = []
            for measured, predicted, added in pairs:
                if predicted is None or abs(measured - predicted) > within * max(added, 1e-12):
                    return None
                found.append(abs(measured - predicted))
                if len(found) == needed:
                    return found[0]
            return None

        ran = [p for p in reversed(self.probes) if p.peak_bytes is not None]
        memory = misses((p.peak_bytes, p.predicted_bytes, p.peak_bytes - self.base_bytes) for p in ran)
        latency = misses((p.latency_s, self.predicted_latency_s.get(p.batch_size), p.latency_s) for p in ran)
        return memory, latency

    def predictions_held(self, within: float = 0.10, latency: bool = False) -> int:
        """How many of the latest measured probes in a row the memory (or latency) fit predicted
        within `within` of what they added (took): one can be luck (a workspace that stepped up
        between batches 1 and 8 can make the line through them look right; batches that fit in one
        wave of a GPU take the same time, so a flat line predicts 4 -> 5 and says nothing about
        5 -> 200), two in a row are evidence."""
        held = 0
        for p in reversed(self.probes):
            if p.peak_bytes is None:
                continue
            measured, predicted, added = ((p.latency_s, self.predicted_latency_s.get(p.batch_size), p.latency_s)
                                          if latency else (p.peak_bytes, p.predicted_bytes, p.peak_bytes - self.base_bytes))
            if predicted is None or abs(measured - predicted) > within * max(added, 1e-12):
                break
            held += 1
        return held

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
        latency_fit = self.latency_fit()
        if latency_fit is not None:
            self.predicted_latency_s[batch_size] = latency_fit.predict(batch_size)
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


GROWTH_UNVERIFIED = 8  # the most a size grows over the last good one while the memory fit is unverified


def find_max_safe_batch(
    prober: Prober,
    *,
    max_batch: int = 1024,
    margin: float = 0.10,
    tolerance: float = 0.03,
    max_jump: int = 64,
    model_name: str = "model",
) -> SearchResult:
    """The largest size that ran within both budgets, within `tolerance` of the largest that may fit.

    Stop rule, and why it keeps >= 95% of the largest size that fits without a size over it: let
    f be the memory fit and E the largest miss of its predictions since it was verified (each within
    10% of what its batch added). Assume near the limit the fit is no further off than it has
    been, |m(b) - f(b)| <= E. Then no size past U = max{b : f(b) <= budget + E} fits, and the search
    stops once the last good size g >= (1 - tolerance) U: g ran within the budget, and the largest
    size that fits, b*, is <= U, so g >= 0.97 b*. The target it jumps to, the largest b with
    f(b) + E + margin (f(b) - m(g)) <= budget, fits under the same assumption with room to spare
    (the margin scales with how far it extrapolates past the last measurement), and it lies within
    (2E + margin (f(b) - m(g))) / slope of U: when E is small next to the memory of the batch,
    one verified jump ends the search. When it is not (noise, a curve that bends), the next target
    is computed again from the larger E, and a size over the budget is a bound like any other.
    Latency is bounded the same way with its own fit and misses.

    Where the assumption fails (memory that steps up past the last measurement) the answer is still
    a size that ran within the budget: only the 95% then rests on the bracket of measured sizes.
    Ultralytics AutoBatch fits a line to batches 1-16 and takes its solution unverified: 5-7 probes,
    but a curve that bends or steps past 16 gives an answer over the budget (or far under it).
    """
    budget = prober.memory_budget_bytes
    latency_budget = prober.latency_budget_s
    base = prober.base_bytes

    first = prober.run(1)
    if first.outcome in (OOM, OVER_MEMORY):
        needed = f"{first.peak_bytes / 2**20:.0f} MiB" if first.peak_bytes else "more than the device has (OOM)"
        raise BatchOneDoesNotFit(
            f"{model_name}: batch 1 does not fit the memory budget of {budget / 2**20:.0f} MiB "
            f"(it needed {needed}); raise --memory-budget-mb / --memory-fraction, use a smaller "
            f"dtype, or a larger device"
        )
    if first.outcome == OVER_LATENCY:
        return SearchResult(1, prober.probes, base, "latency", prober.memory_fit(), [
            f"batch 1 already takes {first.latency_s * 1e3:.0f} ms, over the latency budget of "
            f"{latency_budget * 1e3:.0f} ms: serving unbatched (raise --latency-budget-ms to batch)"
        ])

    good, hard_bad = 1, None  # largest size measured good; smallest size that ran and failed
    bad_reason = "max_batch"

    def run(size: int) -> None:
        nonlocal good, hard_bad, bad_reason
        result = prober.run(size)
        if result.ok:
            good = max(good, size)
        elif hard_bad is None or size < hard_bad:
            hard_bad = size
            bad_reason = {OOM: "oom", OVER_MEMORY: "memory", OVER_LATENCY: "latency"}[result.outcome]

    def guarded(anchor_bytes: float, error_bytes: float) -> float:
        """The memory a target may be predicted to take: budget - error - margin x what it adds
        over the last good measurement, solved for the prediction."""
        return (budget - error_bytes + margin * anchor_bytes) / (1 + margin)

    def within_latency(latency_error_s: float | None) -> int:
        """Sizes past this would exceed the latency budget: by the latency fit, once its last
        prediction held (less its miss); before that, if latency grew in proportion to the batch
        (it grows no faster: per-sample cost only falls with batching), so a CPU, where latency is
        proportional, never leaps to a size that takes seconds a run."""
        measured = prober.by_size(good)
        if latency_budget is None or not measured.latency_s:
            return max_batch
        lat = prober.latency_fit()
        proportional = max(good + 1, int(good * latency_budget / measured.latency_s))
        if lat is not None and latency_error_s is not None:
            # a flat line (batches within one wave of the GPU) is not extrapolated past 8x
            return max(good + 1, min(lat.max_batch_within(latency_budget - latency_error_s),
                                     max(proportional, GROWTH_UNVERIFIED * good)))
        return proportional

    def local_limit(value: Callable[[ProbeResult], float], bound: float) -> int:
        """Where the line through the last two good sizes reaches `bound`. A fit through sizes on
        both sides of a bend (memory or latency that curves or steps up) cuts above the curve
        between them and would stop the search short; this line does not, there."""
        goods = sorted((p.batch_size, value(p)) for p in prober.probes if p.ok)[-2:]
        if len(goods) < 2:
            return max_batch  # batch 1 alone: the measured failure above is the only bound
        (b0, y0), (b1, y1) = goods
        if y1 <= y0:
            return max_batch
        return AffineFit(y1 - (y1 - y0) / (b1 - b0) * b1, (y1 - y0) / (b1 - b0)).max_batch_within(bound)

    while good < max_batch:
        fit = prober.memory_fit()
        memory_error, latency_error = prober.verified_errors()
        if fit is None:
            memory_error = None
        limit, reason = (max_batch, "max_batch") if hard_bad is None else (hard_bad - 1, bad_reason)
        bracketed = hard_bad is not None  # (good, limit] bounded by a measurement or a fit's word
        if memory_error is not None:
            predicted = fit.max_batch_within(budget + memory_error)
            if hard_bad is not None:
                predicted = max(predicted, local_limit(lambda p: p.peak_bytes, budget + memory_error))
            # Stopping short of a measured failure on the fit's word alone takes two predictions
            # in a row that held; jumping on it takes one.
            if predicted < limit and (hard_bad is not None or prober.predictions_held() >= 2):
                limit, reason, bracketed = max(good, predicted), "memory", True
        lat = prober.latency_fit()
        if latency_budget is not None and lat is not None and latency_error is not None \
                and (hard_bad is not None or prober.predictions_held(latency=True) >= 2):
            predicted = lat.max_batch_within(latency_budget + latency_error)
            if hard_bad is not None:
                predicted = max(predicted, local_limit(lambda p: p.latency_s, latency_budget + latency_error))
            if predicted < limit:
                limit, reason, bracketed = max(good, predicted), "latency", True
        if good >= (1 - tolerance) * limit or limit - good <= 1 and prober.by_size(limit) is not None:
            bad_reason = reason
            break
        anchor = prober.by_size(good).peak_bytes
        if memory_error is not None:  # verified: jump as far as the fit and its error allow
            target = fit.max_batch_within(guarded(anchor, memory_error))
            if target <= good:
                target = fit.max_batch_within(budget - memory_error)
            target = min(target, max_jump * good)
        else:
            # Unverified: memory that grows no faster than in proportion to the batch (a fixed
            # workspace plus a per-sample cost) stays under base + b x (anchor - base) / good.
            per_sample = (anchor - base) / good
            targets = [GROWTH_UNVERIFIED * good]
            for slope, intercept in ([(per_sample, base)] if per_sample > 0 else []) + (
                    [(fit.slope, fit.intercept)] if fit is not None else []):
                line = AffineFit(intercept, slope)
                step = line.max_batch_within(guarded(anchor, 0.0))
                targets.append(step if step > good else line.max_batch_within(budget))
            target = min(targets)
            goods = sorted((p.batch_size, p.peak_bytes) for p in prober.probes if p.ok)[-2:]
            if target <= good and len(goods) == 2 and goods[1][1] > goods[0][1]:
                # The fit may still lean on sizes before a bend (a workspace that stepped up at
                # batch 2): the slope between the last two good sizes says how memory grows here.
                (b0, m0), (b1, m1) = goods
                line = AffineFit(m1 - (m1 - m0) / (b1 - b0) * b1, (m1 - m0) / (b1 - b0))
                target = min(GROWTH_UNVERIFIED * good, line.max_batch_within(guarded(anchor, 0.0)))
        latency_bound = within_latency(latency_error)
        if target <= good and latency_bound > good and not bracketed:
            # Nothing larger is predicted to fit, by a fit not yet shown to hold near here: a size is
            # ruled out unrun only when predicted over the budget by more than the fit's last miss
            # (a workspace that stepped up between the last two sizes throws fit and slope off).
            latest = next(p for p in reversed(prober.probes) if p.peak_bytes is not None)
            miss = abs(latest.peak_bytes - latest.predicted_bytes) if latest.predicted_bytes is not None else 0.0
            if fit is None or fit.predict(good + 1) > budget + miss:
                bad_reason = "memory"
                break
            target = good + 1
        target = min(target, latency_bound, limit, max_batch)
        if bracketed:
            # A bracket (good, limit] of measurements or a verified fit's: it must shrink by a quarter
            # at least, so a fit that a bend has pulled off cannot creep up (or, against a measured
            # failure, down) one size at a time; right after a failed size the fit does not pick the
            # next one alone (at most halfway).
            span = limit + 1 - good
            target = max(target, good + max(1, span // 4 if span > 8 else span // 2))
            if hard_bad is not None:
                latest = next(p for p in reversed(prober.probes) if p.ran)
                target = min(target, good + max(1, span // 2 if not latest.ok else span * 3 // 4))
        elif target <= good:  # only the latency budget is left to stop at
            bad_reason = "latency"
            break
        if prober.by_size(target) is not None:
            bad_reason = reason
            break
        run(target)

    notes: list[str] = []
    settled = clear_of_jitter(prober, good, tolerance)
    if settled != good:
        notes.append(f"memory jumps between neighbouring sizes by more than a sample adds (up to "
                     f"{jitter_bytes(prober)[0] / 2**20:.0f} MiB): batch {good} ran within the budget but a "
                     f"smaller batch, which the batcher also forms, may not; max safe batch {settled}")
        good, bad_reason = settled, "memory"
    fit = prober.memory_fit()
    if bad_reason == "memory" and fit is not None and hard_bad != good + 1 and good < max_batch and not notes:
        skipped = prober.by_size(good + 1)
        if skipped is None:  # say in the log what stopped the search without running it
            prober.skip(good + 1, fit.predict(good + 1))
    if good >= max_batch:
        bad_reason = "max_batch"
    return SearchResult(good, prober.probes, base, bad_reason, fit, notes)
