"""Several GPUs in one host (issue 21): ResNet-50 on every card, per-card and total images/s at 32
JPEGs per request, and the start-up to first answer on every card.

    # on a host of 2+ GPUs (nvidia-h100-x2 or larger):
    . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; python benchmarks/gpu_multi.py
    python benchmarks/gpu_multi.py --per-card 2 --clients-per-card 8 --duration 20
    # on a CPU, the same stages with the stand-in device (benchmarks/stand_in_device.py), one
    # replica per would-be card, device cpu (there is no card for Ray to hand out):
    python benchmarks/gpu_multi.py --stand-in --cards 2 --duration 8

It deploys serve_config.yaml's OIP router and resnet50 app as they are, but for the models list and
`replicas_per_gpu` (--per-card; 1 is serve_config.yaml's own default of one replica per card), into a
fresh local Ray with a fresh tuning cache, then:

  cold start   from the deploy to each replica's first answer (GET /resnet50/tuning, polled until
               every replica has answered), per card: one replica per GPU type measures, the rest
               take its answer from the cluster's coordinator or the cache (`cache`, `tunings`);
  load         `--clients-per-card` x cards closed-loop clients sending Open Inference Protocol v2
               requests of --samples JPEGs (640x480) over HTTP through the router: total images/s
               from the load generator, per-card images/s from each replica's own samples_served;
  warm start   (unless --no-warm-restart) the app removed and deployed again on the same cache:
               every replica's start-up to first answer from the cache.

Every stage's result is written at once to $OUT/gpu_multi.json (or --out), so a run stopped at the
10-minute limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import REPO, environment, free_port, markdown_table, say, table, write_json  # noqa: E402

MODEL = "resnet50"
STAND_IN = "stand_in_device"
STAND_IN_REGISTRATION = "stand_in_device=stand_in_device:StandInDeviceSpec"


def gpu_cards() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def apps(args, cache_path: str) -> list[dict]:
    """serve_config.yaml's router and model app, cut to one model; the stand-in in its place on a CPU."""
    import yaml

    config = yaml.safe_load(open(os.path.join(REPO, "serve_config.yaml")))
    router = next(a for a in config["applications"] if a["name"] == "oip")
    model = next(a for a in config["applications"] if a["name"] == MODEL)
    name = STAND_IN if args.stand_in else MODEL
    router["args"] = {**router["args"], "models": [name], "num_replicas": args.routers}
    model_args = {**model["args"], "cache_path": cache_path, "num_cpus": args.num_cpus}
    if args.per_card > 1:  # k replicas of 1/k of each card, each within 1/k of its memory
        model_args.pop("num_gpus", None)
        model_args.update(replicas_per_gpu=args.per_card, memory_fraction=round(0.9 / args.per_card, 3))
    else:  # the card to itself: serve_config.yaml's 0.25 share is for four models
        model_args.update(num_gpus=1.0, memory_fraction=0.9)
    model_app = {**model, "name": name, "args": model_args}
    if args.stand_in:
        model_app["args"] = {"model": STAND_IN, "device": "cpu", "num_replicas": args.cards * args.per_card,
                             "max_batch": 64, "latency_budget_ms": 1000, "cache_path": cache_path,
                             "num_cpus": args.num_cpus, "memory_fraction": round(0.5 / (args.cards * args.per_card), 3),
                             "options": {"fixed_ms": args.fixed_ms, "per_sample_ms": args.per_sample_ms}}
        python_path = os.pathsep.join([HERE, REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {"AUTOBATCH_MODELS": STAND_IN_REGISTRATION, "PYTHONPATH": python_path}
        model_app["runtime_env"] = {"env_vars": env}
        router["runtime_env"] = {"env_vars": env}
    return [router, model_app]


class Server:
    """A local Ray and Serve (HTTP on a free 127.0.0.1 port) in this process."""

    def __init__(self, args):
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.config import ProxyLocation

        if args.stand_in:
            os.environ["AUTOBATCH_MODELS"] = STAND_IN_REGISTRATION  # the builder validates the model name here
            sys.path.insert(0, HERE)
        ray.init(include_dashboard=False, log_to_driver=args.verbose, **({"num_cpus": args.ray_cpus} if args.ray_cpus else {}))
        self.http_options = {"host": "127.0.0.1", "port": free_port()}
        self.client = serve_api.serve_start(http_options=self.http_options, proxy_location=ProxyLocation.HeadOnly)
        self.base = f"http://127.0.0.1:{self.http_options['port']}"
        self.gpus = float(ray.cluster_resources().get("GPU", 0))

    def deploy(self, applications: list[dict]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(
            {"proxy_location": "HeadOnly", "http_options": self.http_options, "applications": applications}), _blocking=False)

    def delete(self, names: list[str]) -> None:
        from ray import serve

        for name in names:
            serve.delete(name, _blocking=True)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def card_of(report: dict, stand_in: bool) -> str:
    """The card a replica serves on (Ray's GPU ids, in GET /tuning); the stand-in's would-be card is its pid."""
    ids = report["replica"].get("gpu_ids") or []
    if ids:
        return ",".join(str(i) for i in ids)
    return f"replica-{report['replica']['pid']}" if stand_in else "cpu"


def replicas_answering(base: str, route: str, want: int, started: float, timeout_s: float) -> dict[int, dict]:
    """GET <route>/tuning until `want` replicas (pids) have answered; each with the seconds from
    `started` (the deploy) to its first answer."""
    import httpx

    seen: dict[int, dict] = {}
    deadline = time.perf_counter() + timeout_s
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
        while len(seen) < want and time.perf_counter() < deadline:
            try:
                r = http.get(route + "/tuning")
                if r.status_code == 200:
                    t = r.json()
                    pid = t["replica"]["pid"]
                    if pid not in seen:
                        seen[pid] = {**t, "first_answer_s": time.perf_counter() - started}
                    else:
                        seen[pid] = {**t, "first_answer_s": seen[pid]["first_answer_s"]}
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    return seen


def start_stage(server: Server, args, cache_path: str, label: str, want: int) -> list[dict]:
    route = "/" + (STAND_IN if args.stand_in else MODEL)
    started = time.perf_counter()
    server.deploy(apps(args, cache_path))
    replicas = replicas_answering(server.base, route, want, started, args.start_timeout)
    rows = [{"stage": label, "card": card_of(t, args.stand_in), "pid": pid, "first_answer_s": t["first_answer_s"],
             "cache": t["cache"], "tunings": t["replica"]["tunings"], "tuning_wall_s": t["replica"]["tuning_wall_s"],
             "batch_size": t["serving"]["max_batch_size"], "device": t["replica"]["device"]}
            for pid, t in sorted(replicas.items(), key=lambda kv: kv[1]["first_answer_s"])]
    for row in rows:
        say(f"  {label}: card {row['card']}: first answer {row['first_answer_s']:.1f} s after the deploy "
            f"(cache {row['cache']}, batch {row['batch_size']})")
    if len(rows) < want:
        say(f"  {label}: only {len(rows)} of {want} replicas answered within {args.start_timeout:.0f} s")
    return rows


def load_stage(server: Server, args, want: int, cards: int) -> dict:
    from autobatch.client.bench import Load, generated_jpeg, run_load
    from autobatch.client.oip_commands import V2Sender

    name = STAND_IN if args.stand_in else MODEL
    route = "/" + name
    payloads = [(b"1.5", "application/json")] if args.stand_in else \
        [(generated_jpeg(seed=i), "image/jpeg") for i in range(8)]
    clients = args.clients_per_card * cards

    def load(duration_s: float) -> Load:
        spec = Load(route=route, url=server.base, payloads=payloads, concurrency=clients, duration_s=duration_s,
                    timeout_s=120)
        spec.sender = V2Sender(server.base, "http", name, [body for body, _ in payloads], args.samples, None,
                               spec.timeout_s, connections=clients)
        return spec

    run_load(load(args.warmup_s))  # every replica's batch sizes of this load warm, before counting
    before = replicas_answering(server.base, route, want, time.perf_counter(), 60)
    report = run_load(load(args.duration))
    after = replicas_answering(server.base, route, want, time.perf_counter(), 60)
    wall = report["wall_s"]
    per_card: dict[str, float] = {}
    for pid, t in after.items():
        if pid in before:
            served = t["stats"]["samples_served"] - before[pid]["stats"]["samples_served"]
            per_card[card_of(t, args.stand_in)] = per_card.get(card_of(t, args.stand_in), 0.0) + served / wall
    lat = report["latency_s"]
    return {"clients": clients, "samples_per_request": args.samples, "total_images_per_s": report["samples_per_s"],
            "requests_per_s": report["requests_per_s"], "p50_ms": lat["p50"] * 1e3 if lat["p50"] else None,
            "p99_ms": lat["p99"] * 1e3 if lat["p99"] else None, "errors": report["errors"],
            "per_card_images_per_s": per_card, "replicas_counted": len(per_card), "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stand-in", action="store_true", help="a CPU run: the stand-in device, --cards replicas")
    p.add_argument("--cards", type=int, default=2, help="--stand-in: how many cards to stand in for")
    p.add_argument("--per-card", type=int, default=1, help="replicas per card (replicas_per_gpu)")
    p.add_argument("--samples", type=int, default=32, help="JPEGs per Open Inference Protocol request")
    p.add_argument("--clients-per-card", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--routers", type=int, default=2, help="OIP router replicas")
    p.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per model replica")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--start-timeout", type=float, default=240.0)
    p.add_argument("--no-warm-restart", action="store_true")
    p.add_argument("--fixed-ms", type=float, default=100.0, help="--stand-in: the batch's fixed time")
    p.add_argument("--per-sample-ms", type=float, default=2.0, help="--stand-in: its time per sample")
    p.add_argument("--min-cards", type=int, default=2, help="refuse a host with fewer GPUs (1: a smoke run of the "
                   "GPU path on one card, e.g. with --per-card 2)")
    p.add_argument("--verbose", action="store_true", help="the replicas' logs on stderr")
    p.add_argument("--out", default=None, help="default $OUT/gpu_multi.json, else benchmarks/results/gpu_multi[-stand-in].json")
    args = p.parse_args()
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_multi.json") if os.environ.get("OUT") else
                       os.path.join(HERE, "results", f"gpu_multi{'-stand-in' if args.stand_in else ''}.json"))
    cards_seen = gpu_cards()
    if not args.stand_in and len(cards_seen) < args.min_cards:
        say(f"this host has {len(cards_seen)} GPU(s) ({cards_seen or 'nvidia-smi found none'}); the measurement needs "
            f"{args.min_cards} or more; on a CPU run it with --stand-in")
        return 2
    # environment("cpu"): its "cuda" kind opens a CUDA context on card 0 in this process, memory the
    # replicas there would then not have; the cards are recorded from nvidia-smi instead
    result = {"environment": environment("cpu"), "config": vars(args),
              "cards": cards_seen if not args.stand_in else [f"stand-in {i}" for i in range(args.cards)], "stages": {}}

    def save(stage: str, value) -> None:
        result["stages"][stage] = value
        write_json(out, result)
        say(f"{stage}: saved to {out}")

    server = Server(args)
    cards = args.cards if args.stand_in else int(server.gpus)
    want = cards * args.per_card
    say(f"{'stand-in' if args.stand_in else 'GPU'} run: {cards} card(s), {want} replica(s), Ray GPUs {server.gpus:g}")
    cache_path = os.path.join(tempfile.mkdtemp(prefix="gpu-multi-"), "tuning.json")
    try:
        cold = start_stage(server, args, cache_path, "cold start", want)
        save("cold_start", cold)
        if len(cold) < want:
            return 1
        loaded = load_stage(server, args, want, cards)
        save("load", loaded)
        say(f"  load: {loaded['total_images_per_s']:.0f} images/s in all, per card "
            + ", ".join(f"{card}: {v:.0f}" for card, v in sorted(loaded["per_card_images_per_s"].items())))
        warm = []
        if not args.no_warm_restart:
            server.delete(["oip", STAND_IN if args.stand_in else MODEL])
            warm = start_stage(server, args, cache_path, "warm start", want)
            save("warm_start", warm)
    finally:
        server.shutdown()
    columns = [("stage", "stage", ""), ("card", "card", ""), ("first answer s", "first_answer_s", ".1f"),
               ("cache", "cache", ""), ("tunings", "tunings", "d"), ("batch", "batch_size", "d")]
    print(table(cold + warm, columns))
    print(markdown_table(cold + warm, columns))
    rows = [{"card": card, "images_per_s": v} for card, v in sorted(loaded["per_card_images_per_s"].items())]
    rows.append({"card": "total (load generator)", "images_per_s": loaded["total_images_per_s"]})
    print(markdown_table(rows, [("card", "card", ""), ("images/s", "images_per_s", ".0f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
