"""Admission: a replica refuses, fast, the requests it cannot answer in time, instead of queueing them.

Ray Serve's own bound (`max_queued_requests`, set by the app builder) is fixed when the app is
deployed, before the tuning exists; a replica queues up to max_ongoing_requests (twice the largest
batch the tuning may choose) beyond it. This module bounds what a replica queues by what it knows
once tuned: the batch size, how long a batch takes, the wait and the latency budget.

Rules (pure, no Ray; `Admission` holds the counts, the route glue calls it):
  wait     a request of n samples arriving behind `pending` samples completes after about
           ceil((pending + n) / batch_size) batches of `batch_time_s` each, plus one batch wait.
  bound    that expected time may be at most 2 latency budgets + one batch + its wait: a served
           request's latency stays within twice the budget plus the batch in flight. The bound is
           never below two batches + the wait (one computing, one filling), so that a batch slower
           than the budget (a pinned size, a slow device) still finds the next one formed when it
           ends and the device never idles for admission. A replica with nothing pending admits.
  deadline a client may send its own bound (DEADLINE_HEADER, milliseconds from arrival, or the
           Open Inference Protocol's `timeout` parameter, through `admit(deadline_s=...)`): a
           request whose expected time exceeds it is refused before it takes a batch slot, and one
           whose deadline passed while it queued is dropped from its batch before compute.
  samples  a request carries at most REQUEST_BATCHES x the max batch (the builder's `max_batch`, the
           largest batch the tuning may try, or the served size where a pin set it higher): more is
           413 with the bound, before anything is decoded. A request of many samples is decoded whole
           before its first batch and holds the device for its batches, so it must stay a few of
           the largest; what its samples cost in memory is bounded by the memory rule below.
  memory   every admitted sample is charged at the tuning's fitted peak per sample (measured at the
           worst input the tuning ran, e.g. the longest prompt + max_new_tokens for the Llama),
           every pending request's body at its size, and its decoded samples at what decoding makes
           of them (`decoded_bytes`, counted before decoding: all of a request's samples are decoded
           before its first batch); a batch of the costliest `batch_size` pending samples plus the
           bodies and decoded samples must fit the replica's memory budget above its base. A
           request that could never fit is 413, one that does not fit now is 503.

Answers: refused for time or memory now -> 503 with Retry-After (the seconds the queue needs to
drain, at least 1), JSON {"error": ...} saying to retry; deadline passed while queued -> 504 (the
request was accepted and its time ran out waiting, as a gateway's timeout); too large ever -> 413.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from .batcher import SERVED_BATCH_PERCENTILE, SERVED_BATCH_WINDOW, ServedBatchTimes  # noqa: F401 - their home is the batcher

DEADLINE_HEADER = "request-timeout-ms"  # the client's bound, in milliseconds from the request's arrival
BOUND_LATENCY_BUDGETS = 2.0  # a served request's expected time is bounded by this many latency budgets
MIN_BATCHES_IN_BOUND = 2  # never fewer: one batch computing, the next one filling
SHED_REASONS = ("overload", "deadline", "expired", "memory", "samples")
REQUEST_BATCHES = 4  # a request carries at most this many of the replica's largest batches


class Refused(Exception):
    """A request this replica will not take now; `status`, `message`, `retry_after_s` make the answer."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


def parse_deadline_ms(value: str | None) -> float | None:
    """The header's value in seconds (None when absent); ValueError with what to send instead."""
    if value is None or value.strip() == "":
        return None
    try:
        ms = float(value)
    except ValueError:
        raise ValueError(f"{DEADLINE_HEADER} must be a number of milliseconds, got {value!r}") from None
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"{DEADLINE_HEADER} must be a positive, finite number of milliseconds, got {value!r}")
    return ms / 1e3


@dataclass(frozen=True)
class Capacity:
    """What the tuning (and serving) says about this replica's speed and memory."""

    batch_size: int
    batch_time_s: float  # one batch of batch_size
    wait_s: float  # batch_wait_timeout_s in force
    latency_budget_s: float
    headroom_bytes: float | None = None  # memory budget above the base; None: not bounded by memory
    per_sample_bytes: float = 0.0
    max_request_samples: int | None = None  # samples one request may carry; None: no bound


    def bound_s(self, batch_time_s: float) -> float:
        """The most a request may expect to wait, when a batch takes `batch_time_s` (served or tuned)."""
        budgets = BOUND_LATENCY_BUDGETS * self.latency_budget_s + batch_time_s
        return max(budgets, MIN_BATCHES_IN_BOUND * batch_time_s) + self.wait_s


class Ticket:
    """One admitted request; `release()` once answered (idempotent). `deadline_at` is on
    time.perf_counter's clock, None without a deadline."""

    def __init__(self, admission: "Admission", samples: int, body_bytes: int, deadline_at: float | None,
                 decoded_bytes: int = 0):
        self._admission = admission
        self.samples, self.body_bytes, self.deadline_at = samples, body_bytes, deadline_at
        self.decoded_bytes = decoded_bytes
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Admission:
    """The counts of one replica and the decision. Thread-safe (routes run on the event loop, a
    future caller may not). `set_capacity` whenever the tuning or the batch settings change."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, served: ServedBatchTimes | None = None):
        """`served`: the batcher's record of its full batches' times (serve/replica/batcher.py), which the bound reads."""
        self._clock = clock
        self._lock = threading.Lock()
        self._capacity: Capacity | None = None
        self._pending_samples = 0
        self._pending_body_bytes = 0
        self._pending_decoded_bytes = 0
        self._served = served if served is not None else ServedBatchTimes()

    # ----- what the replica tells it -----
    def set_capacity(self, capacity: Capacity) -> None:
        with self._lock:
            self._capacity = capacity
            self._served.expect(capacity.batch_size)  # another size: the tuning's time until batches show theirs

    def record_batch(self, size: int, elapsed_s: float) -> None:
        """A batch ran: only full batches say how long a batch of batch_size takes (kept by the batcher's
        ServedBatchTimes, which the replica records into directly)."""
        self._served.record(size, elapsed_s)

    @property
    def pending_samples(self) -> int:
        return self._pending_samples

    def batch_time_s(self) -> float:
        """The larger of the tuned and the served time of a full batch (SERVED_BATCH_PERCENTILE of the
        last SERVED_BATCH_WINDOW): a slower served batch wins."""
        cap = self._capacity
        served = self._served.time_s
        return cap.batch_time_s if served is None else max(cap.batch_time_s, served)

    def expected_s(self, samples: int = 1) -> float:
        """Seconds until a request of `samples` arriving now is answered, as the queue stands."""
        cap = self._capacity
        if cap is None:
            return 0.0
        batches = math.ceil((self._pending_samples + samples) / cap.batch_size)
        return batches * self.batch_time_s() + cap.wait_s

    # ----- the decision -----
    def max_request_samples(self) -> int | None:
        """The most samples one request may carry now (None until tuned)."""
        cap = self._capacity
        return None if cap is None else cap.max_request_samples

    def admit(self, deadline_s: float | None = None, samples: int = 1, body_bytes: int = 0,
              decoded_bytes: int = 0) -> Ticket:
        """A Ticket for a request of `samples` with the client's bound `deadline_s` (seconds from now,
        None: none), or Refused. `decoded_bytes`: what its samples will take once decoded (charged
        from now, before decoding). The caller releases the ticket once the request is answered."""
        now = self._clock()
        with self._lock:
            cap = self._capacity
            if cap is not None:
                self._check(cap, deadline_s, samples, body_bytes + decoded_bytes)
            self._pending_samples += samples
            self._pending_body_bytes += body_bytes
            self._pending_decoded_bytes += decoded_bytes
        return Ticket(self, samples, body_bytes, None if deadline_s is None else now + deadline_s, decoded_bytes)

    def _check(self, cap: Capacity, deadline_s: float | None, samples: int, body_bytes: int) -> None:
        """`body_bytes`: the request's body and its decoded samples, the memory it holds until answered."""
        if cap.max_request_samples is not None and samples > cap.max_request_samples:
            raise Refused(413, "samples",
                          f"this request carries {samples} samples, over this replica's limit of "
                          f"{cap.max_request_samples} per request ({REQUEST_BATCHES} x its largest batch of "
                          f"{cap.max_request_samples // REQUEST_BATCHES}); split it into requests of at most "
                          f"{cap.max_request_samples} samples")
        expected = self.expected_s(samples)
        drain_s = math.ceil(self._pending_samples / cap.batch_size) * self.batch_time_s()
        if deadline_s is not None and expected > deadline_s:
            raise Refused(503, "deadline",
                          f"this request cannot be answered within its {DEADLINE_HEADER} of {deadline_s * 1e3:.0f} ms: "
                          f"{self._pending_samples} samples are ahead of it, about {expected:.2f} s of work; "
                          f"retry later or allow more time", retry_after_s=max(drain_s, 1.0))
        bound_s = cap.bound_s(self.batch_time_s())
        # A batch time not known yet (nothing timed, nothing served): one batch computing, one filling.
        unknown_over = self.batch_time_s() <= 0 and self._pending_samples + samples > 2 * cap.batch_size
        if self._pending_samples > 0 and (expected > bound_s or unknown_over):
            raise Refused(503, "overload",
                          f"the replica is at capacity: {self._pending_samples} samples are ahead of this request, "
                          f"about {expected:.2f} s of work, over its bound of {bound_s:.2f} s "
                          f"({BOUND_LATENCY_BUDGETS:g} latency budgets + one batch, at least {MIN_BATCHES_IN_BOUND} batches); "
                          f"retry later",
                          retry_after_s=max(drain_s, 1.0))
        if cap.headroom_bytes is None:
            return
        need = min(samples, cap.batch_size) * cap.per_sample_bytes + body_bytes
        if need > cap.headroom_bytes:
            raise Refused(413, "memory",
                          f"this request needs about {need / 2**20:.0f} MiB to serve, more than the "
                          f"{cap.headroom_bytes / 2**20:.0f} MiB this replica has above its model; send fewer samples "
                          f"or a smaller body")
        in_batch = min(self._pending_samples + samples, cap.batch_size)
        charged = (in_batch * cap.per_sample_bytes + self._pending_body_bytes + self._pending_decoded_bytes
                   + body_bytes)
        if charged > cap.headroom_bytes:
            raise Refused(503, "memory",
                          f"the replica's memory share is taken by the requests ahead of this one (about "
                          f"{charged / 2**20:.0f} MiB of {cap.headroom_bytes / 2**20:.0f} MiB); retry later",
                          retry_after_s=max(drain_s, 1.0))

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._pending_samples -= ticket.samples
            self._pending_body_bytes -= ticket.body_bytes
            self._pending_decoded_bytes -= ticket.decoded_bytes

    def room(self, replica: str = "") -> dict:
        """What a router needs to shed for this replica (serve/oip/shed.py), sent back with every
        answer: the most samples it admits pending (the overload rule solved for the queue:
        ceil(p / batch_size) batches + the wait within the bound), the samples pending now and the
        seconds they take to drain. room_samples None: not tuned yet, nothing to shed by."""
        cap = self._capacity
        if cap is None:
            return {"replica": replica, "room_samples": None}
        batch_s = self.batch_time_s()
        if batch_s > 0:
            room = math.floor((cap.bound_s(batch_s) - cap.wait_s) / batch_s + 1e-9) * cap.batch_size
        else:  # no batch time known yet: one batch computing, one filling (the rule in _check)
            room = 2 * cap.batch_size
        pending = self._pending_samples
        return {"replica": replica, "room_samples": max(room, cap.batch_size), "pending_samples": pending,
                "drain_s": math.ceil(pending / cap.batch_size) * batch_s}

    def describe(self) -> dict:
        """What GET /tuning shows under serving.admission."""
        cap = self._capacity
        if cap is None:
            return {"capacity": None}
        return {"pending_samples": self._pending_samples, "pending_body_bytes": self._pending_body_bytes,
                "pending_decoded_bytes": self._pending_decoded_bytes, "max_request_samples": cap.max_request_samples,
                "batch_time_s": self.batch_time_s(), "bound_s": cap.bound_s(self.batch_time_s()),
                "expected_s_for_one_more": self.expected_s(1),
                "memory_headroom_bytes": cap.headroom_bytes, "per_sample_bytes": cap.per_sample_bytes}


def capacity_from(tuning, size: int, wait_s: float) -> Capacity:
    """The Capacity of a replica serving batches of `size` with `wait_s` under `tuning`: the batch
    time the tuning measured at that size (optimizer.wait.TunedLatency), and the memory the tuning
    fitted. The headroom is never below what the tuning ran within budget (max_safe_batch samples)."""
    from optimizer.wait import TunedLatency

    try:  # every timed probe counts, over the latency budget too: a pinned size may be one of those
        # overlapped batches (a period) follow one another faster than each one takes
        batch_time_s = TunedLatency((p.batch_size, p.period_s or p.latency_s) for p in tuning.probes if p.latency_s)(size)
    except ValueError:  # no timed probe (a hand-made tuning): the one latency it states, if any
        batch_time_s = float(tuning.serve_latency_s or 0.0)
    latency_budget_s = tuning.latency_budget_s or batch_time_s
    # the configured max batch, not the max safe one: on a slow CPU that can be 1, and a request of
    # 32 samples is still a fine way to send them (the memory rule bounds what they cost)
    max_request_samples = REQUEST_BATCHES * max(int(tuning.max_batch or 0), int(size), 1)
    fit = tuning.memory_fit
    if fit is None or not fit.per_sample_bytes or fit.per_sample_bytes <= 0:
        return Capacity(size, batch_time_s, wait_s, latency_budget_s, max_request_samples=max_request_samples)
    per_sample = float(fit.per_sample_bytes)
    headroom = max(tuning.memory_budget_bytes - tuning.base_bytes, tuning.max_safe_batch * per_sample)
    return Capacity(size, batch_time_s, wait_s, latency_budget_s, headroom_bytes=float(headroom),
                    per_sample_bytes=per_sample, max_request_samples=max_request_samples)


def expired_message(waited_s: float) -> str:
    return (f"this request's {DEADLINE_HEADER} passed while it waited {waited_s:.2f} s for a batch, so it was "
            f"not computed; retry with more time or later")


async def run_unexpired(items: Sequence, run: Callable[[list], Awaitable[list]], now: float,
                        expired: Callable[[object], object]) -> list:
    """Run the items whose deadline (`item.deadline_at`) has not passed at `now`; every other item
    gets `expired(item)` instead, in its place, and takes no part in the batch."""
    alive = [getattr(item, "deadline_at", None) is None or item.deadline_at > now for item in items]
    if all(alive):
        return await run(list(items))
    live = [item for item, ok in zip(items, alive) if ok]
    answers = iter(await run(live) if live else [])
    return [next(answers) if ok else expired(item) for item, ok in zip(items, alive)]
