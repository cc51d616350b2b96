"""Feed the GPU (issue 13): what each stage between a JPEG and the model's output costs, per vision
model, side by side in one run.

  forward alone   the model on a ready fp16 batch already on the device (what the card computes)
  old path        PIL decode + the transforms per image on the CPU (one thread, and all CPUs in a
                  pool), then predict: stack fp32 crops, .to(device), forward (image_pipeline=host)
  new path        the header check per image on the CPU, then predict: JPEG bytes to the device,
                  batched nvJPEG decode, resize/crop/normalise (or letterbox) there in fp16, forward
                  (image_pipeline=device); also nvJPEG's batched decode alone
  overlapped      the new path as a replica serves it (overlap: auto): the next batch's prepare
                  (copy, decode, resize on a stream of its own) in a second thread while this batch's
                  forward computes; images/s from the period between batches (optimizer/model.py)
  tuner           autobatch's probes (batch, images/s) on the forward alone, the old and the new path

    python benchmarks/feed_gpu.py --out $OUT/feed.json               # the GPU run, ~4-6 min on an H200
    python benchmarks/feed_gpu.py --quick --out /tmp/feed.json       # CPU, seconds: keeps the script alive
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import describe_environment, environment, markdown_table, say, table, write_json  # noqa: E402

from deployments.images import example_jpeg  # noqa: E402
from deployments.registry import create_spec  # noqa: E402

VISION_MODELS = ("resnet50", "vit_b_16", "yolo11n_pose")
COLUMNS = [("model", "model", ""), ("batch", "batch", ""), ("forward alone img/s", "forward_only", ".0f"),
           ("old path img/s", "old_path", ".0f"), ("new path img/s", "new_path", ".0f"),
           ("overlapped img/s", "overlapped", ".0f"), ("overlapped / forward", "overlapped_vs_forward", ".2f"),
           ("new / forward", "new_vs_forward", ".2f"), ("new / old", "new_vs_old", ".2f"),
           ("batched JPEG decode img/s (nvJPEG on a GPU)", "device_decode", ".0f")]
STAGE_COLUMNS = [("model", "model", ""), ("stage", "stage", ""), ("images/s", "images_per_s", ".0f"), ("note", "note", "")]
TUNER_COLUMNS = [("model", "model", ""), ("curve", "curve", ""), ("serving batch", "batch_size", ""),
                 ("max safe", "max_safe_batch", ""), ("img/s at serving batch", "serve_throughput", ".0f"),
                 ("probes (batch: img/s)", "curve_text", "")]


def payloads(count: int, size: tuple[int, int]) -> list[bytes]:
    """Distinct photo-like JPEGs of one size (what `autobatch bench` sends: 640x480)."""
    return [example_jpeg(size, seed=i) for i in range(count)]


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of fn() over `repeats` runs, after one untimed run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_model(name: str, device: str, sizes: list[int], repeats: int, threads: int, jpeg_size, tune_max_batch: int,
                  tune_repeats: int, tune: bool = True) -> dict:
    import torch

    from optimizer.devices import make_meter
    from optimizer.model import ExampleBatches
    from optimizer.tune import TuningSettings, autobatch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtype = "float16" if kind == "cuda" else "float32"
    host = create_spec(name, image_pipeline="host", tuning_image_size=list(jpeg_size))
    new = create_spec(name, image_pipeline="device", tuning_image_size=list(jpeg_size))
    say(f"feed_gpu: loading {name} on {device} as {dtype}")
    host.load(device, dtype)
    new.model, new.device, new.dtype_name = host.model, host.device, host.dtype_name
    for attr in ("num_classes", "names", "categories"):
        if hasattr(host, attr):
            setattr(new, attr, getattr(host, attr))
    from deployments.device_images import TorchvisionJpegDecoder

    new.jpeg_decoder = TorchvisionJpegDecoder(device)
    sync = (lambda: torch.cuda.synchronize()) if kind == "cuda" else (lambda: None)
    images = payloads(16, jpeg_size)
    side = getattr(host, "imgsz", None) or host.crop_size
    stages, rows = [], []

    # CPU stages, per image
    n_cpu = 64 if kind == "cuda" else 4
    batch_of = lambda n: [images[i % len(images)] for i in range(n)]  # noqa: E731
    t = timed(lambda: [host.decode(p) for p in batch_of(n_cpu)], 1, sync)
    stages.append({"model": name, "stage": "old: PIL decode + transforms, 1 thread", "images_per_s": n_cpu / t,
                   "note": f"{jpeg_size[0]}x{jpeg_size[1]} JPEG"})
    with ThreadPoolExecutor(threads) as pool:
        t = timed(lambda: list(pool.map(host.decode, batch_of(n_cpu * 4))), 1, sync)
    stages.append({"model": name, "stage": f"old: PIL decode + transforms, {threads} threads", "images_per_s": n_cpu * 4 / t,
                   "note": "the GIL and memory bandwidth bound it"})
    t = timed(lambda: [new.decode(p) for p in batch_of(n_cpu * 4)], 3, sync)
    stages.append({"model": name, "stage": "new: header check, 1 thread", "images_per_s": n_cpu * 4 / t, "note": "PIL's lazy open"})

    for size in sizes:
        say(f"feed_gpu: {name} batch {size}")
        with torch.inference_mode():
            x = torch.rand(size, 3, side, side, device=device).to(host.model.parameters().__next__().dtype)
            forward = timed(lambda: host.model(x), repeats, sync)
            del x
        old_samples = [host.decode(p) for p in batch_of(size)]
        old = timed(lambda: host.predict(old_samples), repeats, sync)
        new_samples = [new.decode(p) for p in batch_of(size)]
        new_t = timed(lambda: new.predict(new_samples), repeats, sync)
        jpegs = [s.image.jpeg if hasattr(s, "image") else s.jpeg for s in new_samples]
        decode_t = timed(lambda: new.jpeg_decoder.decode(jpegs), repeats, sync)
        new.overlap = True  # as a GPU replica serves it (auto); on a CPU this times the same two threads
        runs = ExampleBatches(new)
        runs(size)  # fills the pipe
        periods = [runs(size).period_s for _ in range(repeats)]
        runs.clear()
        new.overlap = "auto"
        period = statistics.median(periods)
        rows.append({"model": name, "batch": size, "forward_only": size / forward, "old_path": size / old,
                     "new_path": size / new_t, "overlapped": size / period, "overlapped_vs_forward": forward / period,
                     "new_vs_forward": forward / new_t, "new_vs_old": old / new_t, "device_decode": size / decode_t})
        del old_samples, new_samples
        if kind == "cuda":
            torch.cuda.empty_cache()

    # the tuner's curves: what it measures decides the batch it serves
    tuner = []
    settings = TuningSettings(device=kind, dtype=dtype, max_batch=tune_max_batch, repeats=tune_repeats, warmup=1)
    meter = make_meter(kind, 0)
    forward_inputs: dict[int, object] = {}

    def forward_only(n: int) -> None:
        if n not in forward_inputs:
            forward_inputs.clear()
            forward_inputs[n] = torch.rand(n, 3, side, side, device=device).to(next(host.model.parameters()).dtype)
        with torch.inference_mode():
            host.model(forward_inputs[n])

    curves = (("forward alone", host, forward_only), ("old path", host, None), ("new path, overlapped", new, None))
    for curve, spec, run_batch in curves if tune else ():
        say(f"feed_gpu: {name}: tuning on the {curve}")
        result = autobatch(spec, settings, cache=None, meter=meter, run_batch=run_batch, loaded=True, say=lambda line: None)
        forward_inputs.clear()
        probes = sorted((p for p in result.probes if p.throughput), key=lambda p: p.batch_size)
        tuner.append({"model": name, "curve": curve, "batch_size": result.batch_size,
                      "max_safe_batch": result.max_safe_batch, "serve_throughput": result.serve_throughput,
                      "probes": [{"batch": p.batch_size, "images_per_s": p.throughput, "latency_s": p.latency_s,
                                  "outcome": p.outcome} for p in probes],
                      "curve_text": " ".join(f"{p.batch_size}:{p.throughput:.0f}" for p in probes)})
    host.model = new.model = None
    if kind == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "stages": stages, "tuner": tuner}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(VISION_MODELS), choices=VISION_MODELS)
    p.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    p.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="the old path's decode pool")
    p.add_argument("--jpeg-size", nargs=2, type=int, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--tune-max-batch", type=int, default=512)
    p.add_argument("--tune-repeats", type=int, default=3)
    p.add_argument("--no-tuner", action="store_true", help="skip the tuner's curves (the stage table only)")
    p.add_argument("--quick", action="store_true", help="CPU, resnet50, batches 1 and 2: checks the script runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    if args.quick:
        args.device, args.models, args.sizes, args.repeats = "cpu", ["resnet50"], [1, 2], 1
        args.tune_max_batch, args.tune_repeats, args.threads, args.jpeg_size = 2, 1, 2, [320, 240]
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    env = environment("cuda" if device.startswith("cuda") else "cpu")
    env["command"] = "python benchmarks/feed_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    say(describe_environment(env))
    results = {"environment": env, "device": device, "jpeg_size": args.jpeg_size, "models": {}}
    rows, stages, tuner = [], [], []
    for name in args.models:
        started = time.perf_counter()
        measured = measure_model(name, device, args.sizes, args.repeats, args.threads, tuple(args.jpeg_size),
                                 args.tune_max_batch, args.tune_repeats, tune=not args.no_tuner)
        measured["wall_s"] = time.perf_counter() - started
        results["models"][name] = measured
        rows += measured["rows"]
        stages += measured["stages"]
        tuner += measured["tuner"]
        write_json(args.out, results)  # partial results survive a later model's failure or a time limit
    print(table(rows, COLUMNS))
    print()
    print(table(stages, STAGE_COLUMNS))
    print()
    print(table(tuner, TUNER_COLUMNS))
    results["markdown"] = "\n\n".join(markdown_table(r, c) for r, c in ((rows, COLUMNS), (stages, STAGE_COLUMNS),
                                                                          (tuner, TUNER_COLUMNS)))
    print(f"wrote {write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
