"""Where a served batch's time goes, against the same replica's tuning probe at the same batch
(issue 20, item 1): drive a route with closed-loop load, capture `POST <route>/profile` of the
serving in the middle of it, then, with the load ended, a capture of the tuner's own measurement
(`"what": "probe"`) at the batch the serving formed. One table side by side: GPU busy fraction and
its idle gaps, host synchronisations and pinned allocations per batch, the forward thread's CPU,
and how long a thread wanting the GIL waited.

The replicas must run with AUTOBATCH_PROFILE_DIR set (or the app's profile_dir):

    AUTOBATCH_PROFILE_DIR=/tmp/traces make serve &
    python benchmarks/profile_serving.py --route resnet50 --samples-per-request 32 --concurrency 16 --out $OUT/profile-resnet50.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, environment, say, table, write_json  # noqa: E402


def row(name: str, capture: dict) -> dict:
    s, b = capture["summary"], capture["per_batch"]
    gpu = s.get("gpu") or {}
    cpu = b.get("thread_cpu_ms_per_batch") or {}
    gil = s.get("gil_wait_1ms_ticker") or {}
    pinned = sum(v["count"] for v in (s.get("pinned_allocations") or {}).values())
    return {"capture": name, "batch": b.get("mean_batch"), "batches": b.get("batches"),
            "ms_batch": b.get("ms_per_batch"), "samples_s": b.get("samples_per_s"),
            "gpu_busy": gpu.get("busy_fraction"), "gpu_ms_batch": b.get("gpu_busy_ms_per_batch"),
            "idle_ms_batch": b.get("gpu_idle_ms_per_batch"), "gaps_1ms": gpu.get("gaps_over_1ms"),
            "syncs_batch": b.get("host_syncs_per_batch"), "pinned": pinned,
            "cores": s.get("process_cpu_cores"), "fwd_cpu_ms": cpu.get("autobatch-forward"),
            "prep_cpu_ms": cpu.get("autobatch-prepare"), "decode_cpu_ms": cpu.get("autobatch-decode"),
            "loop_cpu_ms": cpu.get("MainThread"), "gil_p50_us": gil.get("late_p50_us"), "gil_p99_us": gil.get("late_p99_us")}


COLUMNS = [("capture", "capture", ""), ("batch", "batch", ".1f"), ("batches", "batches", "d"),
           ("ms/batch", "ms_batch", ".1f"), ("samples/s", "samples_s", ".0f"), ("GPU busy", "gpu_busy", ".2f"),
           ("GPU ms/b", "gpu_ms_batch", ".1f"), ("idle ms/b", "idle_ms_batch", ".1f"), ("gaps>1ms", "gaps_1ms", "d"),
           ("syncs/b", "syncs_batch", ".1f"), ("pinned allocs", "pinned", "d"), ("cores", "cores", ".2f"),
           ("fwd CPU ms/b", "fwd_cpu_ms", ".1f"), ("prep CPU ms/b", "prep_cpu_ms", ".1f"),
           ("decode CPU ms/b", "decode_cpu_ms", ".1f"), ("loop CPU ms/b", "loop_cpu_ms", ".1f"),
           ("GIL wait p50 us", "gil_p50_us", ".0f"), ("p99 us", "gil_p99_us", ".0f")]


def profile(http: httpx.Client, route: str, **asked) -> dict:
    response = http.post(f"/{route}/profile", json=asked, timeout=300)
    if response.status_code != 200:
        raise SystemExit(f"POST /{route}/profile answered {response.status_code}: {response.text[:500]}")
    return response.json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--route", default="resnet50")
    p.add_argument("--samples-per-request", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="each capture's length")
    p.add_argument("--settle-s", type=float, default=4.0, help="load before the serving capture starts")
    p.add_argument("--no-stack", action="store_true", help="without the Python stacks (a smaller trace)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"profile-{args.route}.json")
    http = httpx.Client(base_url=args.url, timeout=60)
    duration = args.settle_s + args.seconds + 6  # the capture's own write happens while the load still runs
    protocol = (["--protocol", "v2", "--samples-per-request", str(args.samples_per_request)]
                if args.samples_per_request > 1 else [])
    load = subprocess.Popen([sys.executable, "-m", "autobatch.client.bench", "--url", args.url, "--route", args.route,
                             "--concurrency", str(args.concurrency), "--warmup", str(args.concurrency),
                             "--processes", str(args.processes), "--duration", str(duration), "--no-progress", "--json",
                             *protocol], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report: dict = {"environment": environment(), "route": args.route, "samples_per_request": args.samples_per_request,
                    "concurrency": args.concurrency}
    try:
        time.sleep(args.settle_s)
        say(f"capturing {args.seconds:g} s of {args.route} serving under {args.concurrency} clients")
        report["serving"] = profile(http, args.route, what="serving", seconds=args.seconds, with_stack=not args.no_stack)
        write_json(out, report)
    finally:
        load_output, _ = load.communicate(timeout=duration + 120)
    report["load"] = load_output[-3000:]
    served_batch = max(1, round(report["serving"]["per_batch"].get("mean_batch") or 1))
    say(f"capturing {args.seconds:g} s of the tuning probe at batch {served_batch} (the serving's mean batch)")
    report["probe"] = profile(http, args.route, what="probe", seconds=args.seconds, batch_size=served_batch,
                              with_stack=not args.no_stack)
    largest = report["serving"].get("serving_max_batch_size")
    if largest and largest != served_batch:
        report["probe_at_max"] = profile(http, args.route, what="probe", seconds=args.seconds, batch_size=largest,
                                         with_stack=False)
    rows = [row("served", report["serving"]), row(f"probe b{served_batch}", report["probe"])]
    if "probe_at_max" in report:
        rows.append(row(f"probe b{largest} (max)", report["probe_at_max"]))
    report["rows"] = rows
    write_json(out, report)
    print(table(rows, COLUMNS))
    say(f"wrote {out}; traces: {report['serving']['trace']}, {report['probe']['trace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
