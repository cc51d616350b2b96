"""The Llama's tuning with fast probes (a prefill and a few decode steps against the worst-length
KV cache, checked by one real generation) beside today's whole-generation search, on one device,
same settings, same loaded model: probes, seconds, max safe batch, batch to serve, and how far the
fast answer is from the whole-generation one (issue 14, item 2: < 30 s, within 5%, on an H200).

    python benchmarks/llama_fast_tuning.py --device cuda --llama-config llama3-8b --out $OUT/llama_fast.json
    python benchmarks/llama_fast_tuning.py --quick      # CPU, small config, max batch 2
"""
from __future__ import annotations

import argparse
import sys
import time

from bench_common import default_out, environment, say, table, write_json  # noqa: E402 - puts the repo on sys.path

from deployments.registry import create_spec  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--llama-config", default="small", help="synthetic Llama shape: small or llama3-8b")
    parser.add_argument("--memory-fraction", type=float, default=0.22,
                        help="of the device (0.22: docs/benchmarks-gpu.md's four replicas on one card)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--order", default="fast,full", help="which search runs first: fast,full or full,fast")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    kind = resolve_device_kind("cpu" if args.quick else args.device)
    spec = create_spec("llama_int4", **({"config": args.llama_config, "max_prompt_tokens": 64, "max_new_tokens": 16}
                                        if args.quick else {"config": args.llama_config}))
    meter = make_meter(kind)
    dtype = spec.default_dtype(kind)
    started = time.perf_counter()
    spec.load(meter.torch_device, dtype)
    load_s = time.perf_counter() - started
    say(f"loaded {spec.weights_description()} on {meter.torch_device} in {load_s:.1f} s")

    rows = []
    for variant in args.order.split(","):
        settings = TuningSettings(device=kind, dtype=dtype, memory_fraction=args.memory_fraction,
                                  max_batch=2 if args.quick else args.max_batch, fast_probes=variant == "fast")
        if args.quick:
            settings.memory_fraction, settings.memory_budget_bytes = None, 8 * 2**30
            settings.repeats, settings.latency_budget_s = 1, 120.0
        meter.cleanup()
        began = time.perf_counter()
        tuning = autobatch(spec, settings, cache=None, loaded=True, meter=meter, say=say)
        rows.append({"search": "fast probes" if variant == "fast" else "whole generations",
                     "probes": tuning.probe_count, "seconds": time.perf_counter() - began,
                     "max_safe_batch": tuning.max_safe_batch, "batch_size": tuning.batch_size,
                     "stopped_by": tuning.stopped_by, "serve_latency_s": tuning.serve_latency_s,
                     "tuning": tuning.to_dict()})
        # what finished survives a later variant cut off by a time limit
        write_json(args.out or default_out("llama_fast_tuning", kind, args.quick),
                   {"environment": environment(kind), "load_s": load_s, "rows": rows, "partial": True})
    by = {r["search"]: r for r in rows}
    fast, full = by.get("fast probes"), by.get("whole generations")
    summary = {}
    if fast and full:
        summary = {"max_safe_within": abs(fast["max_safe_batch"] - full["max_safe_batch"]) / full["max_safe_batch"],
                   "speedup": full["seconds"] / fast["seconds"]}
    print(table(rows, [("search", "search", ""), ("probes", "probes", "d"), ("seconds", "seconds", ".1f"),
                       ("max safe", "max_safe_batch", "d"), ("serving", "batch_size", "d"),
                       ("bounded by", "stopped_by", ""), ("latency s", "serve_latency_s", ".2f")]))
    if summary:
        print(f"max safe batch differs by {summary['max_safe_within']:.1%}; fast search {summary['speedup']:.1f}x faster")
    out = args.out or default_out("llama_fast_tuning", kind, args.quick)
    say(f"wrote {write_json(out, {'environment': environment(kind), 'load_s': load_s, 'rows': rows, 'summary': summary})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
