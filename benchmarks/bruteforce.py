"""The true maximum batch under a memory budget, by measuring sizes one after another: the answer
every tuner is judged against (tune_vs_bruteforce.py, tuning_vs_peers.py).

Each size is measured exactly as the tuner measures a probe (optimizer.probe.probe: one warm-up,
then `repeats` runs, on the model's worst-case example batch): the caching allocator's peak grows
over repeated runs, so fewer runs would read lower peaks and flatter the scan.
"""
from __future__ import annotations

import time
from typing import Callable

from bench_common import say

from optimizer.model import ExampleBatches
from optimizer.probe import OOM, ProbeResult, probe


class Measurer:
    """One probe per size, kept: the brute-force scan and a final check share measurements."""

    def __init__(self, spec, meter, budget: int, repeats: int):
        self.batches = ExampleBatches(spec)
        self.meter, self.budget, self.repeats = meter, budget, repeats
        self.results: dict[int, ProbeResult] = {}

    def __call__(self, size: int) -> ProbeResult:
        if size not in self.results:
            self.batches.clear()
            self.meter.cleanup()
            self.results[size] = probe(self.batches, size, self.meter, memory_budget_bytes=self.budget,
                                       latency_budget_s=None, warmup=1, repeats=self.repeats)
            self.batches.clear()
            say(f"    measure b={size}: {self.results[size].outcome} peak "
                f"{(self.results[size].peak_bytes or 0) / 2**20:.0f} MiB (budget {self.budget / 2**20:.0f})")
        return self.results[size]


def brute_force(measure: Callable[[int], ProbeResult], hint: int, limit: int, resolution: float = 0.0) -> dict:
    """The largest size whose probe fits, scanning linearly around `hint` (a tuner's answer).

    From 0.8 x hint, coarse steps (~2% of it) up to the first failure (or down to the first fit),
    then every size inside that last step: exact when memory grows with the batch size.
    resolution > 0 (a fraction, e.g. 0.005): the last stage steps by that share of the answer
    instead of by 1 (batches in the thousands on a GPU); the answer is then exact to that step.
    `measure` is a Measurer, or anything with its call and `results` (and optionally `seconds`:
    per-size times that exclude a fresh process's start, counted instead of the wall clock).
    """
    started = time.perf_counter()
    before = set(measure.results)
    start = max(1, min(limit, int(hint * 0.8)))
    step = max(1, start // 50)
    lo, hi = 0, None  # lo: largest size known to fit; hi: smallest known not to
    if measure(start).ok:
        lo, size = start, start + step
        while size <= limit:
            if not measure(size).ok:
                hi = size
                break
            lo, size = size, size + step
        if hi is None and lo < limit:  # the last coarse step overshot the limit: scan up to it
            hi = limit + 1
    else:
        hi, size = start, start - step
        while size >= 1:
            if measure(size).ok:
                lo = size
                break
            hi, size = size, size - step
    fine = max(1, int(lo * resolution)) if resolution > 0 else 1
    if hi is not None:
        for size in range(lo + fine, hi, fine):
            if not measure(size).ok:
                break
            lo = size
    scanned = [s for s in measure.results if s not in before]
    seconds = sum(measure.seconds.get(s, 0.0) for s in scanned) if hasattr(measure, "seconds") else time.perf_counter() - started
    return {"found": lo or None, "probes": len(scanned),
            "ooms": sum(measure.results[s].outcome == OOM for s in scanned), "seconds": seconds,
            "note": f"scan from {start} in steps of {step}, then by {fine}"}
