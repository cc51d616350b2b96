"""Run one batch size and report what it cost: peak memory, latency, throughput, and an outcome.

A probe never raises for an out-of-memory: it cleans up and reports `oom`, because an OOM is
information for the search (an upper bound), not a reason for a replica to die.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable

from .devices import MemoryMeter

OK = "ok"
OOM = "oom"
OVER_MEMORY = "over_memory"  # ran, but its peak exceeded the memory budget
OVER_LATENCY = "over_latency"  # ran, but one batch took longer than the latency budget
PREDICTED = "predicted"  # not run: the memory fit predicted it over budget
OUTCOMES = (OK, OOM, OVER_MEMORY, OVER_LATENCY, PREDICTED)


@dataclass(frozen=True)
class BatchTiming:
    """What a `run_batch` that overlaps batches returns (optimizer/model.py's ExampleBatches for a
    model that prepares the next batch during this one's forward): `latency_s`, one batch's own
    time from its first stage's start to its answer; `period_s`, the time between batches at
    steady state, which sets the throughput."""

    latency_s: float
    period_s: float


@dataclass(frozen=True)
class ProbeResult:
    batch_size: int
    outcome: str
    peak_bytes: int | None = None
    latency_s: float | None = None
    throughput: float | None = None  # samples per second: batch_size / period_s, or / latency_s where batches do not overlap
    predicted_bytes: int | None = None
    repeats: int = 0
    period_s: float | None = None  # seconds between overlapped batches (None: they do not overlap, the latency is the period)

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def ran(self) -> bool:
        return self.outcome != PREDICTED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeResult":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


def probe(
    run_batch: Callable[[int], None],
    batch_size: int,
    meter: MemoryMeter,
    *,
    memory_budget_bytes: int,
    latency_budget_s: float | None,
    warmup: int = 1,
    repeats: int = 3,
    predicted_bytes: int | None = None,
) -> ProbeResult:
    """Warm up, then time `repeats` runs (median), reading the peak over all of them.

    A `run_batch` that returns a number returns the seconds the batch would take (a model's fast
    probe predicts a whole generation from a few steps); that is the run's latency then, else
    its wall time is. One that returns a BatchTiming ran overlapped with the batch before it (as
    a replica serves a model whose `prepare` and `forward` overlap): its latency is the batch's own,
    and the throughput comes from its period.

    The first timed run that is more than twice over the latency budget ends the probe early: the
    size is too slow, and on a CPU a few more repeats of a too-large batch cost tens of seconds.
    """
    meter.cleanup()
    meter.reset_peak()
    latencies: list[float] = []
    periods: list[float] = []
    try:
        for _ in range(warmup):
            run_batch(batch_size)
        meter.synchronize()
        for _ in range(repeats):
            start = meter.now()
            returned = run_batch(batch_size)
            meter.synchronize()
            if isinstance(returned, BatchTiming):
                latencies.append(returned.latency_s)
                periods.append(returned.period_s)
            else:
                latencies.append(meter.now() - start if returned is None else float(returned))
            if latency_budget_s is not None and latencies[-1] > 2 * latency_budget_s:
                break
        peak = meter.peak_bytes()
    except Exception as exc:  # noqa: BLE001 - OOMs come as several exception types
        if not meter.is_oom(exc):
            raise
        del exc
        meter.cleanup()
        return ProbeResult(batch_size, OOM, peak_bytes=None, predicted_bytes=predicted_bytes)
    meter.cleanup()
    latency = statistics.median(latencies)
    period = statistics.median(periods) if periods else None
    per_batch_s = period if period is not None else latency
    if peak > memory_budget_bytes:
        outcome = OVER_MEMORY
    elif latency_budget_s is not None and latency > latency_budget_s:
        outcome = OVER_LATENCY
    else:
        outcome = OK
    return ProbeResult(
        batch_size,
        outcome,
        peak_bytes=int(peak),
        latency_s=latency,
        throughput=batch_size / per_batch_s if per_batch_s > 0 else float("inf"),
        predicted_bytes=predicted_bytes,
        repeats=len(latencies),
        period_s=period,
    )
