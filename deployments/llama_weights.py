"""The synthetic Llama's weights: a Llama config with random weights and the byte tokenizer, written
once to a local folder (nothing is downloaded) and loaded from it through the real NF4 path."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, build_byte_tokenizer

# Every Linear dimension a multiple of 64: bitsandbytes' CPU 4-bit kernels work in blocks of 64.
SYNTHETIC_CONFIGS: dict[str, dict] = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}
COMMON_CONFIG = dict(rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
                     bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
CACHE_ENV = "AUTOBATCH_MODEL_CACHE"
MARKER = "autobatch-synthetic.json"
# What the marker's "weights" says; a folder written by another recipe is built again.
WEIGHTS_RECIPE = "random (seed 0), bfloat16; lm_head rows past the tokenizer zeroed"


def default_model_cache_dir() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autobatch", "models")


def ensure_synthetic_folder(folder: str, config_name: str, architecture: dict, build_device: str = "cpu") -> str:
    """Write the synthetic model (random bf16 weights + tokenizer) into `folder` once; later calls reuse it.

    Concurrent replicas wait on a file lock; the folder appears atomically (built aside, renamed)."""
    from filelock import FileLock

    if is_current(folder):
        return folder
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    with FileLock(folder + ".lock"):
        if is_current(folder):
            return folder
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        work = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".building-", dir=root)
        try:
            config = LlamaConfig(**SYNTHETIC_CONFIGS[config_name], **COMMON_CONFIG)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                with torch.device(build_device):
                    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
            # Random logits over the whole vocabulary pick ids the byte tokenizer cannot spell (all but
            # 259 of the 8B shape's 128,256), which decode to nothing: a stream then sends no text
            # until its end. Zero logits for those rows leave greedy decoding to the ids it can spell;
            # the shapes, and so memory and time, are the model's.
            spelled = len(build_byte_tokenizer())
            with torch.no_grad():
                model.lm_head.weight[spelled:].zero_()
            model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                                       pad_token_id=PAD_ID, do_sample=False)
            model.save_pretrained(work, max_shard_size="2GB")
            del model
            build_byte_tokenizer().save_pretrained(work)
            with open(os.path.join(work, MARKER), "w") as f:
                json.dump({"architecture": architecture, "weights": WEIGHTS_RECIPE}, f, indent=1)
            if os.path.exists(folder):  # an incomplete leftover (no marker): replace it
                shutil.rmtree(folder)
            os.rename(work, folder)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            if build_device.startswith("cuda"):
                torch.cuda.empty_cache()
    return folder


def is_current(folder: str) -> bool:
    """The folder holds a complete synthetic model written by this recipe."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f).get("weights") == WEIGHTS_RECIPE
    except (OSError, ValueError):
        return False
