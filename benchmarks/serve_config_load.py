"""All four models of serve_config.yaml on one device at once, under HTTP load, against plain Ray Serve.

Phase 1 deploys every application of serve_config.yaml exactly as `serve run` would (same builder,
same args, a fresh tuning cache so each replica tunes at start-up), then drives a closed-loop load
at each route in turn while all four replicas share the card. Phase 2 replaces them with plain Ray
Serve deployments of the same models (benchmarks/plain_serve.py: `@serve.batch` defaults
max_batch_size=10, batch_wait_timeout_s=0.01, max_ongoing_requests=5), on the same shares of the
same card, and drives the same load. One table, same run, same card.

    python benchmarks/serve_config_load.py --concurrency 64 --duration 15 --llama-config llama3-8b
    python benchmarks/serve_config_load.py --quick      # CPU: ResNet-50 only, tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import httpx
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, environment, markdown_table, say, start_cluster, table, write_json  # noqa: E402

from optimizer.tuning import Tuning  # noqa: E402
from autobatch.client.bench import Load, default_payloads, run_load  # noqa: E402

COLUMNS = [("model", "model", ""), ("variant", "variant", ""), ("batch", "batching", ""),
           ("req/s", "requests_per_s", ".1f"), ("p50 ms", "p50_ms", ".0f"), ("p99 ms", "p99_ms", ".0f"),
           ("mean batch", "mean_batch", ".1f"), ("errors", "errors", ""), ("x plain", "x_plain", ".2f")]


def stats(http: httpx.Client, route: str, autobatch: bool) -> tuple[int, int]:
    body = http.get(route + ("/tuning" if autobatch else "/stats")).json()
    s = body["stats"] if autobatch else body
    return s["batches"], s["samples_served"]


def drive(http, base: str, app: dict, variant: str, args) -> dict:
    route = app["route_prefix"]
    autobatch = variant == "autobatch"
    payloads = default_payloads(base, route, max_new_tokens=args.max_new_tokens)
    run_load(Load(route=route, url=base, payloads=payloads, concurrency=args.concurrency,
                  duration_s=args.warmup_s, timeout_s=args.timeout))
    b0, s0 = stats(http, route, autobatch)
    report = run_load(Load(route=route, url=base, payloads=payloads, concurrency=args.concurrency,
                           duration_s=args.duration, timeout_s=args.timeout))
    b1, s1 = stats(http, route, autobatch)
    lat = report["latency_s"]
    row = {"model": app["args"]["model"], "variant": variant, "concurrency": args.concurrency,
           "requests_per_s": report["requests_per_s"], "samples_per_s": report["samples_per_s"],
           "tokens_per_s": report.get("tokens_per_s"),
           "p50_ms": lat["p50"] * 1e3 if lat["p50"] is not None else None,
           "p99_ms": lat["p99"] * 1e3 if lat["p99"] is not None else None,
           "ok": report["ok"], "errors": sum(report["errors"].values()), "errors_by_status": report["errors"],
           "mean_batch": (s1 - s0) / (b1 - b0) if b1 > b0 else None}
    if autobatch:
        report = http.get(route + "/tuning").json()  # the Tuning's fields, plus what the replica serves with
        t = Tuning.from_dict(report)
        row.update(batching=f"tuned {report['serving']['max_batch_size']} (max safe {t.max_safe_batch})",
                   tuned_batch=t.batch_size, max_safe_batch=t.max_safe_batch, tuning_s=t.tuning_s,
                   wait_ms=t.batch_wait_timeout_s * 1e3, device=t.device.label)
    else:
        row["batching"] = "defaults: 10, 10 ms, ongoing 5"
        row["device"] = http.get(route + "/stats").json().get("device")
    say(f"  {row['model']} {variant} on {row.get('device')}: {row['requests_per_s']:.1f} req/s, p50 {row['p50_ms'] or 0:.0f} ms, "
        f"p99 {row['p99_ms'] or 0:.0f} ms, mean batch {row['mean_batch'] or 0:.1f}, errors {row['errors']}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "serve_config.yaml"))
    parser.add_argument("--models", nargs="+", default=None, help="applications to run (default: all in the config)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--llama-config", default=None, help="synthetic Llama shape for llama_int4 (small, llama3-8b)")
    parser.add_argument("--llama-max-batch", type=int, default=None, help="override llama_int4's max_batch")
    parser.add_argument("--num-cpus", type=float, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.concurrency, args.duration, args.warmup_s = ["resnet50"], 4, 2.0, 1.0

    from ray import serve

    from plain_serve import PlainBatched
    from serve.app import build

    config = yaml.safe_load(open(args.config))
    apps = [a for a in config["applications"] if args.models is None or a["args"]["model"] in args.models]
    cache_dir = tempfile.mkdtemp(prefix="autobatch-serve-config-")
    base = start_cluster(args.num_cpus, threads=None)
    http = httpx.Client(base_url=base, timeout=args.timeout, trust_env=False)
    rows, ready = [], {}
    out = args.out or os.path.join(tempfile.gettempdir(), "serve_config_load.json")
    for variant in ("autobatch", "plain batched"):
        started = time.perf_counter()
        for app in apps:
            app_args = dict(app["args"])
            options = dict(app_args.get("options") or {})
            if app_args["model"] == "llama_int4":
                if args.llama_config:
                    options["config"] = args.llama_config
                if args.llama_max_batch:
                    app_args["max_batch"] = args.llama_max_batch
            if args.quick:
                app_args.update(max_batch=4, repeats=1, latency_budget_ms=30000)
            app_args["options"] = options
            app_args["cache_path"] = os.path.join(cache_dir, "tuning.json")
            if variant == "autobatch":
                target = build(app_args)
            else:
                import ray

                gpus = app_args.get("num_gpus", 0) if ray.cluster_resources().get("GPU") else 0
                target = PlainBatched.options(ray_actor_options={"num_cpus": app_args.get("num_cpus", 0.25),
                                                                 "num_gpus": gpus}).bind(app_args["model"], options, "auto")
            say(f"{variant}: deploying {app['name']} at {app['route_prefix']}")
            serve.run(target, name=f"{app['name']}-{variant.replace(' ', '-')}", route_prefix=app["route_prefix"])
        ready[variant] = time.perf_counter() - started
        say(f"{variant}: all {len(apps)} applications ready in {ready[variant]:.1f} s")
        for app in apps:
            rows.append(drive(http, base, app, variant, args))
            write_json(out + ".partial", {"rows": rows, "ready_s": ready})  # survives a cut-off run
        for app in apps:
            serve.delete(f"{app['name']}-{variant.replace(' ', '-')}")
    by = {(r["model"], r["variant"]): r for r in rows}
    for r in rows:
        plain = by.get((r["model"], "plain batched"))
        r["x_plain"] = r["requests_per_s"] / plain["requests_per_s"] if plain and plain["requests_per_s"] else None
    env = environment()
    payload = {"environment": env, "concurrency": args.concurrency, "duration_s": args.duration,
               "ready_s": ready, "rows": rows}
    write_json(out, payload)
    print(table(rows, COLUMNS))
    print()
    print(markdown_table(rows, COLUMNS))
    print("ready: " + ", ".join(f"{k} {v:.0f} s" for k, v in ready.items()) + f"; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
