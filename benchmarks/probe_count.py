"""How many probes the search and the knee take, on simulated curves shaped like the H200's (and
curves made to punish an over-confident jump), against a brute-force scan of the same curve.

Run it on main and on a branch to compare searches: it uses only `Prober`, `find_max_safe_batch`
and `next_knee_probe`, which both have. The simulated card holds `--capacity` x the budget, so a
run over the budget is an OOM only when it is also over the card; `over` counts every run whose
true memory exceeded the budget (OOMs included).

    python benchmarks/probe_count.py                      # every curve at 1, 2 and 4 GiB
    python benchmarks/probe_count.py --capacity 1.0       # the card is the budget: over = OOM
    python benchmarks/probe_count.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys

import bench_common  # noqa: F401  (puts the repo on sys.path)

from optimizer.simulated import SimulatedDevice
from optimizer.search import Prober, find_max_safe_batch
from optimizer.select import next_knee_probe, select_serve_batch

try:
    from optimizer.select import MAX_KNEE_PROBES
except ImportError:  # before the limit moved to select.py
    from optimizer.tune import MAX_KNEE_PROBES

MiB = 2**20


def _rounded(x: float, block: float) -> float:
    return block * math.ceil(x / block)


def gpu_latency(fixed_s: float, per_sample_s: float):
    """Flat while the card is not yet full, then linear: max(fixed, per_sample * b) with a soft knee."""
    return lambda b: math.hypot(fixed_s, per_sample_s * b)


# name -> (memory(b) in bytes with memory(0) = the base, latency(b) in s[, the worst memory(b) a noisy
# curve reads, for the brute force: the largest size that always fits]). Shapes read off
# docs/results/h200_*: a base of 0.65-0.88 GiB, a workspace at b >= 1, then 5-25 MiB per sample.
def curves(seed: int = 0) -> dict:
    rng = random.Random(seed)
    resnet_mem = lambda b: 696 * MiB + (0 if b == 0 else 42 * MiB + 8.13 * MiB * b)
    vit_mem = lambda b: 826 * MiB + (0 if b < 3 else _rounded(5.2 * MiB * b, 20 * MiB))
    yolo_mem = lambda b: 648 * MiB + (0 if b == 0 else 12 * MiB + 24.6 * MiB * b)
    resnet_lat, vit_lat, yolo_lat = gpu_latency(0.005, 0.00031), gpu_latency(0.004, 0.00029), gpu_latency(0.009, 0.0009)
    return {
        "resnet50-like": (resnet_mem, resnet_lat),
        "vit_b_16-like (flat, 20 MiB blocks)": (vit_mem, vit_lat),
        "yolo11n_pose-like": (yolo_mem, yolo_lat),
        # affine for small b, then super-linear past 96 (an allocator or kernel regime change)
        "superlinear past 96": (lambda b: 700 * MiB + (0 if b == 0 else 30 * MiB + 8 * MiB * b
                                                       + 0.08 * MiB * max(0, b - 96) ** 2), resnet_lat),
        # a workspace that steps up by 512 MiB at b >= 160 (cuDNN picks another algorithm)
        "step +512 MiB at 160": (lambda b: 700 * MiB + (0 if b == 0 else 30 * MiB + 8 * MiB * b
                                                        + (512 * MiB if b >= 160 else 0)), resnet_lat),
        # per-sample memory jumps from 6 to 14 MiB past a workspace threshold at b = 128
        "per-sample 6->14 MiB at 128": (lambda b: 700 * MiB + (0 if b == 0 else 20 * MiB + 6 * MiB * min(b, 128)
                                                               + 14 * MiB * max(0, b - 128)), resnet_lat),
        # concave: a workspace that grows like sqrt(b) on top of 4 MiB per sample
        "concave (sqrt workspace)": (lambda b: 700 * MiB + (0 if b == 0 else 4 * MiB * b + 60 * MiB * math.sqrt(b)),
                                     vit_lat),
        # the resnet curve read with +-2% noise on every peak
        "resnet50-like, peaks +-2%": (lambda b: resnet_mem(b) if b == 0 else resnet_mem(b) * (1 + rng.uniform(-0.02, 0.02)),
                                      resnet_lat, lambda b: resnet_mem(b) * 1.02),
        # latency that jumps 3x past b = 200 (a kernel that stops fitting), bounded by 150 ms
        "latency x3 past 200 (150 ms)": (resnet_mem, lambda b: resnet_lat(b) * (3 if b > 200 else 1)),
    }


LATENCY_BOUND = {"latency x3 past 200 (150 ms)": 0.150}


def brute_force(memory, latency, budget: int, latency_budget: float | None, max_batch: int) -> int:
    """The largest size within both budgets, scanning every size."""
    best = 0
    for b in range(1, max_batch + 1):
        mem = memory(b)
        if mem > budget or (latency_budget is not None and latency(b) > latency_budget):
            break
        best = b
    return best


def run_one(name, memory, latency, worst_memory, budget_gib: float, capacity: float, max_batch: int) -> dict:
    budget = int(budget_gib * 2**30)
    latency_budget = LATENCY_BOUND.get(name)
    device = SimulatedDevice(memory, latency, int(budget * capacity), base_bytes=int(memory(0)))
    prober = Prober(device.run, device, memory_budget_bytes=budget, latency_budget_s=latency_budget,
                    base_bytes=device.base_bytes, warmup=1, repeats=3)
    result = find_max_safe_batch(prober, max_batch=max_batch, margin=0.10)
    search_probes = sum(p.ran for p in prober.probes)
    for _ in range(MAX_KNEE_PROBES):
        size = next_knee_probe(prober.probes, result.max_safe_batch, latency_budget)
        if size is None:
            break
        prober.run(size)
    chosen = select_serve_batch(prober.probes, result.max_safe_batch, latency_budget)
    true = brute_force(worst_memory or memory, latency, budget, latency_budget, max_batch)
    ran = [p for p in prober.probes if p.ran]
    # the knee the selection aims at, from every size: the smallest within 95% of the best throughput
    throughput = {b: b / latency(b) for b in range(1, result.max_safe_batch + 1)}
    best = max(throughput.values())
    knee = min(b for b, t in throughput.items() if t >= 0.95 * best)
    return {
        "curve": name, "budget_gib": budget_gib, "search_probes": search_probes,
        "knee_probes": len(ran) - search_probes, "ooms": device.oom_count,
        "over": sum(p.outcome in ("oom", "over_memory") for p in ran),
        "found": result.max_safe_batch, "true_max": true,
        "ratio": result.max_safe_batch / true if true else None, "serve": chosen.batch_size, "knee": knee,
        "serve_throughput_vs_best": throughput[chosen.batch_size] / best,
        "sizes": [p.batch_size for p in ran],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets-gib", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--capacity", type=float, default=1.5, help="the simulated card, as a multiple of the budget")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for budget in args.budgets_gib:
        for name, (memory, latency, *worst) in curves(args.seed).items():
            rows.append(run_one(name, memory, latency, worst[0] if worst else None, budget, args.capacity, args.max_batch))
    print(f"{'curve':<38} {'GiB':>4} {'search':>6} {'knee':>4} {'OOMs':>4} {'over':>4} {'found':>6} {'true':>6} "
          f"{'ratio':>6} {'serve':>5} {'knee':>5} {'T/best':>6}  sizes run")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"{r['curve']:<38} {r['budget_gib']:>4g} {r['search_probes']:>6} {r['knee_probes']:>4} {r['ooms']:>4} "
              f"{r['over']:>4} {r['found']:>6} {r['true_max']:>6} {ratio:>6} {r['serve']:>5} {r['knee']:>5} "
              f"{r['serve_throughput_vs_best']:>6.3f}  {r['sizes']}")
    n = len(rows)
    print(f"\n{n} runs: search probes mean {sum(r['search_probes'] for r in rows) / n:.2f}, max "
          f"{max(r['search_probes'] for r in rows)}; knee probes max {max(r['knee_probes'] for r in rows)}; "
          f"OOMs {sum(r['ooms'] for r in rows)}; over-budget runs {sum(r['over'] for r in rows)}; "
          f"serving throughput / best {min(r['serve_throughput_vs_best'] for r in rows):.3f}-"
          f"{max(r['serve_throughput_vs_best'] for r in rows):.3f}; worst found/true {min(r['ratio'] for r in rows if r['ratio'] is not None):.3f}; "
          f"answers over the true max: {sum(r['found'] > r['true_max'] for r in rows if '+-' not in r['curve'])} "
          f"(noisy curves excluded: their true max is the largest size that fits at the worst noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
