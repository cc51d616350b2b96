"""Tuning through a model's fast probe (TunableModel.probe_batch), checked by real batches.

The search and the knee run on fast probes: each reaches the batch's real peak memory and predicts
its latency (an LLM: one prefill and a few decode steps instead of whole generations). Then the
chosen batch runs once for real (`predict`, warmed up):
- its latency within `tolerance` of the prediction: the answer stands;
- else every prediction is rescaled by measured / predicted and the decision is made again (fast
  probes again: seconds), at most `max_corrections` times;
- over the memory budget or out of memory (the fast probe measured less memory than the real
  batch takes, which it must not): the fast probes are not trusted and the search runs again on
  real batches.
What is stored is what was measured: every real batch joins the tuning's probes (superseding the
fast probe of its size), and the answer is a size whose real batch met both budgets:
- a correction never serves less than the largest size whose real batch met the budgets (a
  rescaled prediction is a guess, that batch a measurement);
- an answer whose own real batch went over the latency budget is not kept: the largest size
  predicted to fit by that batch's measured ratio is measured instead (`max_remeasures` times),
  and only if none fits are real batches searched again.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from .model import ExampleBatches, TunableModel
from .probe import OOM, OVER_MEMORY, ProbeResult
from .search import Prober
from .tuning import Tuning
from .wait import batch_wait_timeout_s

DEFAULT_TOLERANCE = 0.15
MAX_CORRECTIONS = 1  # each correction runs the fast search again; a noisy host should not loop
MAX_REMEASURES = 2  # real batches under an answer whose own real batch was too slow


def tune_with_fast_probes(
    spec: TunableModel,
    make_prober: Callable[[Callable[[int], float | None], int | None, int | None], Prober],
    decide: Callable[[Prober], Tuning],
    say: Callable[[str], None],
    started_at_s: float,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_corrections: int = MAX_CORRECTIONS,
    max_remeasures: int = MAX_REMEASURES,
) -> Tuning:
    """`make_prober(run_batch, warmup, repeats)` builds a Prober (None: the settings' warm-up and
    repeats); `decide(prober)` is tune_on on it. Returns the checked Tuning, its notes saying how
    the check went and its tuning_s counting every probe and every real batch."""
    scale, notes = 1.0, []
    real: dict[int, ProbeResult] = {}  # size -> its real batch, measured once

    def measure(size: int) -> ProbeResult:
        # warmed up once, as every probe is: the first whole generation at a size pays its cache's
        # growth and kernel choices, so a cold check would scale every prediction by that one-off
        # cost (the 8B Llama's, docs/benchmarks.md §8)
        if size not in real:
            real[size] = make_prober(ExampleBatches(spec), 1, 1).run(size)
        return real[size]

    def finish(tuning: Tuning) -> Tuning:
        return replace(tuning, notes=tuning.notes + tuple(notes), tuning_s=time.perf_counter() - started_at_s)

    agreed = False
    within_memory: list[int] = []  # sizes a fast probe ran within the memory budget (they reach the real peak)
    for attempt in range(max_corrections + 1):
        # One timed run per fast probe: its decode time is already a median of several steps.
        tuning = decide(make_prober(ExampleBatches(spec, fast=True, latency_scale=scale), None, 1))
        within_memory += [p.batch_size for p in tuning.probes
                          if p.peak_bytes is not None and p.peak_bytes <= tuning.memory_budget_bytes]
        check = measure(tuning.batch_size)
        if check.outcome in (OOM, OVER_MEMORY):
            notes.append(f"one real batch of {tuning.batch_size} went {check.outcome.replace('_', ' ')} although "
                         f"its fast probe fit: searching again with real batches")
            say(f"autobatch: {notes[-1]}")
            return finish(decide(make_prober(ExampleBatches(spec), None, None)))
        predicted_s, measured_s = _predicted_s(tuning, tuning.batch_size), check.latency_s
        ratio = measured_s / predicted_s if predicted_s else float("inf")
        notes.append(f"fast probes checked by one real batch of {tuning.batch_size}: {measured_s * 1e3:.0f} ms "
                     f"measured, {predicted_s * 1e3:.0f} ms predicted (x{ratio:.2f}), peak "
                     f"{check.peak_bytes / 2**30:.2f} GiB")
        say(f"autobatch: {notes[-1]}")
        if abs(ratio - 1) <= tolerance:
            agreed = True
            break
        if attempt < max_corrections:
            scale *= ratio
            notes.append(f"predictions rescaled x{ratio:.2f} and the decision made again")
            say(f"autobatch: {notes[-1]}")
        else:
            notes.append(f"still off by more than {tolerance:.0%} after {max_corrections} corrections")
            say(f"autobatch: {notes[-1]}")

    for _ in range(max_remeasures):
        if agreed and real[tuning.batch_size].ok:
            break
        # The answer contradicts its own real batch (too slow, or predicted wrongly): measure the
        # size the real batches say reaches the latency budget, rather than store a guess.
        size, why = _next_real_size(tuning, real, max(within_memory, default=1))
        if size is None:
            break
        notes.append(f"measuring a real batch of {size}: {why}")
        say(f"autobatch: {notes[-1]}")
        measure(size)

    too_slow = [size for size, p in real.items() if not p.ok]
    met = [size for size, p in real.items() if p.ok and (not too_slow or size < min(too_slow))]
    if not met:
        notes.append("no real batch met the budgets: searching again with real batches")
        say(f"autobatch: {notes[-1]}")
        return finish(decide(make_prober(ExampleBatches(spec), None, None)))
    if max(met) != tuning.batch_size:
        notes.append(f"serving batch {max(met)}, the largest whose real batch met the budgets "
                     f"({real[max(met)].latency_s * 1e3:.0f} ms), not the {tuning.batch_size} the fast probes chose")
        say(f"autobatch: {notes[-1]}")
    return finish(_at_measured(tuning, real, max(met)))


def _predicted_s(tuning: Tuning, size: int) -> float:
    """What the fast probes predicted for `size` (the serve latency is 0 when batch 1 was predicted
    over the budget and the tuning serves unbatched)."""
    return next((p.latency_s for p in tuning.probes if p.batch_size == size and p.latency_s), 0.0)


def _next_real_size(tuning: Tuning, real: dict[int, ProbeResult], memory_cap: int) -> tuple[int | None, str]:
    """The next size to measure with a real batch, between the largest real batch that met the
    budgets (lo) and the smallest that did not (hi): where the line through their real latencies
    reaches the budget (exact for latency affine in the batch), or with one of them only, the
    largest fast-probed size whose prediction, times that batch's measured / predicted, fits.
    Never past `memory_cap`, the largest size a fast probe ran within the memory budget (a fast
    probe reaches the real peak), never a size measured already."""
    budget_s = tuning.latency_budget_s
    too_slow = sorted(size for size, p in real.items() if not p.ok)
    hi = too_slow[0] if too_slow else None
    met = sorted(size for size, p in real.items() if p.ok and (hi is None or size < hi))
    lo = met[-1] if met else None
    cap = min(memory_cap, hi - 1 if hi is not None else tuning.max_batch)
    if lo is not None and hi is not None:
        (b0, t0), (b1, t1) = (lo, real[lo].latency_s), (hi, real[hi].latency_s)
        if t1 <= t0:
            return None, ""
        size = int(b0 + (budget_s - t0) * (b1 - b0) / (t1 - t0))
        why = (f"the line through batch {lo} ({t0 * 1e3:.0f} ms) and batch {hi} ({t1 * 1e3:.0f} ms) reaches the "
               f"{budget_s * 1e3:.0f} ms budget there")
    else:
        anchor = hi if hi is not None else lo
        ratio = real[anchor].latency_s / _predicted_s(tuning, anchor) if _predicted_s(tuning, anchor) else None
        if ratio is None:
            return None, ""
        fits = [p.batch_size for p in tuning.probes if p.latency_s and p.latency_s * ratio <= budget_s]
        size = max(fits, default=0)
        why = (f"the largest fast-probed size that fits the {budget_s * 1e3:.0f} ms budget at batch {anchor}'s "
               f"measured / predicted (x{ratio:.2f})")
    size = min(size, cap)
    if size < 1 or size in real or (lo is not None and size <= lo):
        return None, ""
    return size, why


def _at_measured(tuning: Tuning, real: dict[int, ProbeResult], size: int) -> Tuning:
    """`tuning` serving `size`, whose real batch met the budgets, with every real batch in its probes
    (each supersedes the fast probe of its size: the cache's trust check reads the last one) and
    the serve latency, throughput and wait taken from the real batch."""
    served = real[size]
    probes = tuple(p for p in tuning.probes if p.batch_size not in real) + tuple(real.values())
    too_slow = [s for s, p in real.items() if not p.ok]
    ok_sizes = [p.batch_size for p in probes if p.ok and (not too_slow or p.batch_size < min(too_slow))]
    max_safe = max([s for s in ok_sizes if s <= max(tuning.max_safe_batch, size)] + [size])
    # a fast probe above the max that the real batches overruled (they put the budget under it) is
    # a prediction, not a measurement: it is not kept as a size that ran within the budgets
    probes = tuple(p for p in probes if p.batch_size <= max_safe or not p.ok or p.batch_size in real)
    first = next((p for p in probes if p.batch_size == 1), None)
    first_latency = first.latency_s if first is not None and first.latency_s else served.latency_s
    first_throughput = first.throughput if first is not None and first.throughput else served.throughput
    wait_s = batch_wait_timeout_s(served.latency_s, tuning.latency_budget_s, first_latency, first_throughput,
                                  served.throughput)
    return replace(tuning, probes=probes, batch_size=size, max_safe_batch=max_safe,
                   serve_latency_s=served.latency_s, serve_throughput=served.throughput,
                   batch_wait_timeout_s=wait_s,
                   batch1_throughput=first_throughput if tuning.batch1_throughput is not None else None)


__all__ = ["tune_with_fast_probes", "DEFAULT_TOLERANCE"]
