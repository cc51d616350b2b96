"""The Llama's two schedulers side by side in one process, no Ray, no HTTP: static batches
(`generate()` over `concurrency` requests at a time, each batch running to its longest request)
against transformers' continuous batching manager (`concurrency` requests in flight, a new one
added the moment one finishes), on the same mixed workload, same model, same run.

Why it exists: it answers "is continuous batching faster here, and by how much" before any serving
code is involved, so the serving benchmark (benchmarks/llm_serving.py) can be read against the
engine's own ceiling. The workload: `--requests` prompts of random length in [16, max_prompt]
tokens, each asking for a random number of new tokens in [1, max_new] (end-of-text suppressed, so
every request generates exactly what it asked for), greedy. Useful tokens are the ones a request
asked for; a static batch's padding steps count as time, not tokens.

    python benchmarks/llm_engine.py --config small --device cpu --requests 16 --concurrency 8
    # one GPU (the 8B-shaped NF4 model; ~3 minutes with the folder build):
    python3 benchmarks/llm_engine.py --config llama3-8b --device cuda --requests 96 --concurrency 32 --out $OUT/llm_engine.json

Prints one table row per (scheduler, concurrency): tokens/s, requests/s, TTFT p50/p99 (static: the
batch's end, it streams nothing), time per output token p50/p99, end-to-end p99, peak device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def workload(n: int, max_prompt: int, max_new: int, seed: int, bos: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(16, max_prompt)
        ids = [bos] + [rng.randrange(32, 127) for _ in range(length - 1)]
        out.append((ids, rng.randint(1, max_new)))
    return out


def peak_bytes(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def summarise(name: str, concurrency: int, wall_s: float, rows: list[dict], device: str) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    # time per output token after the first, for streamed answers (a static batch streams nothing)
    tpot = [(r["end_s"] - r["first_s"]) / (r["tokens"] - 1) for r in rows if r["tokens"] > 1 and r["end_s"] > r["first_s"]]
    return {"scheduler": name, "concurrency": concurrency, "requests": len(rows), "wall_s": round(wall_s, 3),
            "tokens_per_s": round(tokens / wall_s, 2), "requests_per_s": round(len(rows) / wall_s, 3),
            "ttft_p50_s": percentile([r["first_s"] - r["start_s"] for r in rows], 50),
            "ttft_p99_s": percentile([r["first_s"] - r["start_s"] for r in rows], 99),
            "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
            "e2e_p99_s": percentile([r["end_s"] - r["start_s"] for r in rows], 99),
            "peak_bytes": peak_bytes(device)}


def run_static(model, work, concurrency: int, device: str, pad_id: int) -> dict:
    """Closed loop of static batches: `concurrency` requests at a time, in arrival order, each batch
    generating its longest request's count (what @serve.batch + one generate() does)."""
    import torch

    warm = torch.tensor([work[0][0][:16]], device=model.device)
    with torch.no_grad():  # kernels and allocator warm, as the continuous run's warm request does
        model.generate(input_ids=warm, max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
    reset_peak(device)
    rows, t0 = [], time.perf_counter()
    for start in range(0, len(work), concurrency):
        batch = work[start:start + concurrency]
        width = max(len(ids) for ids, _ in batch)
        new = max(n for _, n in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=model.device)
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ended = time.perf_counter()
        # closed loop: each of the `concurrency` clients sends its next request when the batch ends
        rows += [{"start_s": began, "first_s": ended, "end_s": ended, "tokens": n} for _, n in batch]
    return summarise("static", concurrency, time.perf_counter() - t0, rows, device)


def run_continuous(model, work, concurrency: int, device: str, cb_config: dict) -> dict:
    """Closed loop through the manager: `concurrency` requests in flight, each streamed so its
    first token's time is known, the next one added as soon as one finishes."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work), eos_token_id=-1,
                           pad_token_id=model.generation_config.pad_token_id)
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=ContinuousBatchingConfig(**cb_config))
    manager.start()
    try:
        # warm: one short request through the loop (graphs, kernels), not timed
        manager.add_request(work[0][0][:16], request_id="warm", max_new_tokens=2)
        while True:
            out = manager.get_result(timeout=120)
            if out is None:
                raise RuntimeError("continuous batching manager produced nothing in 120 s (warm-up)")
            if out.request_id == "warm" and out.is_finished():
                break
        reset_peak(device)
        rows: dict[str, dict] = {}
        pending = list(enumerate(work))
        t0 = time.perf_counter()

        def add_next():
            i, (ids, n) = pending.pop(0)
            rid = f"r{i}"
            rows[rid] = {"start_s": time.perf_counter(), "first_s": None, "end_s": None, "tokens": 0, "asked": n}
            manager.add_request(ids, request_id=rid, max_new_tokens=n, streaming=True)

        for _ in range(min(concurrency, len(pending))):
            add_next()
        done = 0
        while done < len(work):
            out = manager.get_result(timeout=300)
            if out is None:
                raise RuntimeError(f"continuous batching manager stalled with {len(work) - done} requests left")
            row = rows.get(out.request_id)
            if row is None:
                continue
            now = time.perf_counter()
            if out.generated_tokens and row["first_s"] is None:
                row["first_s"] = now
            if out.is_finished():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                row["end_s"], row["tokens"] = now, len(out.generated_tokens)
                row["first_s"] = row["first_s"] or now
                done += 1
                if pending:
                    add_next()
        wall = time.perf_counter() - t0
        result = summarise("continuous", concurrency, wall, list(rows.values()), device)
        result["short_of_asked"] = sum(1 for r in rows.values() if r["tokens"] != r["asked"])
        return result
    finally:
        manager.stop(block=True, timeout=30)
        try:
            model.destroy_cached_continuous_batching_manager()
        except Exception:  # noqa: BLE001 - best effort; the manager is stopped either way
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", help="synthetic Llama shape: small | llama3-8b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8])
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--schedulers", nargs="+", default=["static", "continuous"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cb-config", default="{}", help='JSON for ContinuousBatchingConfig, e.g. {"max_batch_tokens": 2048}')
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    import transformers

    from deployments.llama_int4 import LlamaInt4Spec

    spec = LlamaInt4Spec(config=args.config, max_prompt_tokens=args.max_prompt, max_new_tokens=args.max_new)
    t = time.perf_counter()
    model = spec.load(args.device, spec.default_dtype("cuda" if args.device.startswith("cuda") else "cpu"))
    load_s = time.perf_counter() - t
    work = workload(args.requests, args.max_prompt, args.max_new, args.seed, spec.get_tokenizer().bos_token_id)
    report = {"config": args.config, "device": args.device, "load_s": round(load_s, 1),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "requests": args.requests, "max_prompt": args.max_prompt, "max_new": args.max_new,
              "asked_tokens": sum(n for _, n in work), "runs": []}
    print(f"loaded {args.config} on {args.device} in {load_s:.1f} s; {args.requests} requests, "
          f"{report['asked_tokens']} tokens asked", flush=True)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    save()
    for concurrency in args.concurrency:
        for name in args.schedulers:
            try:
                if name == "static":
                    row = run_static(model, work, concurrency, args.device, spec.pad_id)
                else:
                    row = run_continuous(model, work, concurrency, args.device, json.loads(args.cb_config))
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                row = {"scheduler": name, "concurrency": concurrency, "error": f"{type(exc).__name__}: {exc}"}
            report["runs"].append(row)
            save()
            print(json.dumps(row), flush=True)

    cols = ["scheduler", "concurrency", "tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s",
            "tpot_p50_s", "tpot_p99_s", "e2e_p99_s", "peak_bytes"]
    print("\n" + " | ".join(cols))
    for row in report["runs"]:
        print(" | ".join(f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, row.get("error", "")))
                         for c in cols))
    by = {(r["scheduler"], r["concurrency"]): r for r in report["runs"] if "tokens_per_s" in r}
    for c in args.concurrency:
        if ("static", c) in by and ("continuous", c) in by:
            print(f"concurrency {c}: continuous / static tokens/s = "
                  f"{by[('continuous', c)]['tokens_per_s'] / by[('static', c)]['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
