"""Llama with 4-bit NF4 weights (transformers + bitsandbytes): generation, continuous or in static batches.

Scheduler (option `scheduler`): "continuous" (the default) serves every request through one
transformers ContinuousBatchingManager per replica, sized by the tuning (deployments/llama_scheduler.py):
requests join and leave the running batch at every step and stream their tokens. "static" runs
whole batches through one `generate()` each (the replica's batcher), greedy only.
Requests are read in deployments/llama_requests.py (simple JSON, OIP tensors, OpenAI chats).

Request: JSON `{"prompt": str, "max_new_tokens": int (optional, 1..max_new_tokens)}`, or over the
Open Inference Protocol `text_input` per sample and `max_tokens` (input or request parameter).
Response: the generated text, `prompt_tokens`, `completion_tokens`, `finish_reason` ("stop" at the
end-of-text token, "length" at the token limit) and whether the prompt was truncated.

Weights: a local Hugging Face folder when configured (e.g. a real Llama 3 8B), else a Llama config
with random weights, written once to a local folder and loaded from it through
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, so the 4-bit path is the real
one. The synthetic folder carries a byte-level tokenizer built in code (256 byte tokens +
<|begin_of_text|>, <|end_of_text|>, <|pad|>; no merges), so nothing is downloaded. Two synthetic
shapes: "small" (CPU-friendly, the default) and "llama3-8b" (Llama-3-8B's shape, for a GPU), by
the `config` option or AUTOBATCH_LLAMA_CONFIG. The folder lives under the `model_cache_dir` option,
else $AUTOBATCH_MODEL_CACHE, $XDG_CACHE_HOME/autobatch/models or ~/.cache/autobatch/models.

Memory grows with sequence length, so tuning runs the worst case the deployment admits:
`max_prompt_tokens` prompt tokens and `max_new_tokens` generated tokens (end-of-text suppressed).
Longer prompts are rejected with 413, or cut to their last tokens when `truncate_prompt` is set.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, ClassVar

import numpy as np

from .base import ModelSpec, SpecConfigError, TensorSpec, file_identity, torch_dtype

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .llama_requests import ALLOWED_KEYS, LlamaRequests, Prompt  # noqa: F401
from .llama_scheduler import DEFAULT_PAGE_TOKENS, ContinuousScheduler, plan_capacity, token_budget_candidates
from .byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, TOKENIZER_LAYOUT, build_byte_tokenizer  # noqa: F401
from .llama_weights import (CACHE_ENV, COMMON_CONFIG, MARKER, SYNTHETIC_CONFIGS, default_model_cache_dir,  # noqa: F401
                            ensure_synthetic_folder)

CONFIG_ENV = "AUTOBATCH_LLAMA_CONFIG"
SCHEDULERS = ("continuous", "static")
EXAMPLE_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def trim_completion(tokens: list[int], max_new_tokens: int, eos_ids) -> tuple[list[int], str]:
    """One row of a batched generation -> this request's tokens and why it ended.

    The batch runs to its longest request (and pads rows that ended early), so each row is cut to
    its own limit and at its first end-of-text token (not counted, not shown)."""
    tokens = tokens[:max_new_tokens]
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i], "stop"
    return tokens, "length"


class LlamaInt4Spec(LlamaRequests, ModelSpec):
    name: ClassVar[str] = "llama_int4"
    usage: ClassVar[str] = ('POST JSON {"prompt": "<text>", "max_new_tokens": <optional>}; the answer is the greedy '
                            "continuation with its token counts and why it stopped")
    library_packages: ClassVar[tuple[str, ...]] = ("torch", "transformers", "bitsandbytes", "accelerate", "tokenizers")
    # A batch is a whole generation (prefill + up to max_new_tokens steps): seconds, not milliseconds.
    default_latency_budget_s: ClassVar[float] = 10.0
    fixed_sample_shape: ClassVar[bool] = False  # prompt lengths vary: a batch size alone fixes no shape

    def __init__(self, weights_path: str | None = None, config: str | None = None, max_prompt_tokens: int = 512,
                 max_new_tokens: int = 128, default_new_tokens: int | None = None, truncate_prompt: bool = False,
                 max_request_bytes: int | None = None, model_cache_dir: str | None = None,
                 scheduler: str = "continuous", tpot_target_ms: float | None = None,
                 kv_page_tokens: int = DEFAULT_PAGE_TOKENS, kv_queue_factor: float = 1.0, **options: Any):
        super().__init__(weights_path, **options)
        if scheduler not in SCHEDULERS:
            raise SpecConfigError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)} "
                                  f"(option `scheduler`)")
        self.scheduler_kind = scheduler
        try:
            self.tpot_target_ms = None if tpot_target_ms is None else float(tpot_target_ms)
            self.kv_page_tokens, self.kv_queue_factor = int(kv_page_tokens), float(kv_queue_factor)
        except (TypeError, ValueError):
            raise SpecConfigError("tpot_target_ms and kv_queue_factor must be numbers, kv_page_tokens a whole number") from None
        if (self.tpot_target_ms is not None and self.tpot_target_ms <= 0) or self.kv_page_tokens < 4 or self.kv_queue_factor < 0:
            raise SpecConfigError("tpot_target_ms must be > 0, kv_page_tokens >= 4 and kv_queue_factor >= 0")
        self.scheduler = None  # the running ContinuousScheduler (deployments/llama_scheduler.py), once started
        self.config_name = config or os.environ.get(CONFIG_ENV) or "small"
        if self.weights_path is None and self.config_name not in SYNTHETIC_CONFIGS:
            raise SpecConfigError(f"unknown Llama config {self.config_name!r}; use one of {', '.join(SYNTHETIC_CONFIGS)} "
                                  f"(option `config` or ${CONFIG_ENV}), or give a local Hugging Face folder as weights")
        if self.weights_path is not None and not os.path.isdir(self.weights_path):
            raise SpecConfigError(f"weights path {self.weights_path!r} is not a folder; give a local Hugging Face model "
                                  f"folder (config.json, *.safetensors, tokenizer files), or omit it for synthetic weights")
        try:
            self.max_prompt_tokens = int(max_prompt_tokens)
            self.max_new_tokens = int(max_new_tokens)
            self.default_new_tokens = min(64, self.max_new_tokens) if default_new_tokens is None else int(default_new_tokens)
        except (TypeError, ValueError):
            raise SpecConfigError("max_prompt_tokens, max_new_tokens and default_new_tokens must be whole numbers") from None
        if self.max_prompt_tokens < 2:
            raise SpecConfigError(f"max_prompt_tokens must be at least 2 (BOS + one token), got {max_prompt_tokens}")
        if self.max_new_tokens < 1:
            raise SpecConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            raise SpecConfigError(f"default_new_tokens must be between 1 and max_new_tokens ({self.max_new_tokens}), got {default_new_tokens}")
        if self.weights_path is None:
            limit = SYNTHETIC_CONFIGS[self.config_name]["max_position_embeddings"]
            if self.max_prompt_tokens + self.max_new_tokens > limit:
                raise SpecConfigError(f"max_prompt_tokens + max_new_tokens = {self.max_prompt_tokens + self.max_new_tokens} "
                                      f"exceeds the {self.config_name} config's {limit} positions; lower them")
        self.truncate_prompt = bool(truncate_prompt)
        # Bytes of JSON we are willing to parse and tokenize; generous for UTF-8 text and JSON escapes.
        default_bytes = max(65536, 32 * self.max_prompt_tokens) if not self.truncate_prompt else 4 * 2**20
        self.max_request_bytes = int(max_request_bytes) if max_request_bytes else default_bytes
        self.model_cache_dir = model_cache_dir
        self.tokenizer = None
        self.eos_ids: list[int] = [EOS_ID]
        self.pad_id = PAD_ID

    # --- identity (cheap)
    def default_dtype(self, device_kind: str) -> str:
        # The compute dtype around the NF4 weights (activations, norms, embeddings, lm_head).
        return "float16" if device_kind == "cuda" else "float32"

    def architecture(self) -> dict:
        if self.weights_path:
            return {"folder": file_identity(self.weights_path)}
        return {"config": self.config_name, **SYNTHETIC_CONFIGS[self.config_name], **COMMON_CONFIG,
                "tokenizer": TOKENIZER_LAYOUT}

    def input_signature(self) -> dict:
        # No scheduler here: both schedulers tune the same way (static generate() batches at the worst
        # prompt + new tokens, probe_batch); the continuous one only sizes itself from the result
        # afterwards (start_scheduler: its step timings, page size and TPOT target are measured or
        # applied then, not cached). One key lets a replica switched between them reuse the tuning.
        return {"quantization": "bnb-nf4", "architecture": self.architecture(),
                "max_prompt_tokens": self.max_prompt_tokens, "max_new_tokens": self.max_new_tokens}

    def weights_description(self) -> str:
        if self.weights_path:
            return f"{self.weights_path} (NF4 4-bit)"
        return f"synthetic: Llama '{self.config_name}' config with random weights, NF4 4-bit (nothing downloaded)"

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("text_input", "BYTES", (-1,), "one UTF-8 prompt per sample"),
                TensorSpec("max_tokens", "INT32", (-1,), f"tokens to generate per sample, 1..{self.max_new_tokens} "
                           f"(INT64 accepted too); left out: {self.default_new_tokens}", optional=True))

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("text_output", "BYTES", (-1,), "the generated continuation per sample, UTF-8, prompt not repeated"),)

    @classmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        body = {"prompt": EXAMPLE_PROMPT} if max_new_tokens is None else {"prompt": EXAMPLE_PROMPT, "max_new_tokens": int(max_new_tokens)}
        return json.dumps(body).encode(), "application/json"

    # --- weights
    def synthetic_folder(self) -> str:
        digest = hashlib.sha256(json.dumps(self.architecture(), sort_keys=True).encode()).hexdigest()[:12]
        root = self.model_cache_dir or default_model_cache_dir()
        return os.path.join(root, f"llama_int4-{self.config_name}-{digest}")

    def ensure_synthetic_folder(self, build_device: str = "cpu") -> str:
        """Write the synthetic model (random bf16 weights + tokenizer) once; later calls reuse it."""
        return ensure_synthetic_folder(self.synthetic_folder(), self.config_name, self.architecture(), build_device)

    def get_tokenizer(self):
        """The tokenizer; available before `load` so `decode` can count tokens."""
        if self.tokenizer is None:
            if self.weights_path:
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.weights_path, local_files_only=True)
                except Exception as exc:  # noqa: BLE001 - many failure types; all mean "fix the folder"
                    raise SpecConfigError(f"cannot load a tokenizer from {self.weights_path!r}: {exc}") from exc
            else:
                tokenizer = build_byte_tokenizer()
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:  # Llama 3 ships without one
                tokenizer.pad_token = tokenizer.eos_token
            self.tokenizer = tokenizer
            self.pad_id = int(tokenizer.pad_token_id)
        return self.tokenizer

    def load(self, device: str, dtype: str):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        compute_dtype = torch_dtype(dtype)
        folder = self.weights_path or self.ensure_synthetic_folder(device if device.startswith("cuda") else "cpu")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=compute_dtype)
        device_map = {"": device if device != "cuda" else "cuda:0"}
        # transformers >= 5.2x swaps layers for Hugging Face Hub kernels by default on CUDA, fetched
        # from the Hub at load: offline (as every replica here is) the load then fails. Opt out.
        os.environ.setdefault("USE_HUB_KERNELS", "0")
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=compute_dtype,
                                                     device_map=device_map, local_files_only=True)
        import bitsandbytes as bnb

        if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
            raise SpecConfigError(f"loading {folder!r} produced no bitsandbytes Linear4bit layers; the NF4 path did not run")
        model.eval()
        tokenizer = self.get_tokenizer()
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise SpecConfigError(f"tokenizer has {len(tokenizer)} tokens but the model only {vocab}; they do not belong together")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and self.max_prompt_tokens + self.max_new_tokens > positions:
            raise SpecConfigError(f"max_prompt_tokens + max_new_tokens = {self.max_prompt_tokens + self.max_new_tokens} "
                                  f"exceeds the model's {positions} positions; lower them")
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.device, self.dtype_name = device, dtype
        self.model = model
        return model

    # --- the continuous scheduler (deployments/llama_scheduler.py)
    def start_scheduler(self, max_sequences: int, latency_budget_s: float | None, say=print,
                        sequences_why: str | None = None) -> ContinuousScheduler:
        """Size the manager from the tuning (max safe batch at the worst length) and a few timed forwards
        (the per-step token budget within the time-per-output-token target), then start it."""
        import torch

        from .llama_fast_probe import forward_seconds

        self.stop_scheduler()
        budget_s = latency_budget_s or self.default_latency_budget_s
        tpot_s = self.tpot_target_ms / 1e3 if self.tpot_target_ms else budget_s / self.max_new_tokens
        sync = (lambda: torch.cuda.synchronize(self.device)) if str(self.device).startswith("cuda") else (lambda: None)
        step_s: dict[int, float] = {}
        for tokens in token_budget_candidates(max_sequences, self.max_prompt_tokens):
            step_s[tokens] = forward_seconds(self.model, tokens, synchronize=sync)
            say(f"autobatch: llama step of {tokens} tokens: {step_s[tokens] * 1e3:.1f} ms")
            if step_s[tokens] > tpot_s:
                break
        plan = plan_capacity(max_sequences, self.max_prompt_tokens, self.max_new_tokens, tpot_s, step_s,
                             page_tokens=self.kv_page_tokens, sequences_why=sequences_why)
        for reason in plan.reasons:
            say(f"autobatch: llama scheduler: {reason}")
        self.scheduler = ContinuousScheduler(self.model, plan, self.eos_ids, self.pad_id, self.max_new_tokens)
        return self.scheduler

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None

    # --- samples
    def example_batch(self, n: int) -> list[Prompt]:
        """n prompts of the longest admitted length, each forced to generate max_new_tokens tokens."""
        import random

        rng = random.Random(n)
        bos = self.get_tokenizer().bos_token_id
        prompts = []
        for _ in range(n):
            ids = [rng.randrange(32, 127) for _ in range(self.max_prompt_tokens)]  # printable ASCII bytes
            if bos is not None:
                ids[0] = int(bos)
            prompts.append(Prompt(ids, self.max_new_tokens, min_new_tokens=self.max_new_tokens))
        return prompts

    # --- batch
    def _batch_tensors(self, samples: list[Prompt]):
        import torch

        length = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):  # left padding: every prompt ends where generation starts
            n = len(sample.input_ids)
            input_ids[row, length - n:] = torch.tensor(sample.input_ids, dtype=torch.long)
            attention_mask[row, length - n:] = 1
        return input_ids, attention_mask, length

    def probe_batch(self, samples: list[Prompt]) -> float:
        """A tuning probe: the prefill and a few decode steps at the worst cache length, and the
        predicted seconds of the whole generation (deployments/llama_fast_probe.py)."""
        import torch

        from .llama_fast_probe import generation_cost_s

        input_ids, attention_mask, _ = self._batch_tensors(samples)
        sync = (lambda: torch.cuda.synchronize(self.device)) if str(self.device).startswith("cuda") else (lambda: None)
        return generation_cost_s(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                 max(s.max_new_tokens for s in samples), synchronize=sync)

    def predict(self, samples: list[Prompt]) -> list[dict]:
        import torch
        from transformers import GenerationConfig

        tokenizer = self.get_tokenizer()
        input_ids, attention_mask, length = self._batch_tensors(samples)
        max_new = max(s.max_new_tokens for s in samples)
        min_new = max(s.min_new_tokens for s in samples)
        generation = GenerationConfig(max_new_tokens=max_new, min_new_tokens=min_new or None, do_sample=False,
                                      num_beams=1, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                      generation_config=generation)
        generated = out[:, length:].cpu().tolist()
        results = []
        for sample, tokens in zip(samples, generated):
            tokens, finish = trim_completion(tokens, sample.max_new_tokens, self.eos_ids)
            results.append({
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "prompt_tokens": len(sample.input_ids),
                "completion_tokens": len(tokens),
                "finish_reason": finish,
                "prompt_truncated": sample.truncated,
            })
        return results

    def encode(self, output: dict) -> dict:
        return {"model": self.name, "weights": "local" if self.weights_path else "synthetic", **output}

    def encode_tensors(self, encoded: list[dict]) -> dict:
        return {"text_output": np.array([a["text"].encode() for a in encoded], dtype=object)}
