"""`autobatch tune | show | plot | cache | client | bench`: the optimizer from a shell, on a laptop CPU
or a GPU box, and the clients of a served app (autobatch/client/).

Commands from other packages (serve adds `config` and `retune`) join through the entry-point group
"autobatch.commands": each is a function register(subparsers). An entry point named like a command
of this package is passed over: `client` and `bench` were serve's entry points before they moved
here, and an install made before the move still lists them.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys

from autobatch.client import bench
from autobatch.client import command as client_command
from deployments.registry import create_spec, model_names
from optimizer.cache import CacheUnavailable, TuningCache
from optimizer.cache_store import open_cache
from optimizer.devices import DeviceUnavailable
from optimizer.tuning import Tuning, TuningFormatError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")


DEBUG_ENV = "AUTOBATCH_DEBUG"  # "1": an unexpected error shows its traceback too


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line on stderr (the usage is one `--help` away) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _margin(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_tuning_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"model name ({', '.join(model_names())})")
    p.add_argument("--weights", default=None, help="local weights path (default: synthetic weights)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--memory-budget-mb", type=_positive_float, help="absolute memory budget in MiB")
    budget.add_argument("--memory-fraction", type=_fraction, help="fraction of the device's memory (default 0.9 GPU, 0.5 CPU)")
    p.add_argument("--latency-budget-ms", type=_positive_float, help="per-batch latency budget (default: the model's)")
    p.add_argument("--max-batch", type=_positive_int, default=1024)
    p.add_argument("--margin", type=_margin, default=0.10, help="predictive OOM guard headroom (default 0.10)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per probe (median)")
    p.add_argument("--cache", default=None, help="cache file or URL (s3://, gs://, file://; default $AUTOBATCH_CACHE or ~/.cache/autobatch/tuning.json)")


def settings_from_args(args):
    from optimizer.tune import TuningSettings

    return TuningSettings(
        device=args.device,
        dtype=args.dtype,
        memory_budget_bytes=int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else None,
        memory_fraction=args.memory_fraction,
        latency_budget_s=args.latency_budget_ms / 1e3 if args.latency_budget_ms else None,
        max_batch=args.max_batch,
        margin=args.margin,
        repeats=args.repeats,
    )


def cmd_tune(args) -> int:
    from optimizer.tune import autobatch

    cache = open_cache(args.cache)
    cache.check_writable()  # before minutes of tuning, not after: the answer would have nowhere to go
    spec = create_spec(args.model, args.weights)
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    tuning = autobatch(spec, settings_from_args(args), cache=cache, force=args.force, say=say)
    if args.json:
        print(json.dumps(tuning.to_dict(), indent=1))
    else:
        print(format_report(tuning))
    return 0


def format_report(tuning: Tuning) -> str:
    from optimizer.tune import describe_probe

    dev = tuning.device
    latency = "none" if tuning.latency_budget_s is None else f"{tuning.latency_budget_s * 1e3:.0f} ms per batch"
    lines = [
        f"{tuning.model} on {dev.label} ({dev.total_memory_bytes / 2**30:.1f} GiB), {tuning.dtype}, "
        f"weights: {tuning.weights}",
        f"budgets: memory {tuning.memory_budget_bytes / 2**30:.2f} GiB, latency {latency}",
        f"cache: {tuning.cache} (key {tuning.key})",
        "probes (in the order run):",
        *(describe_probe(p) for p in tuning.probes),
        f"max safe batch: {tuning.max_safe_batch}",
        f"batch to serve: {tuning.batch_size}  (wait {tuning.batch_wait_timeout_s * 1e3:.1f} ms, "
        f"{tuning.serve_throughput:.1f} samples/s at {tuning.serve_latency_s * 1e3:.1f} ms per batch)",
        f"why: {tuning.decision}",
        f"{tuning.probe_count} probes, {tuning.oom_events} OOMs, {tuning.predicted_skips} predicted skips, "
        f"tuned in {tuning.tuning_s:.1f} s",
    ]
    return "\n".join(lines)


def cached_tunings(cache: TuningCache) -> list[tuple[str, str, Tuning]]:
    """(key, saved_at, tuning) of every entry this version can read, oldest first; the others are
    named once on stderr (the next `autobatch tune` of that model replaces them)."""
    found = []
    for key, entry in cache.entries().items():
        try:
            found.append((key, str(entry.get("saved_at", "")), Tuning.from_dict(entry.get("result"))))
        except (TuningFormatError, AttributeError) as exc:
            print(f"autobatch: skipped cache entry {key}: {exc}", file=sys.stderr)
    return sorted(found, key=lambda item: item[1])


def cmd_show(args) -> int:
    cache = open_cache(args.cache)
    cache.check_writable()  # a cache the tuner cannot use is an answer of its own, not "no tunings"
    tunings = cached_tunings(cache)
    if not tunings:
        print(f"no cached tunings in {cache.path}")
        return 0
    for key, saved_at, t in tunings:
        latency_ms = t.latency_budget_s * 1e3 if t.latency_budget_s is not None else float("nan")
        print(f"{key}  {t.model:<14} {t.device.label:<40} {t.dtype:<9} "
              f"budget {t.memory_budget_bytes / 2**30:6.2f} GiB / {latency_ms:6.0f} ms  "
              f"max safe {t.max_safe_batch!s:>5}  serve {t.batch_size!s:>5}  {saved_at}")
    return 0


def cmd_cache(args) -> int:
    cache = open_cache(args.cache)
    if args.action != "path":
        cache.check_writable()
    if args.action == "path":
        print(cache.path)
    elif args.action == "clear":
        print(f"removed {cache.delete(args.key)} entries from {cache.path}")
    return 0


def cmd_plot(args) -> int:
    from optimizer.plot import plot_tuning

    matches = [t for key, _, t in cached_tunings(open_cache(args.cache))
               if t.model == args.model and (args.key is None or key.startswith(args.key))]
    if not matches:
        raise UsageError(f"no cached tuning for {args.model!r}; run `autobatch tune {args.model}` first (or check --cache)")
    plot_tuning(matches[-1], args.out)  # the latest saved
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="autobatch", description="Measure the batch sizes a model should serve with here.")
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="find the max safe batch and the batch to serve (cached)")
    add_tuning_arguments(tune)
    tune.add_argument("--force", action="store_true", help="re-tune even when the cache has an answer")
    tune.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    tune.set_defaults(func=cmd_tune)
    show = sub.add_parser("show", help="list the cached tunings, one line each")
    show.add_argument("--cache", default=None)
    show.set_defaults(func=cmd_show)
    plot = sub.add_parser("plot", help="throughput, latency and memory against batch size from the cache")
    plot.add_argument("model")
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--key", default=None, help="cache key (prefix) when several tunings exist")
    plot.add_argument("--cache", default=None)
    plot.set_defaults(func=cmd_plot)
    cache = sub.add_parser("cache", help="cache file path, or clear entries")
    cache.add_argument("action", choices=["path", "clear"])
    cache.add_argument("--key", default=None, help="with clear: only this key (prefix)")
    cache.add_argument("--cache", default=None)
    cache.set_defaults(func=cmd_cache)
    client_command.register(sub)
    bench.register(sub)
    for entry_point in importlib.metadata.entry_points(group="autobatch.commands"):
        if entry_point.name not in sub.choices:
            entry_point.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from deployments.base import SpecConfigError
    from optimizer.search import BatchOneDoesNotFit
    from optimizer.tune import SettingsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, SpecConfigError, SettingsError, DeviceUnavailable, BatchOneDoesNotFit, CacheUnavailable) as exc:
        print(f"autobatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autobatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback, unless asked for
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"autobatch: error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
