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
from optimizer.model import ExampleBatches  # noqa: E402
from optimizer.probe import probe  # noqa: E402
from optimizer.tune import TuningSettings, autobatch, resolve  # noqa: E402


def check_at(spec, meter, settings: TuningSettings, fast_row: dict, repeats: int) -> dict:
    """Whole generations at the fast search's serving batch, timed as the whole-generation search
    would time that size: how far its latency is from what the fast probes predicted."""
    resolved = resolve(spec, settings, meter.fingerprint)
    batch = fast_row["batch_size"]
    result = probe(ExampleBatches(spec), batch, meter, memory_budget_bytes=resolved.memory_budget_bytes,
                   latency_budget_s=None, warmup=0, repeats=repeats)
    predicted_s = fast_row["serve_latency_s"]
    measured_s = result.latency_s
    return {"batch_size": batch, "outcome": result.outcome, "repeats": result.repeats,
            "predicted_latency_s": predicted_s, "measured_latency_s": measured_s,
            "latency_error": (predicted_s - measured_s) / measured_s if measured_s else None,
            "predicted_throughput": batch / predicted_s if predicted_s else None,
            "measured_throughput": result.throughput, "peak_bytes": result.peak_bytes,
            "memory_budget_bytes": resolved.memory_budget_bytes,
            "latency_budget_s": resolved.latency_budget_s,
            "within_budget": measured_s is not None and measured_s <= resolved.latency_budget_s
            and (result.peak_bytes or 0) <= resolved.memory_budget_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--llama-config", default="small", help="synthetic Llama shape: small or llama3-8b")
    parser.add_argument("--memory-fraction", type=float, default=0.22,
                        help="of the device (0.22: docs/benchmarks-gpu.md's four replicas on one card)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--order", default="fast,check,full",
                        help="what runs, in order: fast (the fast-probe search), check (whole generations at the fast "
                             "search's batch: its latency against the fast prediction), full (the whole-generation search)")
    parser.add_argument("--check-repeats", type=int, default=2, help="whole generations timed at the fast search's batch")
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

    rows, checks = [], []
    for variant in args.order.split(","):
        settings = TuningSettings(device=kind, dtype=dtype, memory_fraction=args.memory_fraction,
                                  max_batch=2 if args.quick else args.max_batch, fast_probes=variant == "fast")
        if args.quick:
            settings.memory_fraction, settings.memory_budget_bytes = None, 8 * 2**30
            settings.repeats, settings.latency_budget_s = 1, 120.0
        meter.cleanup()
        began = time.perf_counter()
        if variant == "check":
            fast_row = next((r for r in rows if r["search"] == "fast probes"), None)
            if fast_row is None:
                say("check: no fast search ran before it; skipped")
                continue
            checks.append(check_at(spec, meter, settings, fast_row, args.check_repeats))
            checks[-1]["seconds"] = time.perf_counter() - began
            say(f"check: whole generations at batch {checks[-1]['batch_size']}: {checks[-1]['measured_latency_s']:.2f} s "
                f"measured vs {checks[-1]['predicted_latency_s']:.2f} s predicted ({checks[-1]['latency_error']:+.1%}), "
                f"{checks[-1]['measured_throughput']:.1f} vs {checks[-1]['predicted_throughput']:.1f} sequences/s, "
                f"within the budget: {checks[-1]['within_budget']}")
            write_json(args.out or default_out("llama_fast_tuning", kind, args.quick),
                       {"environment": environment(kind), "load_s": load_s, "rows": rows, "checks": checks, "partial": True})
            continue
        tuning = autobatch(spec, settings, cache=None, loaded=True, meter=meter, say=say)
        rows.append({"search": "fast probes" if variant == "fast" else "whole generations",
                     "probes": tuning.probe_count, "seconds": time.perf_counter() - began,
                     "max_safe_batch": tuning.max_safe_batch, "batch_size": tuning.batch_size,
                     "stopped_by": tuning.stopped_by, "serve_latency_s": tuning.serve_latency_s,
                     "tuning": tuning.to_dict()})
        # what finished survives a later variant cut off by a time limit
        write_json(args.out or default_out("llama_fast_tuning", kind, args.quick),
                   {"environment": environment(kind), "load_s": load_s, "rows": rows, "checks": checks, "partial": True})
    by = {r["search"]: r for r in rows}
    fast, full = by.get("fast probes"), by.get("whole generations")
    summary = {}
    if checks:
        summary["check_latency_error"] = checks[-1]["latency_error"]
        summary["check_within_5_percent"] = abs(checks[-1]["latency_error"]) <= 0.05
    if fast and full:
        summary = {"max_safe_within": abs(fast["max_safe_batch"] - full["max_safe_batch"]) / full["max_safe_batch"],
                   "speedup": full["seconds"] / fast["seconds"]}
    print(table(rows, [("search", "search", ""), ("probes", "probes", "d"), ("seconds", "seconds", ".1f"),
                       ("max safe", "max_safe_batch", "d"), ("serving", "batch_size", "d"),
                       ("bounded by", "stopped_by", ""), ("latency s", "serve_latency_s", ".2f")]))
    if "max_safe_within" in summary:
        print(f"max safe batch differs by {summary['max_safe_within']:.1%}; fast search {summary['speedup']:.1f}x faster")
    out = args.out or default_out("llama_fast_tuning", kind, args.quick)
    if checks:
        c = checks[-1]
        print(f"fast search: batch {c['batch_size']} predicted {c['predicted_latency_s']:.2f} s per generation; "
              f"whole generations measured {c['measured_latency_s']:.2f} s ({c['latency_error']:+.1%})")
    say(f"wrote {write_json(out, {'environment': environment(kind), 'load_s': load_s, 'rows': rows, 'checks': checks, 'summary': summary})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
