"""Plots (matplotlib PNG) from the benchmark JSON files:
  <model>-<device>-batch.png        raw model throughput and latency against batch size (bare loop),
                                    with the size autobatch tuned and Ray's default max_batch_size marked
  <model>-<device>-concurrency.png  served requests/s and p50/p99 latency against concurrency, for
                                    autobatch, plain @serve.batch defaults and unbatched Ray Serve
  tuning-<device>.png               batch found per method and budget, with the brute-force maximum

    python benchmarks/plots.py --serving benchmarks/results/serving_vs_plain-resnet50-cuda.json \
        --tuning benchmarks/results/tuning_vs_peers-cuda.json --out-dir docs/img
    python benchmarks/plots.py --quick     # plots the -quick results (measures a tiny raw sweep if none)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, RESULTS  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"autobatch": "tab:blue", "plain batched": "tab:orange", "unbatched": "tab:gray",
          "plain batched, high ongoing": "tab:green", "autobatch, plain's batching": "tab:purple"}


def _device_tag(data: dict) -> str:
    return data.get("device_kind") or ("cpu" if data["environment"].get("device") == "cpu" else "cuda")


def _subtitle(data: dict) -> str:
    env = data["environment"]
    device = env["device"] if env["device"] != "cpu" else f"CPU ({env['cpu']} x{env['cpu_count']})"
    return f"{device}; torch {env['packages'].get('torch')}, ray {env['packages'].get('ray')}"


def _style_axes(axes, ticks: list, log_x: bool, legend_fontsize: int) -> None:
    """Both panels of a figure: the measured values as ticks, a log2 x axis if asked, y from 0."""
    for ax in axes:
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_batch(data: dict, out_dir: str) -> str | None:
    raw = sorted(data.get("raw") or [], key=lambda r: r["batch"])
    if not raw:
        return None
    sizes = [r["batch"] for r in raw]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(sizes, [r["samples_per_s"] for r in raw], "o-", color="tab:blue")
    ax1.set(xlabel="batch size", ylabel="samples/s", title="throughput (bare loop)")
    ax2.plot(sizes, [r["latency_ms"] for r in raw], "o-", color="tab:red")
    ax2.set(xlabel="batch size", ylabel="ms per batch", title="latency per batch (bare loop)")
    tuned = (data.get("variants") or {}).get("autobatch", {}).get("batch_size")
    for ax in (ax1, ax2):
        if tuned:
            ax.axvline(tuned, color="tab:blue", ls="--", lw=1, label=f"autobatch tuned ({tuned})")
        ax.axvline(10, color="tab:orange", ls=":", lw=1, label="@serve.batch default (10)")
    _style_axes((ax1, ax2), sizes, log_x=len(sizes) > 1 and max(sizes) / min(sizes) > 8, legend_fontsize=8)
    fig.suptitle(f"{data['model']}: throughput and latency against batch size\n{_subtitle(data)}", fontsize=10)
    return _save(fig, out_dir, f"{data['model']}-{_device_tag(data)}-batch.png")


def plot_concurrency(data: dict, out_dir: str) -> str | None:
    rows = data.get("serving") or []
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in COLORS:
        vr = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["concurrency"])
        if not vr:
            continue
        c = [r["concurrency"] for r in vr]
        color = COLORS[variant]
        ax1.plot(c, [r["requests_per_s"] for r in vr], "o-", color=color, label=f"{variant} ({vr[0]['batching']})")
        ax2.plot(c, [r["p50_ms"] for r in vr], "o-", color=color, label=f"{variant} p50")
        ax2.plot(c, [r["p99_ms"] for r in vr], "s--", color=color, alpha=0.7, label=f"{variant} p99")
    ax1.set(xlabel="concurrent clients (closed loop)", ylabel="requests/s", title="throughput")
    ax2.set(xlabel="concurrent clients (closed loop)", ylabel="ms", title="latency")
    levels = sorted({r["concurrency"] for r in rows})
    _style_axes((ax1, ax2), levels, log_x=len(levels) > 1, legend_fontsize=7)
    fig.suptitle(f"{data['model']}: served throughput and latency against concurrency\n{_subtitle(data)}", fontsize=10)
    return _save(fig, out_dir, f"{data['model']}-{_device_tag(data)}-concurrency.png")


def plot_tuning(data: dict, out_dir: str) -> str | None:
    rows = [r for r in data.get("rows", []) if isinstance(r.get("found"), int)]
    if not rows:
        return None
    groups = list(dict.fromkeys((r["model"], round(r["budget_mb"])) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs, ys, hatches = [], [], []
        for g, (model, budget) in enumerate(groups):
            r = next((r for r in rows if r["method"] == method and r["model"] == model and round(r["budget_mb"]) == budget), None)
            if r:
                xs.append(g + i * width)
                ys.append(r["found"])
                hatches.append("" if r.get("fits") == "yes" else "//")
        bars = ax.bar(xs, ys, width, label=method)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{b} MiB" for m, b in groups], fontsize=8)
    ax.set(ylabel="batch found", title=f"largest batch found within the memory budget (hatched: over it)\n"
                                       f"{_subtitle({**data, 'environment': data['environment']})}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    kind = "cpu" if data["environment"].get("device") == "cpu" else "cuda"
    return _save(fig, out_dir, f"tuning-{kind}.png")


def quick_inputs() -> tuple[list[str], list[str]]:
    return (sorted(glob.glob(os.path.join(RESULTS, "serving_vs_plain-*-quick.json"))),
            sorted(glob.glob(os.path.join(RESULTS, "tuning_vs_peers-*-quick.json"))))


def measure_tiny() -> dict:
    """--quick with no results to plot: a bare-loop sweep of ResNet-50 at batch 1 and 2 on the CPU."""
    import argparse as _argparse

    from bench_common import environment
    from serving_vs_plain import raw_loop

    from autobatch.client.bench import generated_jpeg

    ns = _argparse.Namespace(threads=None, model="resnet50", llama_config=None, raw_repeats=1)
    return {"environment": environment("cpu"), "model": "resnet50", "device_kind": "cpu",
            "raw": raw_loop(ns, "cpu", (generated_jpeg(), "image/jpeg"), [1, 2]), "serving": [], "variants": {}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--serving", nargs="*", default=[], help="serving_vs_plain JSON files")
    parser.add_argument("--tuning", nargs="*", default=[], help="tuning_vs_peers JSON files")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "docs", "img"))
    parser.add_argument("--quick", action="store_true", help="plot the -quick results in benchmarks/results (or a tiny sweep)")
    args = parser.parse_args(argv)
    serving_files, tuning_files = args.serving, args.tuning
    if args.quick and not serving_files and not tuning_files:
        serving_files, tuning_files = quick_inputs()
    os.makedirs(args.out_dir, exist_ok=True)
    datasets = [json.load(open(p)) for p in serving_files]
    if args.quick and not datasets and not tuning_files:
        datasets = [measure_tiny()]
    if not datasets and not tuning_files:
        parser.error("nothing to plot: give --serving and/or --tuning JSON files (from serving_vs_plain.py, tuning_vs_peers.py)")
    written = []
    for data in datasets:
        written += [plot_batch(data, args.out_dir), plot_concurrency(data, args.out_dir)]
    by_kind: dict[str, dict] = {}  # one tuning figure per device kind, rows of all files together
    for path in tuning_files:
        data = json.load(open(path))
        kind = "cpu" if data["environment"].get("device") == "cpu" else "cuda"
        merged = by_kind.setdefault(kind, {"environment": data["environment"], "rows": []})
        merged["rows"] += data.get("rows", [])
    for data in by_kind.values():
        written.append(plot_tuning(data, args.out_dir))
    for path in filter(None, written):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
