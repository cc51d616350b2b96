"""The classifiers' forward on a GPU three ways, side by side in one process: eager NCHW (before),
eager in the spec's memory format (channels-last for ResNet-50), and replayed CUDA graphs
(deployments/cuda_graphs.py, what a replica serves with after tuning).

For each model and batch size it times the forward alone (a device tensor in, softmax on the host
out) and the whole predict on JPEGs (prepare + forward, the served path), and reports the host CPU
the calling thread spent per batch (thread CPU, which includes the spin of the closing device sync).
It also checks that the graphs answer as the eager model does (the logits' largest difference relative
to their scale, and the same top-1) and what their pool holds against the eager forward's peak. The results are written after every model.

    python benchmarks/cuda_graphs_check.py --device cuda --models resnet50 vit_b_16 --sizes 64 128
    python benchmarks/cuda_graphs_check.py --quick       # CPU: eager rows only (graphs are CUDA's)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import describe_environment, environment, markdown_table, say, table, write_json  # noqa: E402

COLUMNS = [("model", "model", ""), ("batch", "batch", ""), ("way", "way", ""), ("forward ms", "forward_ms", ".2f"),
           ("fwd img/s", "forward_images_s", ".0f"), ("host ms/batch", "host_ms", ".2f"),
           ("predict ms", "predict_ms", ".2f"), ("predict img/s", "predict_images_s", ".0f"),
           ("vs eager", "vs_eager", ".2f"), ("logits max rel diff", "max_rel_diff", ".1e"), ("top-1 same", "top1_same", "")]


def timed(fn, repeats: int, sync) -> tuple[float, float]:
    """Median wall seconds and median calling-thread CPU seconds of fn(), after two warm runs."""
    for _ in range(2):
        fn()
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.thread_time()
        fn()
        sync()
        walls.append(time.perf_counter() - w)
        cpus.append(time.thread_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def run_model(name: str, device: str, sizes: list[int], repeats: int) -> list[dict]:
    import torch

    from deployments.registry import create_spec

    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    dtype = "float16" if device.startswith("cuda") else "float32"
    ways = [("eager NCHW", {"memory_format": "contiguous", "cuda_graphs": "false"}),
            ("eager spec format", {"cuda_graphs": "false"}),
            ("CUDA graphs", {})]
    rows: list[dict] = []
    reference: dict[int, object] = {}
    eager_ms: dict[int, float] = {}
    first_state = None
    for way, options in ways:
        spec = create_spec(name, None, **options)
        torch.manual_seed(0)
        spec.load(device, dtype)
        if way != "eager NCHW":  # the same weights as the reference
            spec.model.load_state_dict(first_state)
        else:
            first_state = {k: v.clone() for k, v in spec.model.state_dict().items()}
        for size in sizes:
            row = {"model": name, "batch": size, "way": way}
            graphs = spec.set_serving_batch(size) if way == "CUDA graphs" else None
            graphs = graphs.to_dict() if hasattr(graphs, "to_dict") else graphs
            if way == "CUDA graphs" and (graphs or {}).get("state") != "captured":
                row["note"] = (graphs or {}).get("summary", "no graphs")
                rows.append(row)
                say(f"{name} b{size} {way}: {row['note']}")
                continue
            if graphs:
                row.update(capture_s=graphs["capture_s"], pool_mib=round(graphs["pool_bytes"] / 2**20, 1))
            x = torch.randn(size, 3, spec.crop_size, spec.crop_size, generator=torch.Generator().manual_seed(1))
            x = x.to(device, dtype=getattr(torch, dtype))

            def forward():
                with torch.inference_mode():
                    if spec.graphs is not None:
                        logits = spec.graphs(x)
                    else:
                        logits = spec.model(x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x)
                    return logits.float().cpu()

            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            wall, cpu = timed(forward, repeats, sync)
            if device.startswith("cuda") and way != "CUDA graphs":
                row["eager_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            logits = forward()
            if way == "eager NCHW":
                reference[size] = logits
                eager_ms[size] = wall * 1e3
            else:  # random weights saturate the softmax, so the logits are compared, relative to their scale
                ref = reference[size]
                row["max_rel_diff"] = ((logits - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                row["top1_same"] = f"{(logits.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}"
            row.update(forward_ms=wall * 1e3, forward_images_s=size / wall, host_ms=cpu * 1e3,
                       vs_eager=eager_ms[size] / (wall * 1e3))
            samples = spec.example_batch(size)
            pwall, _ = timed(lambda: spec.predict(samples), max(2, repeats // 2), sync)
            row.update(predict_ms=pwall * 1e3, predict_images_s=size / pwall)
            rows.append(row)
            say(f"{name} b{size} {way}: forward {wall * 1e3:.2f} ms (host {cpu * 1e3:.2f} ms), "
                f"predict {pwall * 1e3:.2f} ms" + (f", graphs {graphs['summary']}" if graphs else ""))
        spec.set_serving_batch(None)
        del spec
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="cuda_graphs_check.json")
    parser.add_argument("--quick", action="store_true", help="CPU, ResNet-50, batch 2, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.device, args.sizes, args.repeats = ["resnet50"], "cpu", [2], 2
    env = environment(args.device.split(":")[0])
    say(describe_environment(env))
    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args.device, args.sizes, args.repeats)
        write_json(args.out, {"environment": env, "rows": rows})
    print(table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
