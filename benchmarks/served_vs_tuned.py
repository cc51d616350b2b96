"""What the running apps serve against what their own tuners measured (issue 20's targets), with
`autobatch bench` as a user would run it, against apps already up (`make serve`, or
benchmarks/startup.py's `--then`):

  per model: OIP v2 over HTTP, N JPEGs (640x480, 23.6 KB) per request, at each of the client levels;
  the served images/s beside the tuning's own throughput at its batch (`serve_throughput`) and its
  probe nearest the served mean batch, and the ratio; the peak level and the last one's share of it
  (goodput past saturation); then one JPEG per request over the simple route.

    python benchmarks/served_vs_tuned.py --models resnet50 vit_b_16 yolo11n_pose --levels 16 32 64 \
        --simple-clients 64 --out $OUT/served.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, environment, say, table, write_json  # noqa: E402

COLUMNS = [("model", "model", ""), ("request", "request", ""), ("clients", "clients", "d"),
           ("served img/s", "samples_per_s", ".0f"), ("req/s", "requests_per_s", ".0f"), ("p50 ms", "p50_ms", ".0f"),
           ("p99 ms", "p99_ms", ".0f"), ("errors", "errors", "d"), ("mean batch", "mean_batch", ".1f"),
           ("tuned b", "tuned_batch", "d"), ("tuned img/s", "tuned_per_s", ".0f"),
           ("probe img/s near served b", "probe_per_s", ".0f"), ("served / tuned", "served_vs_tuned", ".2f"),
           ("of peak", "of_peak", ".2f"), ("graphs", "graphs", "")]


def wait_warm(http: httpx.Client, model: str, timeout_s: float) -> dict | None:
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        try:
            t = http.get(f"/{model}/tuning").json()
            if (t.get("warm_sizes") or {}).get("background") != "running":
                return t
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    return None


def probe_near(tuning: dict, batch: float | None) -> float | None:
    """The tuning's measured throughput at the ok probe whose size is nearest the served mean batch."""
    ok = [p for p in tuning.get("probes") or [] if p.get("outcome") == "ok" and p.get("throughput")]
    if not ok or not batch:
        return None
    return min(ok, key=lambda p: abs(p["batch_size"] - batch))["throughput"]


def bench(args, model: str, clients: int, samples: int, processes: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        cmd = [sys.executable, "-m", "autobatch.client.bench", "--url", args.url, "--route", model,
               "--concurrency", str(clients), "--warmup", str(clients), "--processes", str(processes),
               "--duration", str(args.duration), "--no-progress", "--out", report_file.name]
        if samples > 1:
            cmd += ["--protocol", "v2", "--samples-per-request", str(samples)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.duration + 180)
        try:
            return json.load(open(report_file.name))
        except ValueError:
            return {"failed": (done.stdout + done.stderr)[-1500:]}


def level(http, args, model: str, clients: int, samples: int, processes: int) -> dict:
    before = http.get(f"/{model}/tuning").json()
    report = bench(args, model, clients, samples, processes)
    after = http.get(f"/{model}/tuning").json()
    batches = after["stats"]["batches"] - before["stats"]["batches"]
    served = after["stats"]["samples_served"] - before["stats"]["samples_served"]
    lat = report.get("latency_s") or {}
    row = {"model": model, "request": f"{samples} JPEG" + ("s v2" if samples > 1 else " simple"), "clients": clients,
           "samples_per_s": report.get("samples_per_s"), "requests_per_s": report.get("requests_per_s"),
           "p50_ms": lat["p50"] * 1e3 if lat.get("p50") is not None else None,
           "p99_ms": lat["p99"] * 1e3 if lat.get("p99") is not None else None,
           "errors": sum((report.get("errors") or {}).values()), "errors_by_status": report.get("errors"),
           "mean_batch": served / batches if batches else None,
           "tuned_batch": after.get("batch_size"), "tuned_per_s": after.get("serve_throughput"),
           "serving": {k: after["serving"].get(k) for k in ("max_batch_size", "batch_wait_timeout_s", "overlap",
                                                            "served_vs_tuned_latency", "notes")},
           "failed": report.get("failed")}
    graphs = after.get("cuda_graphs") or {}
    row["graphs"] = graphs.get("state", "-")
    row["cuda_graphs"] = {k: graphs.get(k) for k in ("state", "why", "buckets", "pool_bytes", "replays", "eager_runs")}
    row["probe_per_s"] = probe_near(after, row["mean_batch"])
    if row["samples_per_s"] and row["tuned_per_s"]:
        row["served_vs_tuned"] = row["samples_per_s"] / row["tuned_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "yolo11n_pose"])
    p.add_argument("--levels", nargs="+", type=int, default=[16, 32], help="clients, v2 requests (first model: all)")
    p.add_argument("--other-levels", nargs="+", type=int, default=[16], help="clients for the other models")
    p.add_argument("--samples-per-request", type=int, default=32)
    p.add_argument("--simple-clients", nargs="*", type=int, default=[64], help="one JPEG per request (first model)")
    p.add_argument("--processes", type=int, default=2, help="load processes for the v2 levels")
    p.add_argument("--simple-processes", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warm-timeout-s", type=float, default=90.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(REPO, "benchmarks", "results", "served_vs_tuned.json")
    http = httpx.Client(base_url=args.url, timeout=60)
    rows: list[dict] = []
    report = {"environment": environment(), "args": vars(args), "rows": rows}
    for i, model in enumerate(args.models):
        t = wait_warm(http, model, args.warm_timeout_s)
        say(f"{model}: {'warm' if t else 'still warming after the timeout'}; tuned batch "
            f"{t and t.get('batch_size')}, {t and round(t.get('serve_throughput') or 0)} samples/s")
        model_rows = []
        for clients in (args.levels if i == 0 else args.other_levels):
            model_rows.append(level(http, args, model, clients, args.samples_per_request, min(clients, args.processes)))
            rows.append(model_rows[-1])
            say(f"  {model} {clients} clients: {model_rows[-1].get('samples_per_s')} samples/s")
            write_json(out, report)
        peak = max((r["samples_per_s"] or 0) for r in model_rows)
        for r in model_rows:
            r["of_peak"] = (r["samples_per_s"] or 0) / peak if peak else None
        if i == 0:
            for clients in args.simple_clients:
                rows.append(level(http, args, model, clients, 1, min(clients, args.simple_processes)))
                write_json(out, report)
    write_json(out, report)
    print(table(rows, COLUMNS))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
