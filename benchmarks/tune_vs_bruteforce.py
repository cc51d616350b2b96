"""autobatch's search vs a brute-force scan of the true maximum, under the same memory budgets.

For each budget: `autobatch` (fresh, no cache) reports its max safe batch, probes, OOMs and time;
then the brute-force scan of bruteforce.py measures sizes around that answer with the same meter, up
to the first size over the budget and every size in the last step before it: the true maximum. Latency is not a bound here (a huge latency budget), so both
answer the same question: the largest batch whose peak memory fits the budget.

    python benchmarks/tune_vs_bruteforce.py --model resnet50 --device cuda --budgets-mb 1024 2048 4096
    python benchmarks/tune_vs_bruteforce.py --quick          # CPU, tiny, for the test suite
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import fmt  # noqa: E402 - also puts the repo on sys.path, offline settings
from bruteforce import Measurer, brute_force  # noqa: E402

from deployments.registry import create_spec  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--budgets-mb", type=float, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option, e.g. image_pipeline=host (the pre-issue-13 host decode path)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="CPU, one small budget, max batch 8, one timed run per size: keeps the script from rotting")
    args = parser.parse_args(argv)
    repeats = TuningSettings.repeats
    if args.quick:
        args.device, args.max_batch, repeats = "cpu", 8, 1

    kind = resolve_device_kind(args.device)
    options = dict(item.split("=", 1) for item in args.option)
    spec = create_spec(args.model, **options)
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
                                  max_batch=args.max_batch, repeats=repeats)
        tuning = autobatch(spec, settings, cache=None, loaded=True, meter=meter,
                           say=lambda line: print(line, file=sys.stderr))
        found = tuning.max_safe_batch
        scan = brute_force(Measurer(spec, meter, budget, settings.repeats), found, args.max_batch)
        true_max = scan["found"]
        rows.append({
            "model": args.model, "device": meter.fingerprint.label, "dtype": dtype, "budget_mb": budget_mb,
            "found": found, "true_max": true_max, "ratio": found / true_max if true_max else None,
            "within_budget": all(p.peak_bytes <= budget for p in tuning.probes
                                 if p.batch_size == found and p.peak_bytes is not None),
            "probes": tuning.search_probe_count, "knee_probes": tuning.probe_count - tuning.search_probe_count,
            "ooms": tuning.oom_events, "predicted_skips": tuning.predicted_skips,
            "tune_s": tuning.tuning_s, "serve_batch": tuning.batch_size,
            "brute_force_sizes": scan["probes"], "brute_force_s": scan["seconds"],
        })
    header = (f"{'budget MiB':>10} {'found':>6} {'true max':>8} {'ratio':>6} {'probes':>6} {'OOMs':>4} "
              f"{'tune s':>7} {'serve':>5}  device")
    print(header)
    for r in rows:
        print(f"{r['budget_mb']:>10.0f} {r['found']:>6} {fmt(r['true_max']):>8} {fmt(r['ratio'], '.3f'):>6} {r['probes']:>6} "
              f"{r['ooms']:>4} {r['tune_s']:>7.1f} {r['serve_batch']:>5}  {r['device']} ({r['dtype']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
