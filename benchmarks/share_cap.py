"""An enforced GPU share (optimizer/share_cap.py), measured: the max safe batch tuned without a cap
and tuned under `torch.cuda.set_per_process_memory_fraction` for the same budget, then throughput
at both answers under the cap, side by side, with the allocator's churn (cudaMalloc retries after
freeing its cache) and out-of-memory counts: whether the capped answer serves more, or stalls on
the allocator (issue 14, item 4). GPU only.

    python benchmarks/share_cap.py --models resnet50 vit_b_16 yolo11n_pose --budget-gib 2 4 --out $OUT/share_cap.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench_common import environment, say, table, write_json  # noqa: E402 - puts the repo on sys.path

from deployments.registry import create_spec  # noqa: E402
from optimizer.devices import make_meter  # noqa: E402
from optimizer.share_cap import cap_allocator  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402


def serve_like(spec, meter, size: int, seconds: float) -> dict:
    """Back-to-back batches of `size` for `seconds` (after 3 untimed): samples/s, batch latency,
    and what the allocator did meanwhile."""
    import torch

    samples = spec.example_batch(size)
    try:
        for _ in range(3):
            spec.predict(samples)
        meter.synchronize()
        before = torch.cuda.memory_stats()
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            spec.predict(samples)
            meter.synchronize()
            latencies.append(time.perf_counter() - t0)
        after = torch.cuda.memory_stats()
    except Exception as exc:  # noqa: BLE001
        if not meter.is_oom(exc):
            raise
        meter.cleanup()
        return {"batch": size, "outcome": "oom"}
    elapsed = sum(latencies)
    return {"batch": size, "outcome": "ok", "samples_per_s": size * len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e3,
            "alloc_retries": after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0),
            "ooms": after.get("num_ooms", 0) - before.get("num_ooms", 0),
            "reserved_peak_gib": torch.cuda.max_memory_reserved() / 2**30}


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "yolo11n_pose"])
    parser.add_argument("--budget-gib", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--latency-budget-ms", type=float, default=60000.0, help="large: memory bounds the batch")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=8.0, help="serving time per measured batch size")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        spec = create_spec(name)
        meter = make_meter("cuda")
        spec.load(meter.torch_device, spec.default_dtype("cuda"))
        total = meter.fingerprint.total_memory_bytes
        for budget_gib in args.budget_gib:
            budget = int(budget_gib * 2**30)
            settings = TuningSettings(device="cuda", memory_budget_bytes=budget, max_batch=args.max_batch,
                                      latency_budget_s=args.latency_budget_ms / 1e3)
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
            meter.cleanup()
            uncapped = autobatch(spec, settings, cache=None, loaded=True, meter=meter, say=say)
            fraction = cap_allocator(torch.cuda, 0, budget, meter.outside_torch_bytes, total)
            meter.cleanup()
            capped = autobatch(spec, settings, cache=None, loaded=True, meter=meter, say=say)
            for answer, tuning in (("uncapped", uncapped), ("capped", capped)):
                meter.cleanup()
                torch.cuda.reset_peak_memory_stats()
                measured = serve_like(spec, meter, tuning.max_safe_batch, args.seconds)
                rows.append({"model": name, "budget_gib": budget_gib, "tuned": answer, "cap_fraction": fraction,
                             "max_safe_batch": tuning.max_safe_batch, "knee": tuning.batch_size,
                             "probes": tuning.probe_count, "tuning_s": tuning.tuning_s, **measured})
                say(f"{name} {budget_gib} GiB {answer}: {rows[-1]}")
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        del spec
        meter.cleanup()
    print("all served under the cap (the budget less the CUDA context):")
    print(table(rows, [("model", "model", ""), ("budget GiB", "budget_gib", "g"), ("tuned", "tuned", ""),
                       ("max safe", "max_safe_batch", "d"), ("knee", "knee", "d"), ("outcome", "outcome", ""),
                       ("samples/s", "samples_per_s", ".0f"), ("p50 ms", "p50_ms", ".1f"), ("p99 ms", "p99_ms", ".1f"),
                       ("alloc retries", "alloc_retries", "d"), ("ooms", "ooms", "d"),
                       ("reserved GiB", "reserved_peak_gib", ".2f"), ("tuning s", "tuning_s", ".1f")]))
    if args.out:
        say(f"wrote {write_json(args.out, {'environment': environment('cuda'), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
