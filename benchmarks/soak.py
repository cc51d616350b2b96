"""Soak: one autobatch route under twice its measured capacity for minutes, with malformed requests
mixed in; reports requests by status, p50/p99 of the served ones and the replica's resident memory
per window, so a leak or a latency creep shows.

  1. deploy serve.app:build for the model on a local Ray (CPU or GPU), tune (or take the cache);
  2. measure the capacity: closed loop at 2 x the tuned batch size for --capacity-s seconds;
  3. open loop (Poisson arrivals) at --load x that rate for --minutes, in --window-s windows, one
     request in --bad-every a malformed one from the model family's matrix (below);
  4. per window: requests by HTTP status, p50/p99 of the 200s, replica RSS (or GPU memory the
     replica reports) at the window's end; then RSS after warm-up (the first window's end) against
     the last window's.

The malformed matrix: images: empty, 1 byte, truncated JPEG, text as JPEG, a GIF, bad JSON;
LLM: empty, bad JSON, a JSON list, a huge max_new_tokens, a non-string prompt. Every one must get
a 4xx; overload gets 503 (serve/replica/admission.py).

    python benchmarks/soak.py --model vit_b_16 --minutes 10
    python benchmarks/soak.py --model resnet50 --minutes 2 --window-s 15
    python benchmarks/soak.py --quick       # CPU, ResNet-50, ~10 s of load: keeps the script from rotting
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import default_out, describe_environment, environment, say, start_cluster, table, write_json  # noqa: E402

import httpx  # noqa: E402

from deployments.registry import model_names, spec_class  # noqa: E402
from optimizer.stats import percentile  # noqa: E402
from autobatch.client.load import Load, LoadRun  # noqa: E402

ROUTE = "/soak"


def image_malformed(good_jpeg: bytes) -> list[tuple[str, bytes, str]]:
    from PIL import Image

    gif = io.BytesIO()
    Image.new("P", (32, 32)).save(gif, "GIF")
    return [("empty", b"", "image/jpeg"), ("1 byte", b"\xff", "image/jpeg"),
            ("truncated JPEG", good_jpeg[: len(good_jpeg) // 3], "image/jpeg"),
            ("text as JPEG", b"this is not an image at all", "image/jpeg"),
            ("GIF", gif.getvalue(), "image/gif"), ("bad JSON", b'{"image": ', "application/json")]


def llm_malformed() -> list[tuple[str, bytes, str]]:
    return [("empty", b"", "application/json"), ("bad JSON", b'{"prompt": ', "application/json"),
            ("JSON list", b"[1, 2, 3]", "application/json"),
            ("huge max_new_tokens", json.dumps({"prompt": "hi", "max_new_tokens": 10**9}).encode(), "application/json"),
            ("prompt not a string", json.dumps({"prompt": 42}).encode(), "application/json")]


def payload_mix(model: str, bad_every: int) -> tuple[list[tuple[bytes, str]], list[str]]:
    """The payloads the load cycles through, and the malformed cases' names."""
    good_body, good_type = spec_class(model).example_payload(max_new_tokens=8) if model.startswith("llama") \
        else spec_class(model).example_payload()
    bad = llm_malformed() if model.startswith("llama") else image_malformed(good_body)
    payloads = []
    for name, body, content_type in bad:
        payloads += [(good_body, good_type)] * (bad_every - 1) + [(body, content_type)]
    return payloads, [name for name, _, _ in bad]


def replica_memory(http: httpx.Client) -> tuple[int | None, int | None]:
    """(pid, resident bytes) of the route's replica; GPU: the memory the replica reports instead."""
    import psutil

    t = http.get(f"{ROUTE}/tuning").json()
    pid = t["replica"]["pid"]
    if t["device"]["kind"] == "cuda":
        return pid, None  # the dashboard's autobatch_device_memory_bytes; RSS says little on a GPU
    try:
        return pid, psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return pid, None


def window_row(index: int, records, wall_s: float, rss: int | None) -> dict:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ok = [r.latency_s for r in records if r.ok]
    return {"window": index, "requests": len(records), "requests_per_s": len(records) / max(wall_s, 1e-9),
            "statuses": dict(sorted(statuses.items())), "ok": len(ok),
            "p50_ms": percentile(ok, 50) * 1e3 if ok else None, "p99_ms": percentile(ok, 99) * 1e3 if ok else None,
            "max_ms": max(ok) * 1e3 if ok else None, "rss_mib": rss / 2**20 if rss else None}


def run_window(base: str, payloads, rate: float, seconds: float, timeout_s: float, seed: int):
    import asyncio

    load = Load(route=ROUTE, payloads=payloads, url=base, rate=rate, duration_s=seconds, timeout_s=timeout_s,
                arrivals="poisson", seed=seed, max_in_flight=4096)
    load.validate()
    run = LoadRun(load, progress=False)
    started = time.perf_counter()
    asyncio.run(run.run())
    return run.records, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="vit_b_16", choices=tuple(model_names()))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--minutes", type=float, default=10.0, help="load after the capacity is measured")
    parser.add_argument("--window-s", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--load", type=float, default=2.0, help="x the measured capacity (requests/s)")
    parser.add_argument("--capacity-s", type=float, default=15.0, help="seconds of closed loop that measure the capacity")
    parser.add_argument("--bad-every", type=int, default=5, help="one request in this many is malformed")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch the tuning may try (default: CUDA 256, CPU 32)")
    parser.add_argument("--latency-budget-ms", type=float, default=None)
    parser.add_argument("--tune-repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--cache", default=None, help="tuning cache (default: a fresh one)")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/soak-<model>-<device>.json)")
    parser.add_argument("--quick", action="store_true", help="CPU, ResNet-50, max batch 2, 2 windows of 4 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.model, args.max_batch, args.tune_repeats = "cpu", "resnet50", 2, 1
        args.minutes, args.window_s, args.capacity_s = 8 / 60, 4.0, 2.0

    import torch

    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = environment(kind)
    say(describe_environment(env))
    payloads, malformed = payload_mix(args.model, max(2, args.bad_every))
    cache_path = args.cache or os.path.join(tempfile.mkdtemp(prefix="autobatch-soak-"), "tuning.json")
    cores = os.cpu_count() or 1
    base = start_cluster(num_cpus=cores, threads=None if kind == "cuda" else cores)
    rows, info = [], {}
    try:
        from ray import serve

        from serve.app import build

        serve.run(build({"model": args.model, "device": kind, "max_batch": args.max_batch or (256 if kind == "cuda" else 32),
                         "latency_budget_ms": args.latency_budget_ms, "repeats": args.tune_repeats,
                         "cache_path": cache_path, "num_cpus": 1.0 if kind == "cuda" else float(cores)}),
                  name="soak", route_prefix=ROUTE)
        with httpx.Client(base_url=base, timeout=60) as http:
            t = http.get(f"{ROUTE}/tuning").json()
            info = {"batch_size": t["serving"]["max_batch_size"], "batch_wait_timeout_s": t["serving"]["batch_wait_timeout_s"],
                    "latency_budget_s": t["latency_budget_s"], "cache": t["cache"]}
            good = [payloads[0]]
            capacity_load = Load(route=ROUTE, payloads=good, url=base, concurrency=2 * info["batch_size"],
                                 duration_s=args.capacity_s, timeout_s=args.timeout, warmup_requests=2 * info["batch_size"])
            import asyncio

            capacity = asyncio.run(LoadRun(capacity_load, progress=False).run())
            info["capacity_requests_per_s"] = capacity["samples_per_s"]
            rate = max(0.5, args.load * capacity["samples_per_s"])
            info["rate_requests_per_s"] = rate
            say(f"{args.model} ({kind}): batch {info['batch_size']}, capacity {capacity['samples_per_s']:.1f} req/s; "
                f"soaking at {rate:.1f} req/s ({args.load:g}x) for {args.minutes:g} min, 1 in {args.bad_every} malformed")
            windows = max(1, round(args.minutes * 60 / args.window_s))
            for index in range(windows):
                records, wall_s = run_window(base, payloads, rate, args.window_s, args.timeout, seed=index)
                pid, rss = replica_memory(http)
                row = window_row(index, records, wall_s, rss)
                row["pid"] = pid
                rows.append(row)
                say(f"window {index}: {row['requests']} requests {row['statuses']}, p50 {row['p50_ms'] or 0:.0f} ms, "
                    f"p99 {row['p99_ms'] or 0:.0f} ms, RSS {row['rss_mib'] or 0:.0f} MiB")
            info["stats"] = http.get(f"{ROUTE}/tuning").json()["stats"]
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    totals: dict[str, int] = {}
    for row in rows:
        for status, n in row["statuses"].items():
            totals[status] = totals.get(status, 0) + n
    rss = [r["rss_mib"] for r in rows if r["rss_mib"]]
    summary = {"statuses": dict(sorted(totals.items())), "malformed_cases": malformed,
               "rss_after_warmup_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
               "rss_change": (rss[-1] / rss[0] - 1) if len(rss) >= 2 else None,
               "same_replica_throughout": len({r["pid"] for r in rows}) == 1}
    print(describe_environment(env))
    print(f"{args.model} on {kind}: {info}")
    print(table([{**r, "statuses": " ".join(f"{k}:{v}" for k, v in r["statuses"].items())} for r in rows],
                [("window", "window", ""), ("requests", "requests", ""), ("req/s", "requests_per_s", ".1f"),
                 ("statuses", "statuses", ""), ("p50 ms", "p50_ms", ".0f"), ("p99 ms", "p99_ms", ".0f"),
                 ("max ms", "max_ms", ".0f"), ("RSS MiB", "rss_mib", ".0f")]))
    change = summary["rss_change"]
    print(f"requests by status: {summary['statuses']}; RSS after warm-up {summary['rss_after_warmup_mib'] or 0:.0f} MiB, "
          f"at the end {summary['rss_end_mib'] or 0:.0f} MiB ({'n/a' if change is None else f'{change * 100:+.1f}%'})")
    out = args.out or default_out(f"soak-{args.model}", kind, args.quick)
    write_json(out, {"environment": env, "settings": vars(args), "serving": info, "windows": rows, "summary": summary})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
