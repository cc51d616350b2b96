"""What a batch size costs the first time a replica runs it, against the second time.

Tuning probes a handful of sizes (1, 2, 4, ... and around the answer); serving then forms every size
from 1 to the max batch as traffic allows. If a size the process has never run costs much more on its
first run (cuDNN/cuBLAS heuristics and workspace, oneDNN primitive creation, allocator growth, a
model's per-shape caches such as YOLO's anchors), each new size in serving is a stall every request
in that batch, and every request queued behind it, waits out. This measures it: for each size in
order, predict() on decoded copies of the same payload as the serving benchmark, timed on the first
run and the median of the next `--repeats` runs.

    python benchmarks/new_shape_cost.py --model yolo11n_pose --device cuda --sizes 1-16 24 32 54
    python benchmarks/new_shape_cost.py --model resnet50 --device cpu --sizes 1-4 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import default_out, describe_environment, environment, markdown_table, say, table, write_json  # noqa: E402

from deployments.registry import model_names  # noqa: E402

MODELS = tuple(model_names())
COLUMNS = [("batch", "batch", ""), ("first run ms", "first_ms", ".1f"), ("later runs ms", "later_ms", ".1f"),
           ("first / later", "ratio", ".1f")]


def parse_sizes(tokens: list[str]) -> list[int]:
    """"1-8 16 32" -> [1, 2, ..., 8, 16, 32], in the order given (order matters: first runs are measured)."""
    sizes: list[int] = []
    for token in tokens:
        low, _, high = token.partition("-")
        sizes += list(range(int(low), int(high) + 1)) if high else [int(low)]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes must be positive batch sizes or ranges like 1-16; got {' '.join(tokens)}")
    return list(dict.fromkeys(sizes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=["1-16"], help="batch sizes in the order to run them, ranges allowed")
    parser.add_argument("--repeats", type=int, default=3, help="runs after the first, median reported")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU, ResNet-50, sizes 1-2, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.model, args.sizes, args.repeats = "cpu", "resnet50", ["1-2"], 1

    import torch

    from deployments.registry import create_spec

    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = environment(kind)
    say(describe_environment(env))
    spec = create_spec(args.model)
    spec.load("cuda:0" if kind == "cuda" else "cpu", spec.default_dtype(kind))
    payload = spec.example_payload(max_new_tokens=8)
    sample = spec.decode(*payload)
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)

    def timed(batch) -> float:
        sync()
        t0 = time.perf_counter()
        spec.predict(batch)
        sync()
        return time.perf_counter() - t0

    rows = []
    for size in parse_sizes(args.sizes):
        batch = [sample] * size
        first = timed(batch)
        later = statistics.median(timed(batch) for _ in range(max(1, args.repeats)))
        rows.append({"model": args.model, "batch": size, "first_ms": first * 1e3, "later_ms": later * 1e3, "ratio": first / later})
        say(f"  b={size}: first {first * 1e3:.1f} ms, later {later * 1e3:.1f} ms")
    print(describe_environment(env))
    print(table(rows, COLUMNS))
    if args.markdown:
        print(markdown_table(rows, COLUMNS))
    out = write_json(args.out or default_out(f"new_shape_cost-{args.model}", kind, args.quick),
                     {"environment": env, "settings": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
