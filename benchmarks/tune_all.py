"""Tune all four models on one device, one after another, as replicas sharing a card would: the
seed project's table for our system (max safe batch, chosen batch, throughput at it and at batch
1, speedup, memory, probes, OOMs, tuning seconds) plus the total time to tune all four.

    python benchmarks/tune_all.py --device cuda --memory-fraction 0.22 --llama-config llama3-8b
    python benchmarks/tune_all.py --quick        # CPU, tiny budgets: keeps the script from rotting
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

from deployments.registry import create_spec, model_names  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402

MODELS = tuple(model_names())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--memory-fraction", type=float, default=0.22,
                        help="each model's share of the device (0.22: four replicas on one card)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--llama-config", default="small", help="synthetic Llama shape: small or llama3-8b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.max_batch, args.models = "cpu", 4, ["resnet50"]

    kind = resolve_device_kind(args.device)
    rows, total_started = [], time.perf_counter()
    for name in args.models:
        options = {"config": args.llama_config} if name == "llama_int4" else {}
        spec = create_spec(name, **options)
        meter = make_meter(kind)
        dtype = spec.default_dtype(kind)
        load_started = time.perf_counter()
        spec.load(meter.torch_device, dtype)
        load_s = time.perf_counter() - load_started
        settings = TuningSettings(device=kind, dtype=dtype, memory_fraction=args.memory_fraction, max_batch=args.max_batch)
        if args.quick:
            meter.cleanup()
            settings.memory_fraction = None
            settings.memory_budget_bytes = meter.current_bytes() + 400 * 2**20
            settings.repeats = 1
            settings.latency_budget_s = 30.0  # a shared 2-core CI machine: only memory should bound it
        tuning = autobatch(spec, settings, cache=None, loaded=True, meter=meter,
                           say=lambda line: print(line, file=sys.stderr, flush=True))
        chosen = next(p for p in tuning.probes if p.batch_size == tuning.batch_size and p.latency_s)
        rows.append({
            "model": name, "device": tuning.device.label, "dtype": tuning.dtype,
            "memory_budget_gib": tuning.memory_budget_bytes / 2**30,
            "latency_budget_ms": tuning.latency_budget_s * 1e3,
            "max_safe_batch": tuning.max_safe_batch, "batch_size": tuning.batch_size,
            "throughput": tuning.serve_throughput, "batch1_throughput": tuning.batch1_throughput,
            "speedup": tuning.serve_throughput / tuning.batch1_throughput if tuning.batch1_throughput else None,
            "peak_gib_at_batch": chosen.peak_bytes / 2**30, "latency_ms_at_batch": chosen.latency_s * 1e3,
            "probes": tuning.probe_count, "ooms": tuning.oom_events, "tuning_s": tuning.tuning_s,
            "load_s": load_s, "stopped_by": tuning.stopped_by,
        })
        del spec
        gc.collect()
        meter.cleanup()
    total_s = time.perf_counter() - total_started
    print(f"{'model':<13} {'max safe':>8} {'chosen':>6} {'samples/s':>10} {'b=1/s':>8} {'speedup':>7} "
          f"{'peak GiB':>8} {'lat ms':>7} {'probes':>6} {'OOMs':>4} {'tune s':>6}  bound")
    for r in rows:
        print(f"{r['model']:<13} {r['max_safe_batch']:>8} {r['batch_size']:>6} {r['throughput']:>10.1f} "
              f"{r['batch1_throughput']:>8.1f} {r['speedup']:>7.1f} {r['peak_gib_at_batch']:>8.2f} "
              f"{r['latency_ms_at_batch']:>7.1f} {r['probes']:>6} {r['ooms']:>4} {r['tuning_s']:>6.1f}  {r['stopped_by']}")
    tuning_total = sum(r["tuning_s"] for r in rows)
    print(f"total: {tuning_total:.1f} s tuning ({total_s:.1f} s with model loading) on {rows[0]['device']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "tuning_total_s": tuning_total, "wall_total_s": total_s}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
