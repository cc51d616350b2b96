"""How long a partial batch waits for more requests: the tuner's rule, and the controller that
re-derives it from the batches a replica serves.

The rule (`batch_wait_timeout_s`) works from what the tuning measured: the worst-case input, alone
on the device. Serving shows two things a tuning cannot:
- how long batches really take (`ServedLatency`: served / tuned seconds for the same size); the
  same rule at those times gives the most worth waiting, the ceiling;
- how requests arrive (`ArrivalLog`): how much of that window catches anyone
  (`wait_from_arrivals`). A request that no other request joins waits out the whole window for
  nothing, so the wait shrinks to what arrivals use of it.

`WaitController` decides when to look and when to move, as one state machine (`WaitState`), with
every number it uses in one `WaitControllerConfig`. It is Ray-free: it sees perf_counter times and
batch sizes, and the replica hands what it decides to its batcher (serve/replica/batcher.py).
"""
from __future__ import annotations

import bisect
import enum
import statistics
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from .probe import ProbeResult
from .served import ServedBatch, served_batch
from .stats import OBSERVED, percentile

if TYPE_CHECKING:
    from .tuning import Tuning


@dataclass(frozen=True)
class WaitControllerConfig:
    """Every number the wait's rule and its controller use, each stated once."""

    # When to check. Enough batches to act on: `check_every_batches`, or `slow_check_batches` that
    # took `slow_check_s` together, so that batches taking seconds do not pay a wrong wait for minutes.
    check_every_batches: int = 20
    slow_check_batches: int = 3
    slow_check_s: float = 2.0
    # Arrivals are read from at least this many recent batches short of full; a wait just moved is
    # judged once this many batches formed under it (fewer are noise: a wait that moves on one batch
    # oscillates between a convoy's wait and a burst's).
    min_arrival_batches: int = 3
    arrivals_max_age_s: float = 10.0  # arrivals read from the batches that started this recently
    move_fraction: float = 0.2  # a new wait is applied only when it differs from the current by more
    latency_window_batches: int = 50  # batches the served/tuned ratio is the median of
    arrival_window_batches: int = 20  # batches short of full whose arrivals are kept
    # The rule: the wait never spends more than this fraction of the budget left after the compute.
    budget_fraction: float = 0.5
    # Reading arrivals (wait_from_arrivals).
    floor_s: float = 0.001  # the shortest wait; also the smallest wait a move is measured against
    margin: float = 3.0  # x the arrivals' spread
    reach: float = 0.8  # arrivals spread over more than this share of the wait reach its end
    held_fraction: float = 0.25  # a batch held past its wait longer than this share of it (and
    held_min_s: float = 0.005  # than this, the event loop's own delay) sat for a busy device
    spread_percentile: float = 90
    held_percentile: float = 50

    def enough_batches(self, batches: int, seconds: float) -> bool:
        """Whether `batches` batches that took `seconds` in all are enough to act on."""
        return batches >= self.check_every_batches or (batches >= self.slow_check_batches
                                                       and seconds >= self.slow_check_s)


DEFAULT_WAIT_CONFIG = WaitControllerConfig()


# ----- the rule -----
def batch_wait_timeout_s(
    serve_latency_s: float,
    latency_budget_s: float | None,
    batch1_latency_s: float,
    batch1_throughput: float,
    serve_throughput: float,
    fraction: float = DEFAULT_WAIT_CONFIG.budget_fraction,
) -> float:
    """How long a partial batch waits for more requests before it runs.

    Waiting pays only while requests arrive faster than batch 1 can serve them; at such a rate
    the next one comes within one batch-1 compute time, so that is the most worth waiting. It is
    scaled by what batching gains (1 - batch-1 throughput / serving throughput): a device whose
    throughput is flat in the batch gains nothing by waiting, one whose throughput grows with the
    batch nearly all of it. A request's latency is at most its wait plus the batch's compute, so
    the wait never spends more than a `fraction` of what the budget leaves after the compute.
    A serving replica applies the rule again with the latencies scaled to what its batches really
    take (WaitController), since the tuning times the worst case, alone on the device.
    """
    gain = 0.0 if serve_throughput <= 0 else max(0.0, 1.0 - batch1_throughput / serve_throughput)
    wait = batch1_latency_s * gain
    if latency_budget_s is not None:
        wait = min(wait, fraction * max(0.0, latency_budget_s - serve_latency_s))
    return max(0.0, wait)


@dataclass(frozen=True)
class BatchObservation:
    """How one batch short of full formed: its requests arrived over `spread_s` (first to last);
    it sat `held_s` after its window closed (the first arrival + `wait_s`) because the device was
    busy with the batch before; it began running at `started_s` (perf_counter seconds)."""

    spread_s: float
    held_s: float
    wait_s: float
    started_s: float = 0.0

    @classmethod
    def of_batch(cls, arrivals_s: Sequence[float], started_s: float, wait_s: float) -> "BatchObservation":
        first, last = min(arrivals_s), max(arrivals_s)
        return cls(last - first, max(0.0, started_s - (first + wait_s)), wait_s, started_s)

    @property
    def used(self) -> float:
        """The share of its wait the arrivals spread over (a zero wait: all of it if they spread at all)."""
        if self.wait_s > 0:
            return self.spread_s / self.wait_s
        return 1.0 if self.spread_s > 0 else 0.0


def wait_from_arrivals(
    ceiling_s: float,
    batches: Sequence[BatchObservation],
    config: WaitControllerConfig = DEFAULT_WAIT_CONFIG,
) -> tuple[float, str]:
    """How long to wait, from how the requests of recent batches short of full arrived.

    `ceiling_s` is the rule's wait: the most worth waiting on an idle device; whether anyone
    arrives in that window is the clients' doing.
    - Formed batches sat waiting for a busy device (the median batch held longer than
      `held_fraction` of its wait and `held_min_s`): the device, not the wait, set those batches.
      The replica's batcher (serve/replica/batcher.py) merged everything that arrived while they sat, so
      a longer wait would not fill them (a clock that closes batches while the device is busy splits
      its queue into a convoy of small batches, which a longer wait merged; here it would only delay
      the first batch after the device frees). The rule's wait stands.
    - Arrivals reach the end of the window (the `spread_percentile` batch spread over more than
      `reach` of its wait): more may come after it, so the ceiling.
    - Otherwise the window's tail catches no one: `margin` x the `spread_percentile` spread, at least
      `floor_s`. Batches of one request spread over 0 s, so they wait `floor_s`.
    Returns the wait and why, for the log.
    """
    if ceiling_s <= 0 or not batches:
        return max(0.0, ceiling_s), "the rule's wait (no arrivals to learn from)"
    c = config
    n = len(batches)
    held_until_s = percentile((b.wait_s + b.held_s for b in batches), c.held_percentile, OBSERVED)
    held_past = percentile((b.held_s - max(c.held_fraction * b.wait_s, c.held_min_s) for b in batches),
                           c.held_percentile, OBSERVED)
    if held_past > 0:
        return ceiling_s, (f"formed batches sat for a busy device after their wait (median of {n}: "
                           f"{held_until_s * 1e3:.1f} ms from the first request to the run), so the device set "
                           f"their size, not the wait: the rule's {ceiling_s * 1e3:.1f} ms")
    spread_s = percentile((b.spread_s for b in batches), c.spread_percentile, OBSERVED)
    used = percentile((b.used for b in batches), c.spread_percentile, OBSERVED)
    if used > c.reach:
        return ceiling_s, (f"requests arrived until the end of the wait (90th percentile of {n} batches: "
                           f"{used:.0%} of it), so the rule's {ceiling_s * 1e3:.1f} ms")
    wait_s = min(ceiling_s, max(c.floor_s, c.margin * spread_s))
    return wait_s, (f"the requests of a batch arrived within {spread_s * 1e3:.1f} ms of each other (90th percentile "
                    f"of {n} batches, {used:.0%} of the wait), so {c.margin:g}x that, at least {c.floor_s * 1e3:g} ms, "
                    f"at most the rule's {ceiling_s * 1e3:.1f} ms")


# ----- what served batches show -----
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
    def from_probes(cls, probes: Iterable[ProbeResult]) -> "TunedLatency":
        return cls((p.batch_size, p.latency_s) for p in probes if p.ok and p.latency_s)

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
    """Served seconds / tuned seconds over the last `latency_window_batches` batches: the median,
    so that one stall (a size's first run) does not move it; None until they are enough."""

    def __init__(self, tuned: TunedLatency, config: WaitControllerConfig = DEFAULT_WAIT_CONFIG):
        self.tuned = tuned
        self._config = config
        self._ratios: deque[float] = deque(maxlen=config.latency_window_batches)
        self._seconds: deque[float] = deque(maxlen=config.latency_window_batches)
        self.recorded = 0  # batches recorded since the tuning in use

    def record(self, batch_size: int, seconds: float) -> None:
        expected = self.tuned(batch_size)
        if expected > 0 and seconds > 0:
            self._ratios.append(seconds / expected)
            self._seconds.append(seconds)
            self.recorded += 1

    @property
    def ratio(self) -> float | None:
        if not self._config.enough_batches(len(self._ratios), sum(self._seconds)):
            return None
        return statistics.median(self._ratios)


class ArrivalLog:
    """The last `window` batches that were not full, as BatchObservations. A full batch ended its
    wait early, so it says nothing about the wait and is not kept."""

    def __init__(self, window: int = DEFAULT_WAIT_CONFIG.arrival_window_batches):
        self._batches: deque[BatchObservation] = deque(maxlen=window)
        self.recorded = 0

    def record(self, arrivals_s: Sequence[float], started_s: float, max_batch_size: int, wait_s: float) -> None:
        if not arrivals_s or len(arrivals_s) >= max_batch_size:
            return
        self._batches.append(BatchObservation.of_batch(arrivals_s, started_s, wait_s))
        self.recorded += 1

    def batches(self, max_age_s: float | None = None,
                at_least: int = DEFAULT_WAIT_CONFIG.min_arrival_batches) -> list[BatchObservation]:
        """The batches recorded, oldest first: those that started within `max_age_s` of the newest,
        but at least the newest `at_least`. The age bound lets batches seconds apart replace an
        earlier burst's sooner than a window's worth of batches would."""
        kept = list(self._batches)
        if max_age_s is not None and kept:
            newest = kept[-1].started_s
            recent = [b for b in kept if b.started_s >= newest - max_age_s]
            kept = recent if len(recent) >= at_least else kept[-at_least:]
        return kept

    def clear(self) -> None:
        self._batches.clear()


# ----- the controller -----
class WaitState(enum.Enum):
    TUNED = "tuned"  # the tuning's wait holds; checked every `enough_batches`
    CHECKING_NEW_WAIT = "checking_new_wait"  # just moved; judged once `min_arrival_batches` formed under it
    LEARNT = "learnt"  # a served wait holds and was judged right; checked every `enough_batches`


@dataclass(frozen=True)
class LearntWait:
    """A wait the served batches moved to, and why."""

    wait_s: float
    reason: str


class WaitController:
    """One tuning's wait as served. `record` each served batch; when it returns True, `learnt`
    changed and the replica hands the new wait to its batcher."""

    def __init__(self, tuning: "Tuning", config: WaitControllerConfig = DEFAULT_WAIT_CONFIG):
        self.tuning = tuning
        self.config = config
        self.tuned_wait_s = float(tuning.batch_wait_timeout_s)
        try:
            self.latency: ServedLatency | None = ServedLatency(TunedLatency.from_probes(tuning.probes), config)
        except ValueError:  # a tuning with no timed probe (nothing fit): nothing to scale
            self.latency = None
        self.arrivals = ArrivalLog(window=config.arrival_window_batches)
        self.state = WaitState.TUNED
        self.learnt: LearntWait | None = None  # None until served batches moved the wait
        self.batches, self.seconds = 0, 0.0
        self._checked_at = (0, 0.0)  # (batches, seconds) at the last check that read the arrivals
        # Batches formed before the wait last moved describe a window that is gone: their arrivals
        # are not kept.
        self._moved_at_s = float("-inf")
        self.served_batch: ServedBatch | None = None  # the batch as served times re-decided it (optimizer/served.py)
        self._batch_checked_at = (0, 0.0)

    @property
    def wait_s(self) -> float | None:
        return self.learnt.wait_s if self.learnt else None

    @property
    def reason(self) -> str | None:
        return self.learnt.reason if self.learnt else None

    @property
    def current_s(self) -> float:
        return self.tuned_wait_s if self.learnt is None else self.learnt.wait_s

    @property
    def ratio(self) -> float | None:
        return self.latency.ratio if self.latency else None

    def record(self, arrivals_s: Sequence[float], started_s: float, elapsed_s: float, max_batch_size: int,
               wait_s: float, batch_size: int | None = None) -> bool:
        """A batch whose requests reached the batcher at `arrivals_s` (perf_counter seconds), began
        running at `started_s`, took `elapsed_s`, under these settings. True when the wait moved or
        the batch was re-decided (`served_batch`).
        `batch_size` (default: one per arrival) with no arrivals: a batch that did not pass through the
        wait (a tensor request's samples), whose time still counts."""
        self.batches += 1
        self.seconds += elapsed_s
        if self.latency is not None:
            self.latency.record(len(arrivals_s) if batch_size is None else batch_size, elapsed_s)
        if arrivals_s and min(arrivals_s) >= self._moved_at_s:
            self.arrivals.record(arrivals_s, started_s, max_batch_size, wait_s)
        moved = self._step()
        if moved:
            self._moved_at_s = started_s + elapsed_s  # the new wait applies to batches begun from here on
        return self._check_batch() or moved

    def _check_batch(self) -> bool:
        """The batch re-decided from the served times, once per `enough_batches`; True when it changed."""
        c = self.config
        if not c.enough_batches(self.batches - self._batch_checked_at[0], self.seconds - self._batch_checked_at[1]):
            return False
        self._batch_checked_at = (self.batches, self.seconds)
        decided = served_batch(self.tuning, self.ratio, lowered=self.served_batch is not None)
        if (decided and decided.size) == (self.served_batch and self.served_batch.size):
            return False
        self.served_batch = decided
        return True

    def _due(self) -> bool:
        if self.state is WaitState.CHECKING_NEW_WAIT:
            return True
        return self.config.enough_batches(self.batches - self._checked_at[0], self.seconds - self._checked_at[1])

    def _step(self) -> bool:
        """One transition. A check that is due but finds too few batches short of full (full batches,
        where the wait did not matter, or batches formed before the last move) stays due, so it is
        tried again at the next batch; only the tuning's own wait may be re-scaled without arrivals."""
        if not self._due():
            return False
        c = self.config
        recent = self.arrivals.batches(max_age_s=c.arrivals_max_age_s, at_least=c.min_arrival_batches)
        enough_arrivals = len(recent) >= c.min_arrival_batches
        if not enough_arrivals and self.state is not WaitState.TUNED:
            return False
        self._checked_at = (self.batches, self.seconds)
        if self.state is WaitState.CHECKING_NEW_WAIT:
            self.state = WaitState.LEARNT
        ceiling_s, why = self._ceiling()
        if enough_arrivals:
            wait_s, arrivals_why = wait_from_arrivals(ceiling_s, recent, c)
        else:
            wait_s, arrivals_why = ceiling_s, "too few batches short of full to read the arrivals from yet"
        current = self.current_s
        if abs(wait_s - current) <= c.move_fraction * max(current, c.floor_s):
            return False
        self.learnt = LearntWait(wait_s, f"{why}; {arrivals_why}: {current * 1e3:.1f} -> {wait_s * 1e3:.1f} ms")
        self.arrivals.clear()
        self.state = WaitState.CHECKING_NEW_WAIT
        return True

    def _ceiling(self) -> tuple[float, str]:
        """The rule's wait at the times batches take as served (the tuning's own without a ratio
        yet), and why."""
        t, ratio, c = self.tuning, self.ratio, self.config
        if ratio is not None:
            batch1_s = self.latency.tuned(1)
            # the batch served: the tuned one, or the one the served times re-decided (then its own
            # time and throughput, not the tuned batch's, set how long a wait the budget leaves)
            lowered = self.served_batch.size if self.served_batch is not None else None
            tuned_s = self.latency.tuned(lowered) if lowered else t.serve_latency_s
            serve_latency_s = tuned_s * ratio
            throughput = lowered / tuned_s if lowered else t.serve_throughput
            ceiling_s = batch_wait_timeout_s(serve_latency_s, t.latency_budget_s, batch1_s * ratio,
                                             (t.batch1_throughput or 1 / batch1_s) / ratio,
                                             throughput / ratio, c.budget_fraction)
            return ceiling_s, (f"served batches take {ratio:.2f}x the tuning's time for their size (batch 1: "
                               f"{batch1_s * ratio * 1e3:.1f} ms), so the tuning's rule gives {ceiling_s * 1e3:.1f} ms")
        return self.tuned_wait_s, f"the tuning's {self.tuned_wait_s * 1e3:.1f} ms"


__all__ = ["WaitControllerConfig", "DEFAULT_WAIT_CONFIG", "batch_wait_timeout_s", "wait_from_arrivals",
           "BatchObservation", "TunedLatency", "ServedLatency", "ArrivalLog", "WaitState", "LearntWait",
           "WaitController"]
