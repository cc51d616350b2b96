"""Batch formation, side by side in one run: two checkouts of autobatch serving a model that behaves
like an accelerator (benchmarks/stand_in_device.py: its batch sleeps `fixed + per_sample x n`, so the
host's 2 cores stay free for the serving path, as they do while a GPU computes).

    python benchmarks/device_queue.py --trees before=/path/to/older/checkout after=. --concurrency 8 64
    # a checkout: git archive <commit> | tar -x -C /tmp/before

Each tree serves the stand-in from its own code (its AutobatchDeployment, tuned at start-up into a
fresh cache), in a fresh local Ray with Ray Serve's HTTP proxy on 127.0.0.1; this tree's load
generator (autobatch/client/bench.py, closed loop, one sample per request) measures both. The table shows
requests/s, p50/p99, and the batches the device ran (the replica's own GET /tuning `stats`):
with `@serve.batch` alone they are what its clock closed; with the device queue
(serve/replica/batcher.py) they are what waited when the device could take a batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import environment, markdown_table, say, table, write_json  # noqa: E402

MODEL = "stand_in_device"
ROUTE = "/stand_in"  # --layout direct: the model app's own route
REGISTRATION = "stand_in_device=stand_in_device:StandInDeviceSpec"


# ------------------------------------------------------------------ the server, in its own process
def serve_one(tree: str, fixed_ms: float, per_sample_ms: float, max_batch: int, num_cpus: float,
              latency_budget_ms: float, layout: str) -> None:
    """Serve the stand-in from `tree` and print its base URL; run until stdin closes."""
    tree = os.path.abspath(tree)
    sys.path[:0] = [tree, HERE]
    for name in [m for m in sys.modules if m.split(".")[0] in ("serve", "optimizer", "deployments")]:
        del sys.modules[name]  # bench_common put this tree first; the server's code is `tree`'s
    os.environ["PYTHONPATH"] = os.pathsep.join([tree, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ["AUTOBATCH_MODELS"] = REGISTRATION
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from bench_common import free_port

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    from serve.app import build

    cache = os.path.join(tempfile.mkdtemp(prefix="device-queue-"), "tuning.json")
    app = build({"model": "stand_in_device", "device": "cpu", "max_batch": max_batch, "cache_path": cache,
                 "num_cpus": num_cpus, "latency_budget_ms": latency_budget_ms, "options": {"fixed_ms": fixed_ms, "per_sample_ms": per_sample_ms}})
    if layout == "router":  # serve_config.yaml's: the OIP router owns every path, the model has no route
        from serve.oip.router import build_router

        serve.run(app, name=MODEL, route_prefix=None)
        serve.run(build_router({"models": [MODEL], "num_cpus": 0.1}), name="oip", route_prefix="/")
    else:
        serve.run(app, name="stand_in", route_prefix=ROUTE)
    # Ray puts the driver's working directory on its workers' paths: check the replicas run `tree`'s code
    served_from = ray.get(ray.remote(num_cpus=0)(lambda: __import__("serve.replica").replica.__file__).remote())
    if not os.path.abspath(served_from).startswith(tree + os.sep):
        raise RuntimeError(f"Ray workers import serve/ from {served_from}, not from {tree}")
    print(json.dumps({"url": f"http://127.0.0.1:{port}", "served_from": served_from}), flush=True)
    sys.stdin.read()
    serve.shutdown()
    ray.shutdown()


# ------------------------------------------------------------------ the load, from this tree
def stats(http, route: str) -> dict:
    t = http.get(route + "/tuning").json()
    return {"batches": t["stats"]["batches"], "samples": t["stats"]["samples_served"],
            "sizes": {int(k): v for k, v in t["stats"]["batch_sizes"].items()}, "serving": t["serving"],
            "batch_size": t["batch_size"], "wait_ms": t["batch_wait_timeout_s"] * 1e3}


def measure(label: str, tree: str, args) -> list[dict]:
    import httpx

    from autobatch.client.bench import Load, run_load
    from autobatch.client.oip_commands import V2Sender

    cmd = [sys.executable, os.path.abspath(__file__), "--serve-one", tree, "--fixed-ms", str(args.fixed_ms),
           "--per-sample-ms", str(args.per_sample_ms), "--max-batch", str(args.max_batch), "--num-cpus", str(args.num_cpus),
           "--latency-budget-ms", str(args.latency_budget_ms), "--layout", args.layout]
    route = f"/{MODEL}" if args.layout == "router" else ROUTE
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.path.abspath(tree))
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the {label} server ({tree}) exited before serving; run: {' '.join(cmd)}")
        base = json.loads(line)["url"]
        http = httpx.Client(base_url=base, timeout=120, trust_env=False)
        # the replica runs each batch size it may form once, between served batches, after start-up
        # (serve/replica/warmup.py): each run holds the device, so measure once that is done
        deadline = time.perf_counter() + 300
        while (http.get(route + "/tuning").json().get("warm_sizes") or {}).get("background") == "running":
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the {label} replica was still warming batch sizes after 300 s")
            time.sleep(1.0)
        first = stats(http, route)
        say(f"{label} ({json.loads(line)['served_from']}): serving in {time.perf_counter() - started:.0f} s; tuned batch {first['batch_size']}, "
            f"wait {first['wait_ms']:.1f} ms")
        payloads = [(b"1.5", "application/json")]

        def load(clients: int, duration_s: float) -> Load:
            spec = Load(route=route, url=base, payloads=payloads, concurrency=clients, duration_s=duration_s)
            if args.samples_per_request:  # Open Inference Protocol v2 over HTTP, binary tensors, through the router
                spec.sender = V2Sender(base, "http", MODEL, [body for body, _ in payloads], args.samples_per_request, None, spec.timeout_s,
                                       connections=clients)
            return spec

        run_load(load(max(args.concurrency), args.warmup_s))
        rows = []
        for clients in args.concurrency:
            before = stats(http, route)
            report = run_load(load(clients, args.duration))
            after = stats(http, route)
            batches, samples = after["batches"] - before["batches"], after["samples"] - before["samples"]
            sizes = {k: v - before["sizes"].get(k, 0) for k, v in after["sizes"].items() if v > before["sizes"].get(k, 0)}
            lat = report["latency_s"]
            rows.append({"tree": label, "clients": clients, "requests_per_s": report["requests_per_s"],
                         "samples_per_s": report["samples_per_s"], "samples_per_request": args.samples_per_request or 1,
                         "p50_ms": lat["p50"] * 1e3, "p99_ms": lat["p99"] * 1e3, "errors": sum(report["errors"].values()),
                         "device_batches": batches, "mean_batch": samples / batches if batches else None,
                         "largest_batch": max(sizes, default=0), "tuned_batch": after["batch_size"],
                         "wait_ms_in_force": after["serving"]["batch_wait_timeout_s"] * 1e3,
                         "coalesced_batches": (after["serving"].get("device_queue") or {}).get("coalesced_batches"),
                         "batch_sizes": sizes, "wait_notes": after["serving"].get("notes"),
                         "served_vs_tuned_latency": after["serving"].get("served_vs_tuned_latency")})
            say(f"  {clients} clients: {report['requests_per_s']:.1f} req/s, p99 {lat['p99'] * 1e3:.0f} ms, "
                f"mean device batch {rows[-1]['mean_batch'] or 0:.1f}")
        return rows
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=["after=."], help="LABEL=PATH of each checkout to serve, in order")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    # A device slow enough that 2 cores' HTTP path (~120 requests/s through Ray's proxy beside the load
    # generator) can send it more than it computes: 64 samples in 940 ms (68/s), one in 310 ms
    p.add_argument("--fixed-ms", type=float, default=300.0)
    p.add_argument("--per-sample-ms", type=float, default=10.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--latency-budget-ms", type=float, default=2000.0)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--layout", choices=["direct", "router"], default="direct",
                   help="direct: the model app's own route; router: serve_config.yaml's OIP router in front")
    p.add_argument("--samples-per-request", type=int, default=0,
                   help="N > 0: Open Inference Protocol v2 requests of N samples over HTTP (needs --layout router)")
    p.add_argument("--out", default=None)
    p.add_argument("--serve-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_one:
        serve_one(args.serve_one, args.fixed_ms, args.per_sample_ms, args.max_batch, args.num_cpus, args.latency_budget_ms,
                  args.layout)
        return
    if args.samples_per_request and args.layout != "router":
        p.error("--samples-per-request needs --layout router (the OIP routes are the router's)")
    rows = []
    for entry in args.trees:
        label, _, tree = entry.partition("=")
        rows += measure(label, tree or ".", args)
    columns = [("tree", "tree", ""), ("clients", "clients", "d"), ("req/s", "requests_per_s", ".1f"),
               ("samples/s", "samples_per_s", ".1f"),
               ("p50 ms", "p50_ms", ".0f"), ("p99 ms", "p99_ms", ".0f"), ("errors", "errors", "d"),
               ("mean device batch", "mean_batch", ".1f"), ("largest", "largest_batch", "d"),
               ("device batches", "device_batches", "d"), ("tuned batch", "tuned_batch", "d"),
               ("wait ms in force", "wait_ms_in_force", ".1f"), ("merged batches", "coalesced_batches", "d")]
    print(table(rows, columns))
    print(markdown_table(rows, columns))
    write_json(args.out or os.path.join(HERE, "results", "device_queue.json"),
               {"environment": environment("cpu"), "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
