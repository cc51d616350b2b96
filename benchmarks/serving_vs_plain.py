"""Serving side by side: one model under the same closed-loop HTTP load through
  (a) autobatch       serve.app:build (start-up tuning, tuned @serve.batch size and wait,
                      max_ongoing_requests from the tuning bounds),
  (b) plain batched   plain Ray Serve with @serve.batch defaults (max_batch_size=10,
                      batch_wait_timeout_s=0.01) and max_ongoing_requests=5 (Ray's default),
  (c) unbatched       plain Ray Serve, one forward pass per request, max_ongoing_requests=5,
  (d) optional, --variants ... "plain batched, high ongoing": (b) with max_ongoing_requests raised to
      autobatch's, which separates the gain of the batch settings from that of the admission limit,
  (e) optional, "autobatch, plain's batching": (a) with its batch size and wait pinned by user_config
      to @serve.batch's defaults (10, 10 ms): against (d), what autobatch's own serving path costs or
      saves with the batching held equal; against (a), what the tuned size and wait change,
one after another on the same Ray cluster (one replica at a time, the same resources each), then the
raw model in a bare loop (no HTTP, no Ray) at the batch sizes served: the ceiling.

Per variant and concurrency: requests/s, samples/s (one sample per request), p50/p99 latency, the mean
batch the replica formed (its own count of batches and samples), errors. The load is autobatch/client/bench.py's
closed loop from this process, over 127.0.0.1. The baselines are benchmarks/plain_serve.py: the same
ModelSpec, the same decode-before-batching and forward-in-a-worker-thread as autobatch; only the
batching differs.

    python benchmarks/serving_vs_plain.py --model resnet50 --concurrency 1 8 32 128 --duration 20
    python benchmarks/serving_vs_plain.py --model resnet50 --device cpu --concurrency 1 4 16 --duration 15
    python benchmarks/serving_vs_plain.py --quick          # CPU, tiny: keeps the script from rotting
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import default_out, describe_environment, start_cluster, environment, markdown_table, say, table, write_json  # noqa: E402

import httpx  # noqa: E402

from deployments.registry import model_names, spec_class  # noqa: E402
from optimizer.tuning import Tuning  # noqa: E402
from autobatch.client.bench import Load, run_load  # noqa: E402
from autobatch.client.http_client import make_payload  # noqa: E402

MODELS = tuple(model_names())
PINNED = "autobatch, plain's batching"
VARIANTS = ("autobatch", "plain batched", "unbatched", "plain batched, high ongoing", PINNED)
DEFAULT_VARIANTS = VARIANTS[:3]
ROUTES = {"autobatch": "/autobatch", "plain batched": "/plain", "unbatched": "/unbatched",
          "plain batched, high ongoing": "/plain-ongoing", PINNED: "/autobatch-pinned"}
PINNED_USER_CONFIG = {"batch_size": 10, "batch_wait_timeout_ms": 10.0}  # @serve.batch's defaults


def is_autobatch(variant: str) -> bool:
    return variant in ("autobatch", PINNED)


def build_variant(variant: str, args, on_gpu: bool, cache_path: str):
    from plain_serve import PlainBatched, Unbatched

    from serve.app import build

    options = model_options(args)
    if is_autobatch(variant):
        app_args = {"model": args.model, "device": "cuda" if on_gpu else "cpu", "max_batch": args.max_batch, "cache_path": cache_path,
                    "num_cpus": args.num_cpus, "num_gpus": 1.0, "repeats": args.tune_repeats, "options": options}
        if args.latency_budget_ms:
            app_args["latency_budget_ms"] = args.latency_budget_ms
        if variant == PINNED:
            app_args["user_config"] = dict(PINNED_USER_CONFIG)
        return build(app_args)
    cls = Unbatched if variant == "unbatched" else PlainBatched
    if args.plain_image_pipeline:  # "as Ray Serve's docs teach": PIL decode per request is host
        options = {**options, "image_pipeline": args.plain_image_pipeline}
    extra = {"max_ongoing_requests": 2 * args.max_batch} if variant == "plain batched, high ongoing" else {}
    return cls.options(ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": 1.0 if on_gpu else 0}, **extra).bind(
        args.model, options, "cuda" if on_gpu else "cpu")


def model_options(args) -> dict:
    return {"config": args.llama_config} if args.model == "llama_int4" and args.llama_config else {}


def replica_stats(http: httpx.Client, variant: str) -> dict:
    path = ROUTES[variant] + ("/tuning" if is_autobatch(variant) else "/stats")
    body = http.get(path).json()
    stats = body["stats"] if is_autobatch(variant) else body
    return {"batches": stats["batches"], "samples": stats["samples_served"],
            "sizes": {int(k): v for k, v in stats["batch_sizes"].items()},
            # autobatch re-derives its wait from served batches: the wait in effect at the end of a level
            "wait_ms": body["serving"]["batch_wait_timeout_s"] * 1e3 if is_autobatch(variant) else None}


def serve_variant(variant: str, args, base: str, payloads, on_gpu: bool, cache_path: str) -> tuple[list[dict], dict]:
    from ray import serve

    route = ROUTES[variant]
    started = time.perf_counter()
    app_name = route.strip("/")
    serve.run(build_variant(variant, args, on_gpu, cache_path), name=app_name, route_prefix=route)
    ready_s = time.perf_counter() - started
    info = {"variant": variant, "ready_s": ready_s}
    http = httpx.Client(base_url=base, timeout=120, trust_env=False)
    if is_autobatch(variant):
        report = http.get(route + "/tuning").json()  # the Tuning's fields, plus what the replica serves with
        t, serving, warm = Tuning.from_dict(report), report["serving"], report.get("warm_sizes") or {}
        info.update(batch_size=t.batch_size, max_safe_batch=t.max_safe_batch, wait_ms=t.batch_wait_timeout_s * 1e3,
                    tuning_s=t.tuning_s, cache=t.cache, max_ongoing=serving["max_ongoing_requests"],
                    latency_budget_ms=t.latency_budget_s * 1e3, decision=t.decision,
                    warm_sizes=warm.get("summary") or warm.get("skipped"))
        info["batching"] = f"max {serving['max_batch_size']}, wait {serving['batch_wait_timeout_s'] * 1e3:.0f} ms at start, ongoing {serving['max_ongoing_requests']}"
    else:
        info["batching"] = {"plain batched": "max 10, wait 10 ms, ongoing 5", "unbatched": "none, ongoing 5",
                            "plain batched, high ongoing": f"max 10, wait 10 ms, ongoing {2 * args.max_batch}"}[variant]
    say(f"  {variant}: ready in {ready_s:.1f} s ({info['batching']})")
    if args.warmup_s > 0:
        run_load(Load(route=route, url=base, payloads=payloads, concurrency=max(args.concurrency),
                      duration_s=args.warmup_s, timeout_s=args.timeout))
    rows = []
    for concurrency in args.concurrency:
        before = replica_stats(http, variant)
        report = run_load(Load(route=route, url=base, payloads=payloads, concurrency=concurrency,
                               duration_s=args.duration, max_requests=args.max_requests, timeout_s=args.timeout))
        after = replica_stats(http, variant)
        batches = after["batches"] - before["batches"]
        sizes = {k: v - before["sizes"].get(k, 0) for k, v in after["sizes"].items() if v - before["sizes"].get(k, 0) > 0}
        lat = report["latency_s"]
        rows.append({
            "model": args.model, "variant": variant, "batching": info["batching"], "concurrency": concurrency,
            "requests_per_s": report["requests_per_s"], "samples_per_s": report["samples_per_s"],
            "tokens_per_s": report.get("tokens_per_s"),
            "p50_ms": lat["p50"] * 1e3 if lat["p50"] is not None else None,
            "p90_ms": lat["p90"] * 1e3 if lat["p90"] is not None else None,
            "p99_ms": lat["p99"] * 1e3 if lat["p99"] is not None else None,
            "requests": report["requests"], "ok": report["ok"], "errors": sum(report["errors"].values()),
            "errors_by_status": report["errors"], "wall_s": report["wall_s"],
            "mean_batch": (after["samples"] - before["samples"]) / batches if batches else None,
            "largest_batch": max(sizes) if sizes else None, "batch_sizes": sizes,
            "wait_ms_at_end": after["wait_ms"],
        })
        r = rows[-1]
        say(f"    concurrency {concurrency}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms'] or 0:.0f} ms, "
            f"p99 {r['p99_ms'] or 0:.0f} ms, mean batch {r['mean_batch'] or 0:.1f}, errors {r['errors']}"
            + (f", wait now {after['wait_ms']:.1f} ms" if after["wait_ms"] is not None else ""))
    http.close()
    serve.delete(app_name)
    return rows, info


def raw_loop(args, kind: str, payload: tuple[bytes, str], sizes: list[int]) -> list[dict]:
    """The model alone: predict() on `size` decoded copies of the payload, median of the repeats."""
    import torch

    from deployments.registry import create_spec

    if args.threads and kind == "cpu":
        torch.set_num_threads(args.threads)
    spec = create_spec(args.model, **model_options(args))
    device = "cuda:0" if kind == "cuda" else "cpu"
    spec.load(device, spec.default_dtype(kind))
    sample = spec.decode(*payload)
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    rows = []
    for size in sizes:
        batch = [sample] * size
        spec.predict(batch)  # warm-up
        sync()
        times = []
        for _ in range(args.raw_repeats):
            t0 = time.perf_counter()
            spec.predict(batch)
            sync()
            times.append(time.perf_counter() - t0)
        latency = statistics.median(times)
        rows.append({"model": args.model, "batch": size, "latency_ms": latency * 1e3, "samples_per_s": size / latency})
        say(f"  raw loop b={size}: {latency * 1e3:.1f} ms, {size / latency:.1f} samples/s")
    del spec
    if kind == "cuda":
        torch.cuda.empty_cache()
    return rows


def nearest(raw: list[dict], size: float | None) -> dict | None:
    if not raw or size is None:
        return None
    return min(raw, key=lambda r: (abs(r["batch"] - size), r["batch"]))


SERVE_COLUMNS = [("variant", "variant", ""), ("batching", "batching", ""), ("concurrency", "concurrency", ""),
                 ("req/s", "requests_per_s", ".1f"), ("samples/s", "samples_per_s", ".1f"), ("p50 ms", "p50_ms", ".0f"),
                 ("p99 ms", "p99_ms", ".0f"), ("mean batch", "mean_batch", ".1f"), ("wait ms at end", "wait_ms_at_end", ".1f"),
                 ("errors", "errors", ""),
                 ("x ceiling", "x_ceiling", ".2f")]
RATIO_COLUMNS = [("concurrency", "concurrency", ""), ("autobatch / plain batched", "vs_plain", ".2f"),
                 ("autobatch / unbatched", "vs_unbatched", ".2f"), ("p99 autobatch / plain", "p99_vs_plain", ".2f"),
                 ("autobatch / plain, high ongoing", "vs_plain_high_ongoing", ".2f"),
                 ("pinned autobatch / plain, high ongoing", "pinned_vs_plain_high_ongoing", ".2f")]
RAW_COLUMNS = [("batch", "batch", ""), ("latency ms", "latency_ms", ".1f"), ("samples/s", "samples_per_s", ".1f")]


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["variant"], r["concurrency"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        a, p, u = by.get(("autobatch", c)), by.get(("plain batched", c)), by.get(("unbatched", c))
        h = by.get(("plain batched, high ongoing", c))
        pinned = by.get((PINNED, c))

        def ratio(x, y, key):
            return x[key] / y[key] if x and y and x.get(key) and y.get(key) else None

        out.append({"concurrency": c, "vs_plain": ratio(a, p, "requests_per_s"), "vs_unbatched": ratio(a, u, "requests_per_s"),
                    "p99_vs_plain": ratio(a, p, "p99_ms"), "vs_plain_high_ongoing": ratio(a, h, "requests_per_s"),
                    "pinned_vs_plain_high_ongoing": ratio(pinned, h, "requests_per_s")})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help="default: the first three; 'plain batched, high ongoing' is the ablation: @serve.batch "
                             "defaults with max_ongoing_requests raised to autobatch's (2 x --max-batch)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop levels (default: CUDA 1 8 32 128, CPU 1 4 16)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per level (default: CUDA 20, CPU 15)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="request bound per level")
    parser.add_argument("--warmup-s", type=float, default=None, help="load before measuring each variant, not counted (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-batch", type=int, default=None, help="autobatch: largest batch its tuning may try (default: CUDA 256, CPU 64)")
    parser.add_argument("--latency-budget-ms", type=float, default=None, help="autobatch: per-batch latency budget (default: the model's)")
    parser.add_argument("--tune-repeats", type=int, default=3, help="autobatch: timed runs per tuning probe")
    parser.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per replica (default: CUDA 1, CPU all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in replicas and the raw loop (default: CPU all cores; CUDA Ray's)")
    parser.add_argument("--input", default=None, help="payload file (default: the model's example payload: a generated 640x480 JPEG, a prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="models that generate: tokens per request")
    parser.add_argument("--llama-config", default=None, help="synthetic Llama shape: small or llama3-8b")
    parser.add_argument("--raw-sizes", type=int, nargs="*", default=None, help="raw-loop batch sizes (default: 1, 10, the tuned size, powers of 2 up to it)")
    parser.add_argument("--raw-repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="autobatch tuning cache (default: a fresh one, so the replica tunes)")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/serving_vs_plain-<model>-<device>.json)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plain-image-pipeline", choices=["auto", "host", "device"], default=None,
                        help="the plain variants' image pipeline (vision models): host = PIL decode and transforms per "
                             "request on the CPU, as Ray Serve's docs teach (default: the model's own, as autobatch)")
    parser.add_argument("--quick", action="store_true", help="CPU, ResNet-50, concurrency 4, 1 s per level, max batch 4")
    args = parser.parse_args(argv)

    import torch

    if args.quick:
        args.device, args.model, args.concurrency, args.duration, args.warmup_s = "cpu", "resnet50", [4], 1.0, 0.5
        args.max_batch, args.tune_repeats, args.raw_repeats = 4, 1, 1
        args.raw_sizes = args.raw_sizes or [1, 4]
    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    on_gpu = kind == "cuda"
    args.concurrency = args.concurrency or ([1, 8, 32, 128] if on_gpu else [1, 4, 16])
    args.duration = args.duration or (20.0 if on_gpu else 15.0)
    args.warmup_s = 3.0 if args.warmup_s is None else args.warmup_s
    args.max_batch = args.max_batch or (256 if on_gpu else 64)
    cores = os.cpu_count() or 1
    args.num_cpus = args.num_cpus or (1.0 if on_gpu else float(cores))
    args.threads = args.threads or (None if on_gpu else cores)
    env = environment(kind)
    say(describe_environment(env))

    if args.input:
        payload = make_payload(open(args.input, "rb").read())
    else:
        payload = spec_class(args.model).example_payload(max_new_tokens=args.max_new_tokens)

    cache_dir = tempfile.mkdtemp(prefix="autobatch-bench-cache-")
    cache_path = args.cache or os.path.join(cache_dir, "tuning.json")
    rows, infos = [], {}
    out_path = args.out or default_out(f"serving_vs_plain-{args.model}", kind, args.quick)
    partial_path = out_path.replace(".json", "") + ".partial.json"  # a run cut off by a time limit keeps its variants
    base = start_cluster(num_cpus=max(1, int(round(args.num_cpus))) if not on_gpu else cores, threads=args.threads)
    say(f"{args.model}: serving on {base} ({kind}), {args.duration:g} s per level at concurrency {args.concurrency}")
    try:
        for variant in args.variants:
            variant_rows, info = serve_variant(variant, args, base, [payload], on_gpu, cache_path)
            rows += variant_rows
            infos[variant] = info
            write_json(partial_path, {"environment": env, "variants": infos, "serving": rows, "partial": True})
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    tuned = infos.get("autobatch", {}).get("batch_size")
    sizes = args.raw_sizes
    if sizes is None:
        top = max(tuned or 1, 10)
        sizes = sorted({1, 10, *(2**i for i in range(1, 12) if 2**i <= top), *([tuned] if tuned else [])})
    say(f"{args.model}: raw loop at {sizes}")
    raw = raw_loop(args, kind, payload, sorted(set(sizes))) if sizes else []
    for r in rows:
        ceiling = nearest(raw, r["mean_batch"])
        r["ceiling_batch"] = ceiling["batch"] if ceiling else None
        r["x_ceiling"] = r["samples_per_s"] / ceiling["samples_per_s"] if ceiling and r["samples_per_s"] else None

    print(describe_environment(env))
    if "autobatch" in infos:
        i = infos["autobatch"]
        print(f"{args.model}: autobatch tuned batch {i['batch_size']} (max safe {i['max_safe_batch']}, wait {i['wait_ms']:.1f} ms, "
              f"latency budget {i['latency_budget_ms']:.0f} ms; tuning {i['tuning_s']:.1f} s, cache {i['cache']})")
        if i.get("warm_sizes"):
            print(f"{args.model}: before traffic: {i['warm_sizes']}")
    print(table(rows, SERVE_COLUMNS))
    print("autobatch relative to the baselines (requests/s; p99 latency):")
    print(table(ratios(rows), RATIO_COLUMNS))
    print("raw model, bare loop (the ceiling; x ceiling above = samples/s over the raw samples/s at the batch size nearest the mean batch formed):")
    print(table(raw, RAW_COLUMNS))
    if args.markdown:
        print(markdown_table(rows, SERVE_COLUMNS))
        print(markdown_table(ratios(rows), RATIO_COLUMNS))
        print(markdown_table(raw, RAW_COLUMNS))
    out = write_json(out_path, {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "model": args.model, "device_kind": kind, "variants": infos, "serving": rows, "ratios": ratios(rows), "raw": raw,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
