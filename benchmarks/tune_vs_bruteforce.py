"""autobatch's search vs a brute-force scan of the true maximum, under the same memory budgets.

For each budget: `autobatch` (fresh, no cache) reports its max safe batch, probes, OOMs and time;
then a brute-force scan measures every size from 1 upward with the same meter until the first size
over the budget: the true maximum. Latency is not a bound here (a huge latency budget), so both
answer the same question: the largest batch whose peak memory fits the budget.

    python benchmarks/tune_vs_bruteforce.py --model resnet50 --device cuda --budgets-mb 1024 2048 4096
    python benchmarks/tune_vs_bruteforce.py --quick          # CPU, tiny, for the test suite
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

from deployments.registry import create_spec  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.probe import probe  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402


def brute_force(spec, meter, budget_bytes: int, start: int, limit: int, repeats: int, step: int = 1) -> tuple[int, int, float]:
    """Largest size with every size from 1 to it within the budget (scanned upward from `start`,
    which must be known to fit), each size measured exactly as the tuner measures a probe (one
    warm-up, then `repeats` runs: the caching allocator's peak grows over repeated runs, so fewer
    runs would read lower peaks). Returns (true max, sizes scanned, seconds)."""
    started = time.perf_counter()
    scanned = 0
    best = start
    size = start
    while size <= limit:
        batch = spec.example_batch(size)
        result = probe(lambda n: spec.predict(batch), size, meter, memory_budget_bytes=budget_bytes,
                       latency_budget_s=None, warmup=1, repeats=repeats)
        del batch
        scanned += 1
        if not result.ok:
            break
        best = size
        size += step
    return best, scanned, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="CPU, one small budget: keeps the script from rotting")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.max_batch = "cpu", 8

    kind = resolve_device_kind(args.device)
    spec = create_spec(args.model)
    meter = make_meter(kind)
    dtype = spec.default_dtype(kind) if args.dtype == "auto" else args.dtype
    spec.load(meter.torch_device, dtype)
    meter.cleanup()
    if args.quick:  # a budget a few samples above what the loaded model takes here
        args.budgets_mb = [(meter.current_bytes() + 300 * 2**20) / 2**20]
    rows = []
    for budget_mb in args.budgets_mb:
        budget = int(budget_mb * 2**20)
        settings = TuningSettings(device=kind, dtype=dtype, memory_budget_bytes=budget, latency_budget_s=1e6,
                                  max_batch=args.max_batch)
        result = autobatch(spec, settings, cache=None, loaded=True, say=lambda line: print(line, file=sys.stderr))
        found = result["max_safe_batch"]
        # Scan upward from a size comfortably below the answer (each size below it was either
        # probed or lies under a probed good size), one size at a time, to the first failure.
        scan_from = max(1, int(found * 0.8))
        true_max, scanned, scan_s = brute_force(spec, meter, budget, scan_from, args.max_batch, settings.repeats)
        rows.append({
            "model": args.model, "device": meter.fingerprint.label, "dtype": dtype, "budget_mb": budget_mb,
            "found": found, "true_max": true_max, "ratio": found / true_max if true_max else None,
            "within_budget": all(p["peak_bytes"] <= budget for p in result["probes"]
                                 if p["batch_size"] == found and p["peak_bytes"] is not None),
            "probes": result["search_probe_count"], "knee_probes": result["probe_count"] - result["search_probe_count"],
            "ooms": result["oom_events"], "predicted_skips": result["predicted_skips"],
            "tune_s": result["tuning_s"], "serve_batch": result["batch_size"],
            "brute_force_sizes": scanned, "brute_force_s": scan_s,
        })
    header = (f"{'budget MiB':>10} {'found':>6} {'true max':>8} {'ratio':>6} {'probes':>6} {'OOMs':>4} "
              f"{'tune s':>7} {'serve':>5}  device")
    print(header)
    for r in rows:
        print(f"{r['budget_mb']:>10.0f} {r['found']:>6} {r['true_max']:>8} {r['ratio']:>6.3f} {r['probes']:>6} "
              f"{r['ooms']:>4} {r['tune_s']:>7.1f} {r['serve_batch']:>5}  {r['device']} ({r['dtype']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
