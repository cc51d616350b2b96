"""How long served batches really take, against what the tuning measured for the same size.

The tuning times the worst case the deployment admits, alone on the device: for the NF4 Llama a
512-token prompt generating 128 tokens (364 ms at batch 1 on this project's CPU) where real
requests of 32 new tokens took ~70 ms; for a vision model an idle replica, where a serving one shares
its CPU with decoding and HTTP. The batch wait is derived from those times (optimizer/select.py), so
it inherits their error: 251 ms of waiting for 70 ms requests halved the Llama's throughput at 1-4
clients. This keeps the ratio served / tuned over the last batches (median, so a stall does not
move it), and the deployment re-derives the wait with the tuning's latencies scaled by it.

Mechanism only: recording and the ratio. When to apply it is the deployment's.
"""
from __future__ import annotations

import bisect
import statistics
from collections import deque
from typing import Iterable


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
    """Served seconds / tuned seconds over the last `window` batches."""

    def __init__(self, tuned: TunedLatency, window: int = 50, min_batches: int = 20):
        self.tuned = tuned
        self.min_batches = min_batches
        self._ratios: deque[float] = deque(maxlen=window)
        self.recorded = 0  # batches recorded since the tuning in use

    def record(self, batch_size: int, seconds: float) -> None:
        expected = self.tuned(batch_size)
        if expected > 0 and seconds > 0:
            self._ratios.append(seconds / expected)
            self.recorded += 1

    @property
    def ratio(self) -> float | None:
        """Median served/tuned ratio, or None until `min_batches` batches were recorded."""
        if len(self._ratios) < self.min_batches:
            return None
        return statistics.median(self._ratios)
