"""The Llama's continuous batching: one transformers `ContinuousBatchingManager` per replica.

Static batching (`@serve.batch` + one `generate()`) runs a batch to its longest request's end: an
8-token request waits out a batch-mate's 128, and a request one step late waits for the whole batch.
The manager schedules per step instead (iteration-level batching, as vLLM and TGI do): each request
is added as it arrives, joins the running batch at the next step, is prefilled in chunks within a
per-step token budget, and leaves as soon as its own tokens are done; its KV cache lives in pages
(blocks) of a preallocated paged cache, so memory is bounded by the number of blocks, not by the
longest request.

What this module decides and owns (no Ray, no serve imports):
  plan_capacity   the manager's capacity from the tuning: the largest number of concurrent sequences
                  that fits the replica's memory budget at the worst prompt + new tokens (the tuning's
                  max safe batch, measured), the KV blocks those sequences need at that worst length,
                  and the per-step token budget whose forward stays within the time-per-output-token
                  target (measured by llama_fast_probe.forward_seconds).
  Sampling        temperature / top_p / seed per request. The manager samples with one global RNG, so
                  a seed could not be honoured and greedy and sampled requests could not share a batch;
                  the three processors below draw each sampled token with Gumbel noise hashed from
                  (the request's seed, its token index) on the device, and hand the manager a one-hot
                  row it then takes greedily. Greedy requests pass through untouched (exact parity with
                  `generate()`), and a seeded request gives the same tokens whatever its batch-mates.
  ContinuousScheduler   the manager's life: start, pause (tuning runs with the loop paused), submit a
                  request and stream its tokens to the event loop, cancel, and what it holds now.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("ray.serve")

GREEDY = -1  # the sample key of a request that takes the argmax
MASK_32 = 0xFFFFFFFF
DEFAULT_PAGE_TOKENS = 256  # transformers' own default page size


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class SchedulerPlan:
    """The manager's capacity, every number with why (logged and shown under GET /tuning)."""

    max_sequences: int  # concurrent sequences (the manager's max_requests_per_batch)
    page_tokens: int  # tokens per KV block
    blocks_per_sequence: int  # at the worst prompt + new tokens
    num_blocks: int  # KV blocks in the paged cache
    max_batch_tokens: int  # per-step token budget (prefill chunks + one per decoding sequence)
    tpot_target_s: float  # the time-per-output-token target the token budget keeps
    step_s: float | None  # measured seconds of a forward of max_batch_tokens tokens
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"max_sequences": self.max_sequences, "page_tokens": self.page_tokens,
                "blocks_per_sequence": self.blocks_per_sequence, "num_blocks": self.num_blocks,
                "max_batch_tokens": self.max_batch_tokens, "tpot_target_s": self.tpot_target_s,
                "step_s": self.step_s, "reasons": list(self.reasons)}


def blocks_for(tokens: int, page_tokens: int) -> int:
    return max(1, math.ceil(tokens / page_tokens))


def token_budget_candidates(max_sequences: int, max_prompt_tokens: int, limit: int = 8192) -> list[int]:
    """Per-step token budgets worth timing: powers of two from the decode step of every sequence
    (max_sequences tokens) up to every sequence's whole prompt in one step."""
    low = max(16, 1 << (max(1, max_sequences) - 1).bit_length())
    high = min(limit, max(low, max_sequences * max_prompt_tokens))
    out, t = [], low
    while t < high:
        out.append(t)
        t *= 2
    out.append(high)
    return out


def plan_capacity(max_sequences: int, max_prompt_tokens: int, max_new_tokens: int, tpot_target_s: float,
                  step_s: dict[int, float], page_tokens: int = DEFAULT_PAGE_TOKENS,
                  sequences_why: str | None = None) -> SchedulerPlan:
    """The capacity within the tuned memory and the latency target.

    `max_sequences` is the tuning's max safe batch: that many sequences at the worst prompt + new
    tokens were measured within the memory budget (with a whole static batch's activations, more than
    a step of the manager holds), so their KV blocks fit. `step_s` maps a step's token count to its
    measured forward seconds; the budget is the largest measured count within `tpot_target_s`, never
    below one token per sequence (a decode step of all of them)."""
    max_sequences = max(1, int(max_sequences))
    per_seq = blocks_for(max_prompt_tokens + max_new_tokens, page_tokens)
    reasons = [sequences_why or f"{max_sequences} concurrent sequences: the tuning's max safe batch at {max_prompt_tokens} "
               f"prompt + {max_new_tokens} new tokens fit the memory budget",
               f"{per_seq * max_sequences} KV blocks of {page_tokens} tokens: {per_seq} per sequence at that length "
               f"(shorter requests take fewer, so more of them run at once)"]
    fits = sorted(t for t, s in step_s.items() if s <= tpot_target_s)
    floor = max_sequences
    if fits and fits[-1] >= floor:
        budget = fits[-1]
        reasons.append(f"{budget} tokens per step: the largest measured step within the {tpot_target_s * 1e3:.0f} ms "
                       f"time-per-output-token target ({step_s[budget] * 1e3:.1f} ms)")
    else:
        budget = max(floor, min(step_s) if step_s else floor)
        slow = f" (a step of {budget} tokens measured {step_s[budget] * 1e3:.1f} ms)" if budget in step_s else ""
        reasons.append(f"{budget} tokens per step, one per sequence: no larger step fits the "
                       f"{tpot_target_s * 1e3:.0f} ms time-per-output-token target{slow}")
    return SchedulerPlan(max_sequences, page_tokens, per_seq, per_seq * max_sequences, int(budget), float(tpot_target_s),
                         step_s.get(budget), tuple(reasons))


# ----------------------------------------------------------------------------- sampling on the device
def _hash32(x):
    """A 32-bit integer mix (lowbias32-like) on int64 tensors; every product stays below 2**63."""
    x = x & MASK_32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & MASK_32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & MASK_32
    return x ^ (x >> 16)


def sample_key(seed: int, token_index: int) -> int:
    """The 31-bit key of one sampled token: the request's seed and the token's index, mixed."""
    return (int(seed) * 1_000_003 + int(token_index) * 7919 + 1) & 0x7FFFFFFF


def _processors():
    """The three per-request processors (built lazily: transformers is imported only when serving)."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

    class Temperature(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"temperature": float}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor):
            int32_tensor.copy_(torch.zeros_like(int32_tensor, dtype=torch.float32).view(torch.int32))

        def prepare_tensor_args(self, requests):
            data = [float(r.state.logit_processor_kwargs.get("temperature", 0.0)) for r in requests]
            return torch.tensor(data, dtype=torch.float32).view(torch.int32)

        def __call__(self, scores, tensor_arg):
            t = tensor_arg[: scores.shape[0]].view(torch.float32).unsqueeze(1)
            return torch.where(t > 0, scores / torch.where(t > 0, t, torch.ones_like(t)), scores)

    class TopP(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"top_p": float}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor):
            int32_tensor.copy_(torch.ones_like(int32_tensor, dtype=torch.float32).view(torch.int32))

        def prepare_tensor_args(self, requests):
            data = [float(r.state.logit_processor_kwargs.get("top_p", 1.0)) for r in requests]
            return torch.tensor(data, dtype=torch.float32).view(torch.int32)

        def __call__(self, scores, tensor_arg):
            p = tensor_arg[: scores.shape[0]].view(torch.float32).unsqueeze(1)
            ordered, order = torch.sort(scores, dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop_sorted = (cumulative - ordered.softmax(-1)) >= p  # keeps the first token always
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            return scores.masked_fill(drop & (p < 1.0), float("-inf"))

    class Draw(ContinuousBatchingLogitsProcessor):
        """Sampled rows become one-hot at a token drawn by Gumbel-max with hashed noise; greedy rows stay."""

        supported_kwargs = {"sample_seed": int}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor):
            int32_tensor.fill_(GREEDY)

        def prepare_tensor_args(self, requests):
            keys = []
            for r in requests:
                seed = r.state.logit_processor_kwargs.get("sample_seed", GREEDY)
                keys.append(GREEDY if seed == GREEDY else sample_key(seed, r.state.generated_len()))
            return torch.tensor(keys, dtype=torch.int32)

        def __call__(self, scores, tensor_arg):
            rows, vocab = scores.shape
            key = tensor_arg[:rows].to(torch.int64).unsqueeze(1)
            index = torch.arange(vocab, device=scores.device, dtype=torch.int64).unsqueeze(0)
            u = (_hash32(_hash32(key) + index).to(torch.float32) + 0.5) / 4294967296.0
            drawn = (scores.float() - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
            one_hot = torch.full_like(scores, float("-inf")).scatter(-1, drawn, 0.0)
            return torch.where(key >= 0, one_hot, scores)

    return [Temperature(), TopP(), Draw()]


def install_sampling(manager) -> None:
    """Replace the manager's logits processing (none under greedy generation) by the per-request sampler."""
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
    from transformers.generation.logits_process import LogitsProcessorList

    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(_processors()), per_request_processors=False)
    processors.tensors_required = 3  # one int32 row per processor (counted only for converted ones upstream)
    manager.logit_processor = processors


# ----------------------------------------------------------------------------- the manager's life
@dataclass
class Generation:
    """One request in the manager: its tokens arrive on `updates` (the event loop's side)."""

    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    blocks: int
    submitted_s: float = field(default_factory=time.perf_counter)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_s: float | None = None
    last_token_s: float | None = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


class ContinuousScheduler:
    """A started manager and the requests in it. `submit` runs on the event loop; `paused()` in any
    thread (the tuning's); `snapshot()` anywhere (a racy read is fine for a gauge)."""

    def __init__(self, model, plan: SchedulerPlan, eos_ids: list[int], pad_id: int, max_new_tokens: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.plan = plan
        self.eos_ids = list(eos_ids)
        generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                                      pad_token_id=pad_id)
        config = ContinuousBatchingConfig(page_size=plan.page_tokens, num_blocks=plan.num_blocks,
                                          max_batch_tokens=plan.max_batch_tokens,
                                          max_requests_per_batch=plan.max_sequences,
                                          allow_block_sharing=False)
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        install_sampling(self.manager)
        self._ids = itertools.count()
        self._live: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self.cancelled = 0  # requests stopped before their end (client gone, stop string)
        self.manager.start()
        log.info("autobatch: llama continuous batching started: %s", "; ".join(plan.reasons))

    # --- control
    @contextlib.contextmanager
    def paused(self):
        """The generation loop paused (in-flight requests kept), so a tuning has the model alone."""
        if not self.manager.is_running():
            yield
            return
        with self.manager.pause():
            yield

    def stop(self) -> None:
        """Finish what runs, then stop the loop (the model's attention is restored)."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=60)

    # --- requests
    def submit(self, input_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Generation:
        """Add one request now; its outputs arrive on the returned Generation's queue."""
        request_id = f"ab-{next(self._ids)}"
        generation = Generation(request_id, len(input_ids), max_new_tokens,
                                blocks_for(len(input_ids) + max_new_tokens, self.plan.page_tokens))
        kwargs = {}
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
            kwargs = {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                      "sample_seed": int(seed) & 0x7FFFFFFF}
        with self._lock:
            self._live[request_id] = generation
        self.manager.register_result_handler(request_id, lambda out, g=generation: self._deliver(g, out))
        added = self.manager.add_request(list(input_ids), request_id=request_id, max_new_tokens=max_new_tokens,
                                         streaming=True, eos_token_id=self.eos_ids, **kwargs)
        if added is None:
            self._forget(generation)
            raise RuntimeError("the continuous-batching loop is not accepting requests (stopping or failed)")
        return generation

    def _deliver(self, generation: Generation, output) -> None:
        now = time.perf_counter()
        tokens = list(output.generated_tokens)
        if tokens and generation.first_token_s is None:
            generation.first_token_s = now
        if len(tokens) > len(generation.tokens):
            generation.last_token_s = now
        generation.tokens = tokens
        if output.is_finished():
            generation.finished = True
            generation.error = output.error
            self._forget(generation)
        generation.updates.put_nowait(output)

    def _forget(self, generation: Generation) -> None:
        with self._lock:
            self._live.pop(generation.request_id, None)

    def cancel(self, generation: Generation) -> None:
        """Stop a request (the client went away, or a stop string matched): its blocks are freed."""
        if not generation.finished:
            generation.finished = True
            self.cancelled += 1
            self.manager.cancel_request(generation.request_id)
            with self.manager.output_router._lock:
                self.manager.output_router.result_handlers.pop(generation.request_id, None)
            self._forget(generation)

    # --- what it holds
    def snapshot(self) -> dict:
        """Sequences running and waiting, KV blocks in use, blocks reserved by requests in the manager."""
        processor = self.manager.batch_processor
        running = waiting = used = 0
        if processor is not None:
            scheduler = processor.scheduler
            running = len(scheduler.active_requests)
            waiting = len(scheduler.waiting_requests)
            try:
                used = round(processor.cache.num_blocks * (1.0 - processor.cache.compute_free_capacity()))
            except Exception:  # noqa: BLE001 - a racy read of the allocator; the gauge shows the next one
                used = 0
        waiting += self.manager.input_queue.qsize()
        with self._lock:
            live = list(self._live.values())
        return {"running": running, "waiting": waiting, "kv_blocks_used": used, "kv_blocks_total": self.plan.num_blocks,
                "in_flight": len(live), "kv_blocks_reserved": sum(g.blocks for g in live),
                "cancelled": self.cancelled, "loop_alive": self.manager.is_running()}
