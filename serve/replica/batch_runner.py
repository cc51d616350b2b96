"""Running one formed batch, so that only what fails fails.

Mechanism, apart from the deployment's policy: the forward pass runs in the replica's one worker
thread (the event loop keeps queueing the next batch); an out-of-memory splits the batch in halves
and retries each (the deployment is told, and lowers its max batch); any other error retries the
batch sample by sample, so one bad input gets its own 4xx and its batch-mates are answered.

A spec whose stages overlap (ModelSpec.overlaps: on a GPU, the next batch's copy and JPEG decode
beside this batch's forward) runs in two: `prepare` in a thread of its own under the `prepare`
lock, then `forward` in the worker thread under the `forward` lock, so that while one batch
computes the next one is put on the device (DeviceLocks). Other specs run `predict` whole under
the `forward` lock. A tuning or a warm-up holds both locks (`exclusive`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from wire import PayloadError

from .batcher import Batch

log = logging.getLogger("ray.serve")

# Errors a model raises when an input is wrong, not when the model or the replica is: answered 422.
INPUT_ERRORS = ("ValueError", "TypeError", "KeyError", "IndexError", "InjectedFault")


@dataclass
class Outcome:
    """One sample's answer: an HTTP status and a JSON body, or, for an item that keeps its value,
    what the spec's encode returned."""

    status: int
    body: bytes
    value: object = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @classmethod
    def error(cls, status: int, message: str) -> "Outcome":
        return cls(status, json.dumps({"error": message}).encode())


class DeviceLocks:
    """Who may use the model's device when: `prepare` is held by the batch being put on the
    device, `forward` by the batch being computed; `exclusive()` holds both, for a tuning or a
    warm-up, which must have the device to themselves. A batch never holds one while waiting for
    the other, so the two orders cannot deadlock."""

    def __init__(self):
        self.prepare = asyncio.Lock()
        self.forward = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self.prepare:
            async with self.forward:
                yield


@dataclass
class BatchResult:
    """A batch's answers, and when its stages ran (perf_counter seconds) when it ran whole:
    `latency_s` its prepare and forward (the batch's own time), `period_s` the longer of the two
    stages (at steady state, what each batch adds: the other stage overlaps it; both when the
    stages do not overlap). None where the batch was split or retried."""

    outcomes: list
    started_s: float | None = None
    latency_s: float | None = None
    period_s: float | None = None


class BatchRunner:
    """`run(batch)` answers every sample of a batch (serve/replica/batcher.py's Batch: slices of requests). The deployment passes what a batch needs:
    the spec (predict, encode), the meter (is this an OOM; clean up after one), the worker
    thread, its metrics, `before_predict` (the fault hooks of the moment), and `on_oom(batch_size,
    message)` to learn from a real out-of-memory."""

    def __init__(self, spec, meter, executor: Executor, metrics, *, model_name: str,
                 before_predict: Callable[[Batch], None], on_oom: Callable[[int, str], None],
                 locks: DeviceLocks | None = None, prepare_executor: Executor | None = None):
        self.spec, self.meter, self.metrics = spec, meter, metrics
        self._executor = executor
        self._prepare_executor = prepare_executor or executor
        self.locks = locks or DeviceLocks()
        self._model_name = model_name
        self._before_predict = before_predict
        self._on_oom = on_oom
        self.item_retries = 0  # batches that failed for a reason other than memory and were retried item by item
        self.overlapped_batches = 0  # batches whose prepare began while another batch computed

    @property
    def overlaps(self) -> bool:
        """Whether batches run in two overlapping stages: the spec's say, and a thread to prepare in."""
        return self._prepare_executor is not self._executor and bool(self.spec.overlaps())

    def _prepare(self, batch: Batch):
        """In the prepare thread: the batch put on the device (the spec's first stage)."""
        self._before_predict(batch)
        return self.spec.prepare(batch.samples())

    def _forward(self, batch: Batch, prepared=None) -> list[Outcome]:
        """In the worker thread: one forward pass over the batch (the whole predict, or the second
        stage on what `_prepare` made), then the batch's outputs encoded in one pass, one outcome per
        sample (the batcher splits them per request). A PayloadError in place of an output (a JPEG
        only the batch decode found corrupt) is that sample's 4xx, and so its request's."""
        if prepared is None:
            self._before_predict(batch)
            outputs = self.spec.predict(batch.samples())
        else:
            outputs = self.spec.forward(prepared)
        if len(outputs) != len(batch):
            raise RuntimeError(f"{self._model_name} predict returned {len(outputs)} outputs for {len(batch)} samples")
        outcomes = []
        encode, dumps = self.spec.encode, json.dumps
        for keep_value, output in zip(batch.keep_values(), outputs):
            if isinstance(output, PayloadError):  # the spec found this sample bad in the batch; the rest ran
                outcomes.append(Outcome.error(output.status, output.message))
                continue
            try:
                encoded = encode(output)
                outcomes.append(Outcome(200, b"", encoded) if keep_value else Outcome(200, dumps(encoded).encode()))
            except Exception as exc:  # noqa: BLE001 - one output that cannot be encoded fails alone
                log.exception("autobatch: encoding an output failed")
                outcomes.append(Outcome.error(500, f"internal error encoding the answer ({type(exc).__name__}: {exc})"))
        return outcomes

    async def run(self, batch: Batch) -> list[Outcome]:
        """Forward `batch`; on OOM split and retry the halves; on another error retry sample by sample."""
        return (await self.run_timed(batch)).outcomes

    async def _stages(self, items: Batch) -> BatchResult:
        loop = asyncio.get_running_loop()
        if not self.overlaps:
            async with self.locks.forward:
                started = time.perf_counter()
                outcomes = await loop.run_in_executor(self._executor, self._forward, items)
                elapsed_s = time.perf_counter() - started
            return BatchResult(outcomes, started, elapsed_s, elapsed_s)
        async with self.locks.prepare:
            started = time.perf_counter()
            self.overlapped_batches += self.locks.forward.locked()
            prepared = await loop.run_in_executor(self._prepare_executor, self._prepare, items)
            prepare_s = time.perf_counter() - started
        try:
            async with self.locks.forward:
                forward_started = time.perf_counter()
                outcomes = await loop.run_in_executor(self._executor, self._forward, items, prepared)
                forward_s = time.perf_counter() - forward_started
        finally:
            del prepared
        return BatchResult(outcomes, started, prepare_s + forward_s, max(prepare_s, forward_s))

    async def run_timed(self, items: Batch) -> BatchResult:
        """`run`, with the stages' times when the batch ran whole (BatchResult)."""
        loop = asyncio.get_running_loop()
        failure = None
        try:
            result = await self._stages(items)
        except Exception as exc:  # noqa: BLE001
            oom = self.meter.is_oom(exc)
            failure = (oom, type(exc).__name__, str(exc), isinstance(exc, PayloadError) and exc.status)
            if not oom:
                log.warning("autobatch: a batch of %d raised %s: %s", len(items), type(exc).__name__, exc)
            # leave the except block before retrying: its traceback holds the failed batch's tensors
        if failure is None:
            self.metrics.observe("autobatch_batch_inference_seconds", result.latency_s)
            return result
        oom, exc_type, message, payload_status = failure
        n = len(items)
        if oom:
            async with self.locks.forward:
                await loop.run_in_executor(self._executor, self.meter.cleanup)
            self.metrics.inc("autobatch_oom_events", phase="serving", kind="real")
            self._on_oom(n, message)
            if n == 1:
                return BatchResult([Outcome.error(413, f"this input needs more memory than the replica has "
                                                       f"({message}); send a smaller input")])
            first, rest = items.split(n // 2)
            return BatchResult(await self.run(first) + await self.run(rest))
        if n == 1:
            if payload_status:
                return BatchResult([Outcome.error(payload_status, message)])
            if exc_type in INPUT_ERRORS:
                return BatchResult([Outcome.error(422, f"the model could not process this input ({exc_type}: {message}); "
                                                       f"its batch-mates were answered, so check this payload")])
            return BatchResult([Outcome.error(500, f"internal error in the model ({exc_type}: {message})")])
        self.item_retries += 1
        self.metrics.inc("autobatch_batch_item_retries")
        outcomes = []
        for one in items.each():
            outcomes += await self.run(one)
        return BatchResult(outcomes)
