"""Overload on the CPU ViT (issue 15): 64 closed-loop clients against one replica that serves a
fraction of that, twice: clients that resend at once after a 503, and clients that wait the
Retry-After the 503 carries. What to look for: served requests' p99 within the admission bound
(2 latency budgets + one batch, or 3 batches where one batch is slower than the budget), refusals
answered in well under a second, nothing waiting tens of seconds.

    python benchmarks/overload.py                     # ViT-B/16 on the CPU, 60 s per client kind
    python benchmarks/overload.py --duration 20 --model resnet50

`make serve`'s launcher (serve/local.py) runs a one-app config (the model on the CPU, num_cpus 1,
max_batch 32, memory_fraction 0.22, the given latency budget) on free loopback ports; the load is
`autobatch bench` (autobatch/client/load.py). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, environment, free_port, say, table, write_json  # noqa: E402

from autobatch.client.bench import Load, default_payloads, run_load  # noqa: E402

COLUMNS = [("clients", "clients", ""), ("served req/s", "served_per_s", ".2f"), ("served p50 ms", "ok_p50_ms", ".0f"),
           ("served p99 ms", "ok_p99_ms", ".0f"), ("bound ms", "bound_ms", ".0f"), ("503s", "refused", ""),
           ("503 p50 ms", "refused_p50_ms", ".0f"), ("503 p99 ms", "refused_p99_ms", ".0f"),
           ("max ms", "max_ms", ".0f"), ("other errors", "other_errors", "")]


def start(model: str, budget_ms: float, work: str) -> tuple[subprocess.Popen, str]:
    http_port = free_port()
    config = yaml.safe_load(open(os.path.join(REPO, "serve_config.yaml")))
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = free_port()
    config["applications"] = [{
        "name": model, "route_prefix": f"/{model}", "import_path": "serve.app:build",
        "args": {"model": model, "device": "cpu", "max_batch": 32, "memory_fraction": 0.22, "num_cpus": 1,
                 "latency_budget_ms": budget_ms, "cache_path": os.path.join(work, "tuning.json")}}]
    path = os.path.join(work, "overload.yaml")
    yaml.safe_dump(config, open(path, "w"))
    ports = [str(free_port()) for _ in range(3)]
    log = open(os.path.join(work, "serve.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "serve.local", path, "--port", ports[0], "--dashboard-port", ports[1],
                             "--metrics-export-port", ports[2], "--ingress", "proxy", "--temp-dir", work],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{http_port}"


def wait_tuned(base: str, model: str, timeout_s: float = 900) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            r = httpx.get(f"{base}/{model}/tuning", timeout=10)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{model} did not come up within {timeout_s:.0f} s")


def row(clients: str, report: dict, tuning: dict) -> dict:
    ok, refused = report["latency_s"], report.get("error_latency_s") or {}
    errors = dict(report["errors"])
    n_refused = errors.pop("503", 0)
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {"clients": clients, "served_per_s": report["ok"] / report["wall_s"], "ok_p50_ms": ms(ok["p50"]),
            "ok_p99_ms": ms(ok["p99"]), "bound_ms": ms(tuning["serving"]["admission"].get("bound_s")),
            "refused": n_refused, "refused_p50_ms": ms(refused.get("p50")), "refused_p99_ms": ms(refused.get("p99")),
            "max_ms": ms(max(ok.get("max") or 0, refused.get("max") or 0)), "other_errors": errors,
            "batch_size": tuning["serving"]["max_batch_size"],
            "batch_time_ms": ms(tuning["serving"]["admission"].get("batch_time_s"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--latency-budget-ms", type=float, default=500.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ovl", dir="/tmp")  # Ray's socket paths must stay short
    proc, base = start(args.model, args.latency_budget_ms, work)
    rows, reports = [], {}
    try:
        tuning = wait_tuned(base, args.model)
        say(f"{args.model}: batch {tuning['serving']['max_batch_size']}, budget {args.latency_budget_ms:.0f} ms")
        payloads = default_payloads(base, f"/{args.model}")
        for honor in (False, True):
            name = "wait Retry-After" if honor else "resend at once"
            report = run_load(Load(route=f"/{args.model}", url=base, payloads=payloads, concurrency=args.clients,
                                   duration_s=args.duration, timeout_s=120, honor_retry_after=honor))
            tuning = httpx.get(f"{base}/{args.model}/tuning", timeout=30).json()
            rows.append(row(f"{args.clients}, {name}", report, tuning))
            reports[name] = report
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print(table(rows, COLUMNS))
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"overload-{args.model}-cpu.json")
    write_json(out, {"environment": environment("cpu"), "model": args.model,
                     "latency_budget_ms": args.latency_budget_ms, "rows": rows, "reports": reports})
    say(f"wrote {out}; server log {work}/serve.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
