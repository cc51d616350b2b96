"""How requests become device batches: one object, the replica's `Batcher`.

An `Entry` is one request: its decoded samples, in order, and one future for their answers. Every
route puts its requests here (the simple POST route one sample each, the Open Inference Protocol
route many), and the batcher forms a device batch when one of its `slots` frees and either
  - the samples waiting fill a batch (`max_batch_size`), or
  - the oldest waiting request has waited `batch_wait_timeout_s` (Ray Serve's @serve.batch rule:
    a batch closes that long after its first request), or
  - the oldest waiting request brings its own batch (`waits=False`: a request of many samples is
    not held back for others to join it).
A batch takes the waiting requests oldest first, by sample count, up to the max batch: a request
larger than the room left is split over batches, never reordered, and its future is answered once
all of its samples are. A failure of the whole batch fails the requests in it; a sample that fails
alone (batch_runner.py) fails only its request; a request whose caller has gone (its future
cancelled) is not computed.

While the device is busy, what arrives waits here, and the next batch is all of it (up to the max),
formed the moment a slot frees: Triton's dynamic batcher and vLLM's scheduler form batches the same
way, when the engine can take one. `slots` is how many device batches may be in flight: 2 where the
spec's stages overlap (the next batch is prepared while this one computes), 1 otherwise.

Mechanism only. The size and the wait are set through the public setters by policy
(serve/replica/settings.py `effective_settings`, the wait rule and controller in optimizer/wait.py), as
Ray Serve's own batch queue is; `run(batch) -> outcomes` (the replica's, one per sample) runs a
formed batch. The batcher also keeps how long its full batches took (`served`, what admission's
bound reads: serve/replica/admission.py), and a batch cuts itself where an out-of-memory halves it
(`Batch.split`, which serve/replica/batch_runner.py calls).
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, Sequence

from optimizer.stats import percentile

log = logging.getLogger("ray.serve")

# The batch time a bound on served latency's tail must use is a tail too: the 90th percentile of
# the last full batches, not their mean (their swing, and decodes sharing the replica's CPU, would
# otherwise put admitted requests past the bound).
SERVED_BATCH_WINDOW = 20
SERVED_BATCH_PERCENTILE = 90.0


class ServedBatchTimes:
    """How long the last SERVED_BATCH_WINDOW full batches (of the size `expect` named) took: their
    SERVED_BATCH_PERCENTILE is `time_s` (None until one is recorded). Thread-safe."""

    def __init__(self, window: int = SERVED_BATCH_WINDOW, pct: float = SERVED_BATCH_PERCENTILE):
        self._times: deque[float] = deque(maxlen=window)
        self._pct = pct
        self._size: int | None = None
        self._lock = threading.Lock()
        self.time_s: float | None = None

    def expect(self, size: int) -> None:
        """Batches of `size` are full from now on; another size forgets the times recorded."""
        with self._lock:
            if size != self._size:
                self._size, self.time_s = size, None
                self._times.clear()

    def record(self, size: int, elapsed_s: float) -> None:
        """A batch ran: only full batches say how long a batch of the expected size takes."""
        with self._lock:
            if self._size is None or size != self._size or not math.isfinite(elapsed_s):
                return
            self._times.append(elapsed_s)
            self.time_s = percentile(self._times, self._pct)  # once per batch, not per admission


@dataclass(eq=False)
class Entry:
    """One request waiting for the device: its samples (a list, or a tensor sliced along its first
    dimension), counted by their number; answered once, with one outcome per sample, in order."""

    samples: Sequence
    keep_value: bool = False  # True: outcomes keep the encoded value (a tensor request gathers them); else JSON bytes
    deadline_at: float | None = None  # perf_counter time past which it is not computed (serve/replica/admission.py)
    poisoned: bool = False  # a test fault (serve/replica/faults.py)
    waits: bool = True  # False: it brings its own batch; not held for the wait, nor counted by the wait's controller
    arrived_s: float = field(default_factory=time.perf_counter)
    future: asyncio.Future | None = field(default=None, repr=False)
    taken: int = 0  # samples already put in a batch
    _outcomes: list | None = field(default=None, repr=False)
    _answered: int = 0

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def gone(self) -> bool:
        """Its caller is no longer waiting (cancelled) or it is answered already (a batch failed)."""
        return self.future is not None and self.future.done()

    def _answer(self, start: int, outcomes: Sequence) -> None:
        if self.future is None or self.future.done():
            return
        if start == 0 and len(outcomes) == self.n:  # the whole request in one batch: the common case
            self.future.set_result(list(outcomes))
            return
        if self._outcomes is None:
            self._outcomes = [None] * self.n
        self._outcomes[start:start + len(outcomes)] = outcomes
        self._answered += len(outcomes)
        if self._answered >= self.n:
            self.future.set_result(self._outcomes)

    def _fail(self, exc: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))


@dataclass(eq=False)
class Slice:
    """The samples [start, stop) of one request that a batch holds."""

    entry: Entry
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def poisoned(self) -> bool:
        return self.entry.poisoned

    @property
    def deadline_at(self) -> float | None:
        return self.entry.deadline_at

    @property
    def samples(self) -> Sequence:
        e = self.entry
        return e.samples if self.start == 0 and self.stop == e.n else e.samples[self.start:self.stop]


class Batch:
    """The slices one device batch holds, in order. len() is its sample count; iterating yields its
    slices (each has `.poisoned`, what serve/replica/faults.py reads)."""

    __slots__ = ("slices", "size")

    def __init__(self, slices: list[Slice]):
        self.slices = slices
        self.size = sum(s.n for s in slices)

    @classmethod
    def of(cls, samples: Sequence, keep_value: bool = False) -> "Batch":
        """One request of `samples` as a batch (tests, warm-ups)."""
        entry = Entry(list(samples), keep_value=keep_value)
        return cls([Slice(entry, 0, entry.n)])

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Slice]:
        return iter(self.slices)

    def samples(self) -> list:
        if len(self.slices) == 1:
            return list(self.slices[0].samples)
        out: list = []
        for s in self.slices:
            out.extend(s.samples)
        return out

    def keep_values(self) -> Iterator[bool]:
        """Per sample, whether its request keeps the encoded value."""
        for s in self.slices:
            for _ in range(s.n):
                yield s.entry.keep_value

    def split(self, at: int) -> tuple["Batch", "Batch"]:
        """The first `at` samples and the rest (an out-of-memory halves a batch: batch_runner.py)."""
        left, right, seen = [], [], 0
        for s in self.slices:
            if seen + s.n <= at:
                left.append(s)
            elif seen >= at:
                right.append(s)
            else:
                cut = s.start + (at - seen)
                left.append(Slice(s.entry, s.start, cut))
                right.append(Slice(s.entry, cut, s.stop))
            seen += s.n
        return Batch(left), Batch(right)

    def each(self) -> list["Batch"]:
        """One batch per sample (a failed batch is retried sample by sample: batch_runner.py)."""
        return [Batch([Slice(s.entry, i, i + 1)]) for s in self.slices for i in range(s.start, s.stop)]

    def arrivals(self) -> list[float]:
        """Per sample, when its request arrived; empty where a request did not wait (the wait's controller
        learns only from requests that went through the wait)."""
        if any(not s.entry.waits for s in self.slices):
            return []
        return [s.entry.arrived_s for s in self.slices for _ in range(s.n)]


class Batcher:
    """`run(batch)` answers a formed batch: one outcome per sample, in order."""

    def __init__(self, run: Callable[[Batch], Awaitable[Sequence]], max_batch_size: int = 1,
                 batch_wait_timeout_s: float = 0.0, slots: int = 1, clock: Callable[[], float] = time.perf_counter):
        self._run = run
        self._clock = clock
        self._max_batch_size = max(1, int(max_batch_size))
        self._wait_s = max(0.0, float(batch_wait_timeout_s))
        self._slots = max(1, int(slots))
        self._in_flight = 0
        self._waiting: deque[Entry] = deque()
        self._waiting_samples = 0
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._batches = 0
        self._coalesced_batches = 0  # device batches holding more than one request
        self._split_requests = 0  # requests spread over more than one batch
        self.served = ServedBatchTimes()  # full batches' times, which admission's bound reads

    # ----- public setters and reads -----
    def set_max_batch_size(self, size: int) -> None:
        self._max_batch_size = max(1, int(size))
        self._poke()

    def set_batch_wait_timeout_s(self, wait_s: float) -> None:
        self._wait_s = max(0.0, float(wait_s))
        self._poke()

    def set_slots(self, slots: int) -> None:
        self._slots = max(1, int(slots))
        self._poke()

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def batch_wait_timeout_s(self) -> float:
        return self._wait_s

    @property
    def waiting_samples(self) -> int:
        return self._waiting_samples

    @property
    def waiting_requests(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def describe(self) -> dict:
        return {"slots": self._slots, "waiting_samples": self._waiting_samples, "waiting_requests": len(self._waiting),
                "batches_in_flight": self._in_flight, "device_batches": self._batches,
                "coalesced_batches": self._coalesced_batches, "split_requests": self._split_requests}

    # ----- the queue -----
    async def submit(self, entry: Entry) -> list:
        """Queue one request and return its outcomes, one per sample, in order, whichever batches its
        samples end up in. Cancelling the caller drops what of it has not been computed."""
        loop = asyncio.get_running_loop()
        if entry.n == 0:
            return []
        entry.future = loop.create_future()
        self._waiting.append(entry)
        self._waiting_samples += entry.n
        self._ensure_driver(loop)
        self._poke()
        return await entry.future

    def _ensure_driver(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._driver is None or self._driver.done():
            if self._driver is not None and not self._driver.cancelled() and self._driver.exception():
                log.error("autobatch: the batcher's driver had stopped (%r); restarted", self._driver.exception())
            self._driver = loop.create_task(self._drive(), name="autobatch-batcher")

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _drop_gone(self) -> None:
        while self._waiting and self._waiting[0].gone:
            entry = self._waiting.popleft()
            self._waiting_samples -= entry.n - entry.taken

    def _ready_in_s(self) -> float:
        """Seconds until a batch may form from what waits (0: now)."""
        head = self._waiting[0]
        if self._waiting_samples >= self._max_batch_size or not head.waits or self._wait_s <= 0:
            return 0.0
        return head.arrived_s + self._wait_s - self._clock()

    async def _drive(self) -> None:
        """Form a batch whenever a slot is free and what waits may go."""
        while True:
            self._drop_gone()
            if not self._waiting or self._in_flight >= self._slots:
                self._wake.clear()
                await self._wake.wait()
                continue
            remaining = self._ready_in_s()
            if remaining > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take()
            if batch.size:
                self._in_flight += 1
                asyncio.get_running_loop().create_task(self._run_batch(batch))

    def _take(self) -> Batch:
        slices: list[Slice] = []
        room = self._max_batch_size
        while self._waiting and room > 0:
            entry = self._waiting[0]
            if entry.gone:  # its caller was cancelled (the client went away): nothing more to compute
                self._waiting.popleft()
                self._waiting_samples -= entry.n - entry.taken
                continue
            count = min(room, entry.n - entry.taken)
            if entry.taken or count < entry.n - entry.taken:
                self._split_requests += entry.taken == 0
            slices.append(Slice(entry, entry.taken, entry.taken + count))
            entry.taken += count
            self._waiting_samples -= count
            room -= count
            if entry.taken == entry.n:
                self._waiting.popleft()
        batch = Batch(slices)
        if slices:
            self._batches += 1
            self._coalesced_batches += len(slices) > 1
        return batch

    async def _run_batch(self, batch: Batch) -> None:
        try:
            outcomes = await self._run(batch)
            if len(outcomes) != batch.size:
                raise RuntimeError(f"a batch of {batch.size} returned {len(outcomes)} outcomes")
            at = 0
            for s in batch.slices:
                s.entry._answer(s.start, outcomes[at:at + s.n])
                at += s.n
        except BaseException as exc:  # noqa: BLE001 - every waiting caller hears of it, then the next batch runs
            for s in batch.slices:
                s.entry._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._poke()
