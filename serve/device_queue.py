"""Samples waiting for the device, formed into a batch when the device can take one.

Ray's `@serve.batch` closes a batch by the clock: `batch_wait_timeout_s` after its first request,
whether or not the device is free. While a batch computes, the clock keeps closing small batches
that then queue for the device one behind the other; on an H100 ResNet-50 served batches of ~30
where the tuning chose 200, and every one paid a device round trip (docs/benchmarks.md §8).

This queue sits between the two. Every batch `@serve.batch` forms is put here at once (the
deployment lets many in: `max_concurrent_batches` is high), and a batch for the device is taken
only when one of its `slots` frees: everything waiting, oldest first, up to `max_batch_size`. At
light load that is the batch Ray formed, as before; under load it is all that arrived while the
device was busy, however many clock batches that was. Triton's dynamic batcher and vLLM's scheduler
form batches the same way: when the engine can take one.

Mechanism only: the caller passes `run(items) -> outcomes` (the replica's batch runner) and sets
the size; which size, and the wait, are policy (serve/settings.py, optimizer/wait.py). A sample
keeps its place: a clock batch may be split over two device batches, never reordered.

`slots` is how many device batches may be in flight: 2 where the spec's stages overlap (the next
one is prepared while this one computes), 1 otherwise, so a batch is formed the moment the stage
it enters frees, from everything that arrived until then.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

log = logging.getLogger("ray.serve")

T = TypeVar("T")
R = TypeVar("R")


class DeviceQueue(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], max_batch_size: int = 1, slots: int = 1):
        self._run = run
        self._max_batch_size = max(1, int(max_batch_size))
        self._slots = max(1, int(slots))
        self._in_flight = 0
        self._waiting: deque[tuple[T, int, asyncio.Future]] = deque()  # (item, which put() it came in, its answer)
        self._puts = 0
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._batches = 0
        self._coalesced_batches = 0  # device batches that took samples from more than one put()

    # ----- public setters and reads -----
    def set_max_batch_size(self, size: int) -> None:
        self._max_batch_size = max(1, int(size))

    def set_slots(self, slots: int) -> None:
        self._slots = max(1, int(slots))
        self._poke()

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def waiting_samples(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def describe(self) -> dict:
        return {"slots": self._slots, "waiting_samples": len(self._waiting), "batches_in_flight": self._in_flight,
                "device_batches": self._batches, "coalesced_batches": self._coalesced_batches}

    # ----- the queue -----
    async def put(self, items: Sequence[T]) -> list[R]:
        """Queue `items` (one batch of @serve.batch) and return their outcomes in order, whichever
        device batches they end up in."""
        loop = asyncio.get_running_loop()
        self._puts += 1
        futures = [loop.create_future() for _ in items]
        self._waiting.extend((item, self._puts, future) for item, future in zip(items, futures))
        self._ensure_driver(loop)
        self._poke()
        return list(await asyncio.gather(*futures))

    def _ensure_driver(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._driver is None or self._driver.done():
            if self._driver is not None and not self._driver.cancelled() and self._driver.exception():
                log.error("autobatch: the device queue's driver had stopped (%r); restarted",
                          self._driver.exception())
            self._driver = loop.create_task(self._drive(), name="autobatch-device-queue")

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _drive(self) -> None:
        """Form a batch whenever a slot is free and samples wait."""
        while True:
            while not self._waiting or self._in_flight >= self._slots:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run_batch(batch))

    def _take(self) -> list[tuple[T, int, asyncio.Future]]:
        batch = []
        while self._waiting and len(batch) < self._max_batch_size:
            entry = self._waiting.popleft()
            if entry[2].done():  # its caller was cancelled (the client went away): nothing to compute
                continue
            batch.append(entry)
        if batch:
            self._batches += 1
            self._coalesced_batches += len({put for _, put, _ in batch}) > 1
        return batch

    async def _run_batch(self, batch: list[tuple[T, int, asyncio.Future]]) -> None:
        try:
            outcomes = await self._run([item for item, _, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(outcomes)} outcomes")
            for (_, _, future), outcome in zip(batch, outcomes):
                if not future.done():
                    future.set_result(outcome)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller hears of it, then the next batch runs
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._poke()
