"""Throughput, latency and memory against batch size, from one tuning's probes (matplotlib PNG)."""
from __future__ import annotations

from .tuning import Tuning


def plot_tuning(tuning: Tuning, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = sorted((p for p in tuning.probes if p.latency_s is not None), key=lambda p: p.batch_size)
    sizes = [p.batch_size for p in measured]
    latency_budget_ms = tuning.latency_budget_s * 1e3 if tuning.latency_budget_s is not None else None
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    series = [
        ("throughput (samples/s)", [p.throughput for p in measured], None),
        ("latency per batch (ms)", [p.latency_s * 1e3 for p in measured], latency_budget_ms),
        ("peak memory (GiB)", [(p.peak_bytes or 0) / 2**30 for p in measured], tuning.memory_budget_bytes / 2**30),
    ]
    for ax, (label, values, budget) in zip(axes, series):
        ax.plot(sizes, values, "o-")
        for p, v in zip(measured, values):
            if not p.ok:
                ax.plot([p.batch_size], [v], "rx", markersize=10)
        if budget is not None:
            ax.axhline(budget, color="grey", linestyle=":", label="budget")
        ax.axvline(tuning.batch_size, color="green", linestyle="--", label=f"serve {tuning.batch_size}")
        ax.axvline(tuning.max_safe_batch, color="red", linestyle="--", label=f"max safe {tuning.max_safe_batch}")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xlabel("batch size (red x: over a budget or OOM)")
    fig.suptitle(f"{tuning.model} on {tuning.device.label} ({tuning.dtype})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
