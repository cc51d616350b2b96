"""How served batches really go: how long they take against what the tuning measured for the same
size, and how their requests arrived.

The tuning times the worst case the deployment admits, alone on the device: for the NF4 Llama a
512-token prompt generating 128 tokens (364 ms at batch 1 on this project's CPU) where real
requests of 32 new tokens took ~70 ms; for a vision model an idle replica, where a serving one shares
its CPU with decoding and HTTP. The batch wait is derived from those times (optimizer/select.py), so
it inherits their error: 251 ms of waiting for 70 ms requests halved the Llama's throughput at 1-4
clients. This keeps the ratio served / tuned over the last batches (median, so a stall does not
move it), and the deployment re-derives the wait with the tuning's latencies scaled by it.

The arrivals say how much of the wait catches anyone (ArrivalLog): a lone client's request waits
out the whole window for company that never comes, the 8B Llama's 1.8 s on an H200 (0.33x plain
Ray Serve at 1 client, docs/benchmarks-gpu.md), while a burst of requests lands in its first
milliseconds.

Mechanism only: recording, the ratio, the arrival spreads. The policy is optimizer/select.py's;
when to apply it, serve/batch_wait.py's.
"""
from __future__ import annotations

import bisect
import statistics
from collections import deque
from typing import Iterable


def enough_batches(batches: int, seconds: float, min_batches: int = 20, min_slow_batches: int = 3,
                   min_slow_s: float = 2.0) -> bool:
    """Whether `batches` batches that took `seconds` in all are enough to act on: `min_batches`,
    or, when batches take seconds (an 8B Llama's 1-5 s), `min_slow_batches` that took `min_slow_s`
    together (three of over 0.67 s), so that a wrong wait is not paid for minutes."""
    return batches >= min_batches or (batches >= min_slow_batches and seconds >= min_slow_s)


class TunedLatency:
    """The tuning's latency for any batch size: linear between the sizes it measured, the nearest
    measured size below the smallest, and per-sample proportional above the largest."""

    def __init__(self, points: Iterable[tuple[int, float]]):
        pts = sorted({int(b): float(s) for b, s in points if b and s and s > 0}.items())
        if not pts:
            raise ValueError("the tuning measured no latency; nothing to compare served batches with")
        self._sizes = [b for b, _ in pts]
        self._seconds = [s for _, s in pts]

    @classmethod
    def from_tuning(cls, tuning: dict) -> "TunedLatency":
        return cls((p["batch_size"], p["latency_s"]) for p in tuning.get("probes", [])
                   if p.get("outcome") == "ok" and p.get("latency_s"))

    def __call__(self, batch_size: int) -> float:
        sizes, secs = self._sizes, self._seconds
        if batch_size <= sizes[0]:
            return secs[0]
        if batch_size >= sizes[-1]:
            return secs[-1] * batch_size / sizes[-1]
        i = bisect.bisect_left(sizes, batch_size)
        if sizes[i] == batch_size:
            return secs[i]
        b0, b1, s0, s1 = sizes[i - 1], sizes[i], secs[i - 1], secs[i]
        return s0 + (s1 - s0) * (batch_size - b0) / (b1 - b0)


class ServedLatency:
    """Served seconds / tuned seconds over the last `window` batches, once they are enough
    (`enough_batches`)."""

    def __init__(self, tuned: TunedLatency, window: int = 50, min_batches: int = 20,
                 min_slow_batches: int = 3, min_slow_s: float = 2.0):
        self.tuned = tuned
        self.min_batches, self.min_slow_batches, self.min_slow_s = min_batches, min_slow_batches, min_slow_s
        self._ratios: deque[float] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self.recorded = 0  # batches recorded since the tuning in use

    def record(self, batch_size: int, seconds: float) -> None:
        expected = self.tuned(batch_size)
        if expected > 0 and seconds > 0:
            self._ratios.append(seconds / expected)
            self._seconds.append(seconds)
            self.recorded += 1

    @property
    def ratio(self) -> float | None:
        """Median served/tuned ratio, or None until enough batches were recorded."""
        if not enough_batches(len(self._ratios), sum(self._seconds), self.min_batches, self.min_slow_batches,
                              self.min_slow_s):
            return None
        return statistics.median(self._ratios)


class ArrivalLog:
    """For each batch that was not full, how its requests arrived: `spread_s` from the first to the
    last, and `held_s`, how long it sat formed before it ran because the device was busy with the
    batch before (its window closed at the first arrival + the wait). A full batch ended its wait
    early, so it says nothing about the wait and is not kept."""

    def __init__(self, window: int = 50):
        self._batches: deque[tuple[float, float, float, float]] = deque(maxlen=window)  # spread, held, wait, started
        self.recorded = 0

    def record(self, arrivals_s: list[float], started_s: float, max_batch_size: int, wait_s: float) -> None:
        if not arrivals_s or len(arrivals_s) >= max_batch_size:
            return
        first, last = min(arrivals_s), max(arrivals_s)
        self._batches.append((last - first, max(0.0, started_s - (first + wait_s)), wait_s, started_s))
        self.recorded += 1

    def batches(self, max_age_s: float | None = None, at_least: int = 3) -> list[tuple[float, float, float]]:
        """(spread_s, held_s, wait_s) of the last batches recorded, oldest first: those that started
        within `max_age_s` of the newest, but at least the newest `at_least`. The age bound lets
        a lone client's batches, seconds apart, replace a burst's sooner than 20 batches would."""
        kept = list(self._batches)
        if max_age_s is not None and kept:
            newest = kept[-1][3]
            recent = [b for b in kept if b[3] >= newest - max_age_s]
            kept = recent if len(recent) >= at_least else kept[-at_least:]
        return [(spread, held, wait) for spread, held, wait, _ in kept]

    def clear(self) -> None:
        self._batches.clear()
