"""Tuning through a model's fast probe (TunableModel.probe_batch), checked by one real batch.

The search and the knee run on fast probes: each reaches the batch's real peak memory and predicts
its latency (an LLM: one prefill and a few decode steps instead of whole generations). Then the
chosen batch runs once for real (`predict`):
- its latency within `tolerance` of the prediction: the answer stands;
- else every prediction is rescaled by measured / predicted and the decision is made again (fast
  probes again: seconds), at most `max_corrections` times;
- over the memory budget or out of memory (the fast probe measured less memory than the real
  batch takes, which it must not): the fast probes are not trusted and the search runs again on
  real batches.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from .model import ExampleBatches, TunableModel
from .probe import OOM, OVER_MEMORY
from .search import Prober
from .tuning import Tuning

DEFAULT_TOLERANCE = 0.15
MAX_CORRECTIONS = 1  # each correction runs the fast search again; a noisy host should not loop


def tune_with_fast_probes(
    spec: TunableModel,
    make_prober: Callable[[Callable[[int], float | None], int | None, int | None], Prober],
    decide: Callable[[Prober], Tuning],
    say: Callable[[str], None],
    started_at_s: float,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_corrections: int = MAX_CORRECTIONS,
) -> Tuning:
    """`make_prober(run_batch, warmup, repeats)` builds a Prober (None: the settings' warm-up and
    repeats); `decide(prober)` is tune_on on it. Returns the checked Tuning, its notes saying how
    the check went and its tuning_s counting every probe and the check."""
    scale, notes = 1.0, []
    for attempt in range(max_corrections + 1):
        # One timed run per fast probe: its decode time is already a median of several steps.
        tuning = decide(make_prober(ExampleBatches(spec, fast=True, latency_scale=scale), None, 1))
        # warmed up once, as every probe is: the first whole generation at a size pays its cache's
        # growth and kernel choices (on an H100 the 8B Llama's cold check at batch 74 took 13.7 s,
        # warm whole generations at 35 and 49 took 7.0-7.1 s, and the correction then scaled every
        # prediction by the cold run: docs/results/issue14/h100_llama_fast.log)
        check = make_prober(ExampleBatches(spec), 1, 1).run(tuning.batch_size)
        if check.outcome in (OOM, OVER_MEMORY):
            note = (f"one real batch of {tuning.batch_size} went {check.outcome.replace('_', ' ')} although its fast "
                    f"probe fit: searching again with real batches")
            say(f"autobatch: {note}")
            tuning = decide(make_prober(ExampleBatches(spec), None, None))
            return replace(tuning, notes=tuning.notes + tuple(notes) + (note,),
                           tuning_s=time.perf_counter() - started_at_s)
        predicted_s, measured_s = tuning.serve_latency_s, check.latency_s
        ratio = measured_s / predicted_s if predicted_s else float("inf")
        line = (f"fast probes checked by one real batch of {tuning.batch_size}: {measured_s * 1e3:.0f} ms measured, "
                f"{predicted_s * 1e3:.0f} ms predicted (x{ratio:.2f}), peak {check.peak_bytes / 2**30:.2f} GiB")
        say(f"autobatch: {line}")
        notes.append(line)
        if abs(ratio - 1) <= tolerance:
            break
        if attempt < max_corrections:
            scale *= ratio
            notes.append(f"predictions rescaled x{ratio:.2f} and the decision made again")
            say(f"autobatch: {notes[-1]}")
        else:
            notes.append(f"still off by more than {tolerance:.0%} after {max_corrections} corrections; kept")
    return replace(tuning, notes=tuning.notes + tuple(notes), tuning_s=time.perf_counter() - started_at_s)


__all__ = ["tune_with_fast_probes", "DEFAULT_TOLERANCE"]
