"""A generation's cost without running it: what the Llama's tuning probes run.

A whole worst-case generation (512 prompt tokens, then 128 decode steps) per probe made the 8B
model's tuning take minutes. Its peak memory is reached at one of two moments: the prefill of the
longest prompt, or the last decode step, when the KV cache holds prompt + max_new_tokens - 1
positions. Its time is the prefill plus one decode step per further token. So one probe runs:
1. the prefill at the worst prompt length (timed), exactly as generate() runs it (last logits only);
2. the KV cache grown to the length the last decode steps attend to (zeros appended per layer:
   the same bytes the real cache holds then, without the steps that fill it);
3. `warm_steps` decode steps against it untimed (the first steps at a new cache length pay the
   allocator's new blocks and the kernels' first launch at that shape), then `decode_steps` timed;
   the median is the time per token, at the longest cache, so no shorter than a real step. Fewer
   timed steps and none warm gave predictions out of order in the batch size (the 8B model's,
   docs/benchmarks.md §8, §16).
Predicted generation time = prefill + (new_tokens - 1) x per token. The tuner checks its answer
with one real generation and rescales the predictions if they disagree (optimizer/fast_probe.py).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def generation_cost_s(model, input_ids, attention_mask, new_tokens: int, *, decode_steps: int | None = None,
                      warm_steps: int | None = None, synchronize: Callable[[], None] = lambda: None) -> float:
    """Run the prefill and a few decode steps at the worst cache length; return the predicted
    seconds of generating `new_tokens` tokens for this batch. By default 8 timed steps and 2 warm
    ones for 64 new tokens or more (128: a twelfth of the generation's steps), fewer for a short
    generation, where the probe must stay well under the generation it stands for (3 and 1 for 24)."""
    import torch
    from transformers import DynamicCache

    if decode_steps is None:
        decode_steps = min(8, max(3, new_tokens // 8))
    if warm_steps is None:
        warm_steps = min(2, max(1, new_tokens // 32))
    steps = max(0, min(decode_steps, new_tokens - 1))
    warm = max(0, min(warm_steps, new_tokens - 1 - steps))
    with torch.inference_mode():
        cache = DynamicCache()
        synchronize()
        started = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        prefill_s = time.perf_counter() - started
        del out
        if steps == 0:
            return prefill_s
        # The cache at the length the real generation's last `warm + steps` decode steps start from.
        fill = new_tokens - 1 - steps - warm
        if fill > 0:
            for layer in cache.layers:
                pad_shape = (*layer.keys.shape[:-2], fill, layer.keys.shape[-1])
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(pad_shape)], dim=-2)
                layer.values = torch.cat([layer.values, layer.values.new_zeros(pad_shape)], dim=-2)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], fill))], 1)
        step_s = []
        for _ in range(warm + steps):
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], 1)
            synchronize()
            started = time.perf_counter()
            out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize()
            step_s.append(time.perf_counter() - started)
            del out
        del cache
    return prefill_s + (new_tokens - 1) * statistics.median(step_s[warm:])


def forward_seconds(model, tokens: int, *, repeats: int = 3, synchronize: Callable[[], None] = lambda: None) -> float:
    """Seconds of one forward of `tokens` query tokens (one prompt's prefill, logits of the last only):
    what a continuous-batching step with that token budget costs, for the per-step budget
    (deployments/llama_scheduler.plan_capacity). The fastest of `repeats` runs: on a shared host other
    work only ever adds time, and the budget is compared against the step's own cost."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 256), (1, int(tokens)), device=model.device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run warms this shape
            synchronize()
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            synchronize()
            times.append(time.perf_counter() - started)
    return min(times[1:])
