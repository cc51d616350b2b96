"""The Llama's continuous scheduler as a replica serves it: admission by KV blocks, each
request streamed as its own tokens finish, stop strings, usage counts and the LLM metrics.

deployments/llama_scheduler.py owns the manager (Ray-free); this module is what a served request
needs around it. A request is admitted when the blocks it reserves at its own prompt + max_tokens
fit within the cache plus `kv_queue_factor` caches' worth waiting; past that it is refused with 503
and a Retry-After from the measured token rate, before any work (vLLM would queue it without bound).
Every request streams from the manager (that is how its first token and each later one are timed);
a plain request gathers the stream. A stream the client leaves (cancelled) cancels its sequence,
which frees its blocks at the manager's next step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from deployments.llama_int4 import trim_completion
from deployments.llama_scheduler import Sampling
from wire import PayloadError

log = logging.getLogger("ray.serve")

GAUGE_POLL_S = 1.0
RATE_WINDOW_S = 30.0


class KvCacheFull(PayloadError):
    """A request the KV cache cannot hold within its budget now: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, status=503)
        self.retry_after_s = int(retry_after_s)


@dataclass
class Delta:
    """What one stream step adds: new text, the token count so far, and why it ended (None: not yet)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


class TextStream:
    """Token ids -> text as it becomes final: an incomplete UTF-8 sequence at the end is held back,
    and so is a tail that could still grow into a stop string; a stop string ends the text before it.

    An incomplete sequence decodes to one trailing U+FFFD (a decoder replaces the maximal invalid
    subpart with one), so one is held and no more: replacement characters before it stand for bytes
    no later token can complete. Holding every trailing U+FFFD held back a model's whole answer when
    it emitted a run of invalid bytes (random weights do), and the stream's first text then came at
    its end."""

    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.emitted = 0
        self.text = ""

    def update(self, tokens: list[int], finished: bool) -> tuple[str, bool]:
        """(new final text, whether a stop string matched)."""
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if hit >= 0:
            text, finished = text[:hit], True
        end = len(text)
        if not finished:
            if end > self.emitted and text[end - 1] == "\ufffd":  # a character perhaps still being spelled
                end -= 1
            end = max(self.emitted, end - self._hold)
        new = text[self.emitted:end]
        self.emitted, self.text = end, text[:end]
        return new, hit >= 0


class LlmServing:
    """`spec` has a started scheduler; `metrics` is the replica's ReplicaMetrics; `on_shed(reason)`
    counts a refused request where the replica counts the others."""

    def __init__(self, spec, metrics, on_shed: Callable[[str], None]):
        self.spec, self.metrics, self._on_shed = spec, metrics, on_shed
        self._tokens: deque[tuple[float, int]] = deque()  # (finished at, tokens) within RATE_WINDOW_S
        self.refused = 0
        self._poller: asyncio.Task | None = None

    @property
    def scheduler(self):
        return self.spec.scheduler

    # --- admission by tokens
    def admit(self, prompt_tokens: int, max_new_tokens: int) -> None:
        plan = self.scheduler.plan
        need = math.ceil((prompt_tokens + max_new_tokens) / plan.page_tokens)
        held = self.scheduler.snapshot()["kv_blocks_reserved"]
        allowed = int(plan.num_blocks * (1.0 + self.spec.kv_queue_factor))
        if held + need <= allowed:
            return
        rate = self.tokens_per_s()
        excess_tokens = (held + need - allowed) * plan.page_tokens
        retry_s = min(60, max(1, math.ceil(excess_tokens / rate))) if rate > 0 else 2
        self.refused += 1
        self._on_shed("kv_cache")
        raise KvCacheFull(f"the KV cache is full: requests in flight hold {held} of {allowed} blocks "
                          f"({plan.num_blocks} in the cache + {self.spec.kv_queue_factor:g}x waiting) and this one needs "
                          f"{need} ({prompt_tokens} prompt + {max_new_tokens} max tokens); retry in {retry_s} s, "
                          f"or ask for fewer tokens", retry_s)

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        while self._tokens and now - self._tokens[0][0] > RATE_WINDOW_S:
            self._tokens.popleft()
        if not self._tokens:
            return 0.0
        span = max(1.0, now - self._tokens[0][0])
        return sum(n for _, n in self._tokens) / span

    # --- generation
    async def stream(self, input_ids: list[int], max_new_tokens: int, sampling: Sampling,
                     stop: list[str] = ()) -> AsyncIterator[Delta]:
        """Admit, submit, and yield the text as it becomes final; the last Delta has the finish reason."""
        self.admit(len(input_ids), max_new_tokens)
        generation = self.scheduler.submit(input_ids, max_new_tokens, sampling)
        self.metrics.inc("autobatch_llm_prompt_tokens", len(input_ids))
        self._ensure_poller()
        text = TextStream(self.spec.get_tokenizer(), list(stop))
        finished = False
        try:
            while not finished:
                output = await generation.updates.get()
                while not generation.updates.empty():  # take every step that arrived meanwhile at once
                    output = generation.updates.get_nowait()
                if output.error:
                    raise RuntimeError(f"generation failed: {output.error}")
                tokens, why = trim_completion(generation.tokens, max_new_tokens, self.spec.eos_ids)
                ended = output.is_finished() or why == "stop"
                new, stopped = text.update(tokens, ended)
                finished = ended or stopped
                reason = ("stop" if stopped else why) if finished else None
                if new or finished:
                    yield Delta(new, len(tokens), reason)
        finally:
            if not generation.finished:  # the client left, or a stop string matched: free its blocks
                self.scheduler.cancel(generation)
            self._record(generation)

    async def complete(self, input_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                       stop: list[str] = ()) -> dict:
        """A whole answer, in the form the static path's predict returns."""
        parts, last = [], None
        async for delta in self.stream(input_ids, max_new_tokens, sampling, stop):
            parts.append(delta.text)
            last = delta
        return {"text": "".join(parts), "prompt_tokens": len(input_ids), "completion_tokens": last.completion_tokens,
                "finish_reason": last.finish_reason}

    def _record(self, generation) -> None:
        n = len(generation.tokens)
        now = time.perf_counter()
        self._tokens.append((now, n))
        self.metrics.inc("autobatch_llm_generated_tokens", n)
        if generation.first_token_s is not None:
            self.metrics.observe("autobatch_llm_time_to_first_token_seconds", generation.first_token_s - generation.submitted_s)
            if n > 1 and generation.last_token_s is not None:
                self.metrics.observe("autobatch_llm_time_per_output_token_seconds",
                                     (generation.last_token_s - generation.first_token_s) / (n - 1))
        self._gauges()

    # --- what it holds
    def _gauges(self) -> dict:
        snap = self.scheduler.snapshot()
        self.metrics.set("autobatch_llm_running_sequences", snap["running"])
        self.metrics.set("autobatch_llm_waiting_sequences", snap["waiting"])
        self.metrics.set("autobatch_llm_kv_blocks_used", snap["kv_blocks_used"])
        self.metrics.set("autobatch_llm_kv_blocks_total", snap["kv_blocks_total"])
        return snap

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """The gauges while sequences are in flight (the manager changes them between requests' ends)."""
        while True:
            snap = self._gauges()
            if not snap["in_flight"]:
                return
            await asyncio.sleep(GAUGE_POLL_S)

    def describe(self) -> dict:
        return {"kind": "continuous", **self.scheduler.plan.to_dict(), "now": self.scheduler.snapshot(),
                "kv_queue_factor": self.spec.kv_queue_factor, "tokens_per_s": round(self.tokens_per_s(), 2),
                "refused_kv_cache": self.refused}


MEMORY_GUARD = 0.90  # of the budget, as the tuning's predictive guard keeps (optimizer/tune.py margin)


def continuous_sequences(tuning) -> tuple[int, str]:
    """How many sequences the continuous scheduler runs at once, and why. The tuning's max safe batch
    when memory (or max_batch) bounded it: that many were measured at the worst length within the
    budget. When the latency budget bounded it, that bound is a whole static generation's (prefill +
    every token, 10 s by default), which a continuous step does not have (its own time is kept by the
    per-step token budget against the TPOT target): then the memory fit's count within the guarded
    budget, never past max_batch, never below the max safe batch. On a card where one static
    generation of 512 + 128 tokens nears the budget, the max safe batch is 1, and one sequence
    would be all the scheduler ran."""
    safe = max(1, int(tuning.max_safe_batch))
    fit = tuning.memory_fit
    if tuning.stopped_by != "latency" or fit is None or not fit.per_sample_bytes or fit.per_sample_bytes <= 0:
        return safe, (f"{safe} concurrent sequences: the tuning's max safe batch at the worst length fit the memory "
                      f"budget (bounded by {tuning.stopped_by})")
    room = MEMORY_GUARD * tuning.memory_budget_bytes - fit.intercept_bytes
    by_memory = min(int(tuning.max_batch), int(room // fit.per_sample_bytes)) if room > 0 else 0
    if by_memory <= safe:
        return safe, f"{safe} concurrent sequences: the tuning's max safe batch (bounded by latency; no more fit the memory fit)"
    return by_memory, (f"{by_memory} concurrent sequences: the memory fit ({fit.intercept_bytes / 2**30:.2f} GiB + "
                       f"{fit.per_sample_bytes / 2**20:.1f} MiB a sequence at the worst length) within "
                       f"{MEMORY_GUARD:.0%} of the {tuning.memory_budget_bytes / 2**30:.2f} GiB budget"
                       + (f", capped at max_batch {tuning.max_batch}" if by_memory == int(tuning.max_batch) else "")
                       + f"; the max safe batch {safe} was bounded by a whole static generation's latency, "
                       f"which a continuous step does not wait out")


def paused(spec, work: Callable[[], object]):
    """Run `work` (a tuning) with the spec's continuous scheduler paused, where it has a running one, and
    with what it prepared for the served size let go (CUDA graphs: the tuner times the eager forward)."""
    spec.set_serving_batch(None)
    scheduler = getattr(spec, "scheduler", None)
    if scheduler is None:
        return work()
    with scheduler.paused():
        return work()


async def llm_outcome(llm: LlmServing, prompt, entry):
    """One decoded sample (a deployments.llama_int4.Prompt) of a request (serve/replica/batcher.py's Entry, of the
    simple route or OIP), answered whole."""
    from .batch_runner import Outcome

    try:
        result = await llm.complete(prompt.input_ids, prompt.max_new_tokens)
    except KvCacheFull as exc:
        return Outcome.error(503, exc.message)
    except Exception as exc:  # noqa: BLE001 - one request's failure answers that request only
        log.exception("autobatch: continuous generation failed")
        return Outcome.error(500, f"internal error while generating ({type(exc).__name__}: {exc})")
    result["prompt_truncated"] = prompt.truncated
    encoded = llm.spec.encode(result)
    if entry.keep_value:
        return Outcome(200, b"", value=encoded)
    import json

    return Outcome(200, json.dumps(encoded).encode())
