"""When a replica moves its batch wait, learning from the batches it serves.

The tuning derives the wait (optimizer/select.py's `batch_wait_timeout_s`) from what it measured:
the worst-case input, alone on the device. Serving shows two things the tuning cannot. How long
batches really take: the same rule at those times gives the most worth waiting (the ceiling). And
how requests arrive: how much of that window catches anyone (`wait_from_arrivals`). A lone
client's request otherwise waits out the whole window: the 8B Llama's 1.8 s on an H200 served
0.33x plain Ray Serve at 1 client.

Checked every 20 batches, or every 3 once they took 2 s together (an 8B Llama's batches take
seconds, and 20 of them are minutes of a wrong wait), and once 3 batches formed under a new wait
(a wait grown to merge a convoy of small batches is too long once they merged); applied when the wait moves by
more than 20%, so that noise does not churn @serve.batch. Policy stays in optimizer/select.py, recording in
served_latency.py; this is the schedule and the bookkeeping.
"""
from __future__ import annotations

from optimizer.select import batch_wait_timeout_s, wait_from_arrivals

from .served_latency import ArrivalLog, ServedLatency, TunedLatency, enough_batches

MOVE_FRACTION = 0.2  # a new wait is applied only when it differs from the current one by more
ARRIVALS_MAX_AGE_S = 10.0  # arrivals read from the batches of the last 10 s (at least 3 batches)


class ServedWait:
    """One tuning's wait as served. `record` each served batch; when it returns True, `wait_s`
    (and `reason`) changed and the deployment hands the wait to @serve.batch."""

    def __init__(self, tuning: dict):
        self.tuning = tuning
        self.tuned_wait_s = float(tuning["batch_wait_timeout_s"])
        try:
            self.latency: ServedLatency | None = ServedLatency(TunedLatency.from_tuning(tuning))
        except ValueError:  # a tuning with no timed probe (nothing fit): nothing to scale
            self.latency = None
        self.arrivals = ArrivalLog(window=20)
        self.wait_s: float | None = None  # None until served batches moved it: the tuning's wait holds
        self.reason: str | None = None
        self.batches, self.seconds = 0, 0.0
        self._checked_at = (0, 0.0)
        self._just_moved = False
        # Batches already formed (held for the device) when the wait moved were collected under the
        # old one: their arrivals would be read against the wrong window, so they are not kept.
        self._moved_at_s = float("-inf")

    @property
    def current_s(self) -> float:
        return self.tuned_wait_s if self.wait_s is None else self.wait_s

    @property
    def ratio(self) -> float | None:
        return self.latency.ratio if self.latency else None

    def record(self, arrivals_s: list[float], started_s: float, elapsed_s: float, max_batch_size: int,
               wait_s: float) -> bool:
        """A batch whose requests reached @serve.batch at `arrivals_s` (perf_counter seconds), began
        running at `started_s`, took `elapsed_s`, under these settings. True when the wait moved."""
        self.batches += 1
        self.seconds += elapsed_s
        if self.latency is not None:
            self.latency.record(len(arrivals_s), elapsed_s)
        if arrivals_s and min(arrivals_s) >= self._moved_at_s:  # formed under the wait now in force
            self.arrivals.record(arrivals_s, started_s, max_batch_size, wait_s)
        moved = self._check()
        if moved:
            self._moved_at_s = started_s + elapsed_s  # the new wait applies to batches begun from here on
        return moved

    def _check(self) -> bool:
        # After a move, is the new wait right? Three batches formed under it say so, before many more
        # pay for a wrong one (an 8B Llama's wait grown to merge a convoy costs seconds a batch); one
        # batch was too few (the CPU Llama's wait swung 17 <-> 130 ms at every batch). Otherwise the
        # schedule of enough_batches.
        if not self._just_moved and not enough_batches(self.batches - self._checked_at[0],
                                                       self.seconds - self._checked_at[1]):
            return False
        recent = self.arrivals.batches(max_age_s=ARRIVALS_MAX_AGE_S)
        if len(recent) < 3 and (self._just_moved or self.wait_s is not None):
            # full batches (the wait did not matter) or batches formed before the last move: keep the
            # wait, and look again at the next batch rather than 20 batches on
            return False
        self._checked_at, self._just_moved = (self.batches, self.seconds), False
        t, ratio = self.tuning, self.ratio
        if ratio is not None:
            batch1_s = self.latency.tuned(1)
            ceiling_s = batch_wait_timeout_s(t["serve_latency_s"] * ratio, t["latency_budget_s"], batch1_s * ratio,
                                             (t.get("batch1_throughput") or 1 / batch1_s) / ratio,
                                             t["serve_throughput"] / ratio)
            serve_latency_s = t["serve_latency_s"] * ratio
            why = (f"served batches take {ratio:.2f}x the tuning's time for their size (batch 1: "
                   f"{batch1_s * ratio * 1e3:.1f} ms), so the tuning's rule gives {ceiling_s * 1e3:.1f} ms")
        else:
            ceiling_s, why = self.tuned_wait_s, f"the tuning's {self.tuned_wait_s * 1e3:.1f} ms"
            serve_latency_s = t["serve_latency_s"]
        budget_s = t.get("latency_budget_s")
        limit_s = None if budget_s is None else max(ceiling_s, 0.5 * max(0.0, budget_s - serve_latency_s))
        if len(recent) >= 3:
            wait_s, arrivals_why = wait_from_arrivals(ceiling_s, recent, limit_s)
        else:
            wait_s, arrivals_why = ceiling_s, "too few batches short of full to read the arrivals from yet"
        current = self.current_s
        if abs(wait_s - current) <= MOVE_FRACTION * max(current, 1e-3):
            return False
        self.wait_s, self.reason = wait_s, f"{why}; {arrivals_why}: {current * 1e3:.1f} -> {wait_s * 1e3:.1f} ms"
        self.arrivals.clear()  # batches formed under the old wait describe a window that is gone
        self._just_moved = True
        return True
