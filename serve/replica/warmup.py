"""Run every batch size a replica may serve once, before it takes traffic.

The first time a process runs a batch size it pays that shape's set-up (kernel selection, memory
growth), on a GPU many times a warm run of the same size (benchmarks/new_shape_cost.py measures it;
docs/benchmarks-gpu.md). Tuning runs a handful of sizes; the batcher then forms any size from 1 to
max_batch_size as traffic allows, and each size met for the first time is a stall that its batch,
and every request queued behind it, waits out. Warming the rest up front moves that cost into
start-up, where no request pays it.

Only for specs whose decoded samples all have one shape (ModelSpec.fixed_sample_shape): a batch's
shape is then its size alone, so running each size once covers every batch serving can form. An
LLM's shapes also follow prompt lengths; warming sizes would not cover them, so it is skipped.

Which first: before traffic only the sizes a queue forms first (`first_sizes`: the max batch, what
full load forms, and 1, what a lone request forms), so a replica is ready right after tuning; the
rest while already serving, one size at a time between batches (serve/replica/replica.py holds the model
lock per size, so a batch waits at most one size's first run). Sizes that traffic forms first are
warm by serving them and are skipped.

Mechanism only: which sizes count as warm and running the rest. The deployment decides when.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable


def size_ranges(sizes: Iterable[int]) -> str:
    """[1, 2, 3, 5, 9, 10] -> "1-3, 5, 9-10": a log line a person can read for 50 sizes."""
    ordered = sorted(set(sizes))
    if not ordered:
        return "none"
    parts, start, prev = [], ordered[0], ordered[0]
    for size in ordered[1:] + [None]:
        if size is not None and size == prev + 1:
            prev = size
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if size is not None:
            start = prev = size
    return ", ".join(parts)


@dataclass
class WarmReport:
    max_batch_size: int
    warmed: list[int] = field(default_factory=list)  # run now, in this order
    already_warm: list[int] = field(default_factory=list)  # run before (tuning probes, served batches)
    first_run_s: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    left_cold: list[int] = field(default_factory=list)  # not run: the time budget ran out, or a run failed
    stopped_by: str | None = None
    before_traffic: list[int] = field(default_factory=list)  # of `warmed`, run before the replica took traffic
    in_background: list[int] = field(default_factory=list)  # of `warmed`, run between served batches
    background: str | None = None  # "running" while sizes are warmed between batches, then "done"

    def absorb(self, part: "WarmReport") -> None:
        """Add a later warm-up's runs (one size between batches) to this report."""
        self.warmed += part.warmed
        self.in_background += part.warmed
        self.first_run_s.update(part.first_run_s)
        self.seconds += part.seconds
        if part.left_cold:
            self.left_cold, self.stopped_by = part.left_cold, part.stopped_by

    def describe(self) -> str:
        if self.background == "running":
            return (f"warmed batch sizes {size_ranges(self.before_traffic)} before traffic; warming "
                    f"the rest up to {self.max_batch_size} between served batches")
        if not self.warmed and not self.left_cold:
            return (f"every batch size up to {self.max_batch_size} had already run in this replica "
                    f"({size_ranges(self.already_warm)}); nothing to warm")
        times = sorted(self.first_run_s.values())
        line = (f"warmed batch sizes {size_ranges(self.warmed)} in {self.seconds:.1f} s, so no request waits out a size's "
                f"first run")
        if len(times) == 1:
            line += f" (first run {times[0] * 1e3:.0f} ms)"
        elif times:
            slowest = max(self.first_run_s, key=self.first_run_s.get)
            line += f" (first runs {times[0] * 1e3:.0f}-{times[-1] * 1e3:.0f} ms, slowest at batch {slowest})"
        if self.in_background:
            line += f" ({size_ranges(self.in_background)} between served batches)"
        if self.already_warm:
            line += f"; already run: {size_ranges(self.already_warm)}"
        if self.left_cold:
            line += f"; left cold: {size_ranges(self.left_cold)} ({self.stopped_by})"
        return line

    def to_dict(self) -> dict:
        d = asdict(self)
        d["first_run_s"] = {str(k): v for k, v in self.first_run_s.items()}
        d["summary"] = self.describe()
        return d


class SizeWarmer:
    """Remembers which batch sizes this process has run; runs the others once, within a time budget.

    `run_batch(n)` runs one batch of n (and waits for the device). Order: the max batch size first
    (what full load forms), then ascending from 1 (what light load forms), so a budget that runs out
    leaves the middle sizes cold, the ones traffic forms least.
    """

    def __init__(self, run_batch: Callable[[int], None], budget_s: float = 120.0,
                 clock: Callable[[], float] = time.perf_counter, on_error: Callable[[], None] = lambda: None):
        self._run_batch = run_batch
        self._on_error = on_error  # after a failed run, before returning: free what the failed batch held
        self._clock = clock
        self._warm: set[int] = set()
        self.budget_s = float(budget_s)

    def mark_warm(self, sizes: Iterable[int]) -> None:
        self._warm.update(int(s) for s in sizes if s and s > 0)

    def warm_sizes(self, max_batch_size: int) -> list[int]:
        return sorted(s for s in self._warm if s <= max_batch_size)

    def cold_sizes(self, max_batch_size: int) -> list[int]:
        rest = [s for s in range(1, max_batch_size) if s not in self._warm]
        return ([max_batch_size] if max_batch_size not in self._warm else []) + rest

    @staticmethod
    def first_sizes(max_batch_size: int) -> list[int]:
        """What a batch queue forms first: the max batch under load, 1 for a lone request."""
        return sorted({max_batch_size, 1}, reverse=True)

    def warm(self, max_batch_size: int, sizes: Iterable[int] | None = None) -> WarmReport:
        """Run the cold sizes up to max_batch_size (only those among `sizes`, when given), in order."""
        report = WarmReport(max_batch_size=max_batch_size, already_warm=self.warm_sizes(max_batch_size))
        cold = self.cold_sizes(max_batch_size)
        if sizes is not None:
            wanted = set(sizes)
            cold = [s for s in cold if s in wanted]
        started = self._clock()
        for i, size in enumerate(cold):
            if self._clock() - started >= self.budget_s:
                report.left_cold, report.stopped_by = cold[i:], f"the {self.budget_s:g} s warm-up budget ran out"
                break
            t0 = self._clock()
            try:
                self._run_batch(size)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up must not stop the replica; serving handles its own errors
                report.left_cold, report.stopped_by = cold[i:], f"batch {size} raised {type(exc).__name__}: {exc}"
            if report.left_cold:  # outside the except block: its traceback holds the failed batch's tensors
                self._on_error()
                break
            report.first_run_s[size] = self._clock() - t0
            report.warmed.append(size)
            self._warm.add(size)
        report.seconds = self._clock() - started
        return report
