"""Start-up to first answer for serve_config.yaml, phase by phase: `make serve`'s launcher, cold (an
empty tuning cache: every replica loads and tunes) and cached (the cache the cold run wrote: load,
no tuning).

For each run: launch `python -m serve.local CONFIG --ingress I` with AUTOBATCH_CACHE pointing at
one file, note when the launcher's log says the Ray head is up and when `serve run` reports each
application deployed, then send each model one sample over OIP v2 HTTP every 0.5 s (a poller per model) until it
answers 200; the seconds from the launch to that answer are the model's start-up. Each replica's own
timeline (GET /<model>/tuning `startup`, serve/replica/timeline.py: process start, imports, spec, device,
model load, cache read or tuning, warm-up, first request) is laid on the launch's clock, so the
table says where every second went: "launch -> process" is the launcher's Ray start, `serve run`
and Ray's scheduling of the replica. With `--then CMD` the command runs while the apps are up.
Writes the JSON after each run (a cut-off run keeps what it measured).

On one GPU (about 4-5 minutes for the four apps cold, then cached):

    python benchmarks/startup.py --runs cold cached --out docs/results/issue22/h100_startup.json

On a CPU the same command runs the apps on the CPU (device: auto); `--runs cached --cache FILE`
measures a cached start from a cache an earlier run wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, environment, say, table, write_json  # noqa: E402


COLUMNS = [("run", "run", ""), ("model", "model", ""), ("first answer s", "first_answer_s", ".1f"),
           ("launch>proc", "launch_to_process_s", ".1f"), ("worker", "worker", ".1f"),
           ("imports", "imports", ".1f"), ("constr", "constructed", ".1f"), ("spec", "spec", ".1f"),
           ("libs", "libraries", ".1f"), ("device", "device", ".1f"), ("load", "model_load", ".1f"), ("tuning", "tuning", ".1f"),
           ("warm", "warm_up", ".1f"), ("1st req", "first_request", ".1f"), ("cache", "cache", ""),
           ("batch", "batch_size", "")]
MARKERS = {"ray_head_up": "autobatch: Ray head on", "serve_run_config": "Running config file",
           "serve_started": "Started Serve in namespace"}


def one_sample(model: str) -> dict:
    """A v2 request of one sample: a tiny image (README's curl) for image models, a prompt for the Llama."""
    if model.startswith("llama"):
        return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Once upon a time"]}],
                "parameters": {"max_tokens": 4}}
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                        "data": [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]}]}


def launch(config: str, ingress: str, cache: str, log_path: str) -> subprocess.Popen:
    env = {**os.environ, "AUTOBATCH_CACHE": cache}
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "serve.local", config, "--ingress", ingress],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


class LogWatch:
    """When each marker line first appeared in the launcher's log, in seconds after the launch."""

    def __init__(self, path: str, started: float):
        self.path, self.started, self.offset = path, started, 0
        self.seen: dict[str, float] = {}
        self.deployed: dict[str, float] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        now = time.perf_counter() - self.started
        for line in chunk[:cut].decode("utf-8", "replace").splitlines():
            for name, marker in MARKERS.items():
                if marker in line:
                    self.seen.setdefault(name, now)
            if "Deployed app" in line and "'" in line:
                self.deployed.setdefault(line.split("'")[1], now)
        if self.deployed:
            self.seen["all_deployed"] = max(self.deployed.values())


def first_answers(base: str, models: list[str], started: float, timeout_s: float,
                  watch: LogWatch | None = None) -> dict[str, float | None]:
    """Each model polled by a thread of its own (one sample every 0.5 s until a 200), so a model that
    is not up yet (its request waits in the router) never delays another's first answer."""
    answered: dict[str, float] = {}

    def poll(model: str) -> None:
        body = one_sample(model)
        with httpx.Client(base_url=base, timeout=10) as http:
            while time.perf_counter() - started < timeout_s:
                try:
                    if http.post(f"/v2/models/{model}/infer", json=body).status_code == 200:
                        answered[model] = time.perf_counter() - started
                        say(f"{model}: first answer {answered[model]:.1f} s after the launch")
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)

    threads = [threading.Thread(target=poll, args=(m,), daemon=True) for m in models]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if watch is not None:
            watch.poll()
        time.sleep(0.5)
    return {m: answered.get(m) for m in models}


def timeline_row(startup: dict | None, launched_at: float) -> dict:
    """A replica's phases (seconds), with its process start on the launch's clock."""
    if not startup:
        return {}
    row = dict(startup.get("seconds") or {})
    began = startup.get("process_started_at") or startup.get("began_at")
    if began:
        row["launch_to_process_s"] = round(began - launched_at, 3)
    row["tuning_note"] = (startup.get("notes") or {}).get("tuning")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--runs", nargs="+", default=["cold", "cached"], choices=["cold", "cached"])
    p.add_argument("--ingress", nargs="+", default=["auto"], help="one launch per ingress per run")
    p.add_argument("--cache", default=None, help="tuning cache file (default: a fresh temporary one)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--then", default=None, help="a shell command to run while the apps are up")
    p.add_argument("--then-runs", nargs="+", default=["cold", "cached"], choices=["cold", "cached"],
                   help="the runs after which --then runs (default both)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    config = yaml.safe_load(open(os.path.join(REPO, args.config)))
    models = [a["args"]["model"] for a in config["applications"] if "model" in (a.get("args") or {})]
    work = tempfile.mkdtemp(prefix="startup-")
    cache = args.cache or os.path.join(work, "tuning.json")
    out = args.out or os.path.join(REPO, "benchmarks", "results", "startup.json")
    rows, extra = [], []
    for run in args.runs:
        for ingress in args.ingress:
            if run == "cold" and os.path.exists(cache):
                os.remove(cache)
            log_path = os.path.join(work, f"serve-{run}-{ingress}.log")
            launched_at, started = time.time(), time.perf_counter()
            proc = launch(args.config, ingress, cache, log_path)
            watch = LogWatch(log_path, started)
            try:
                answers = first_answers(args.url, models, started, args.timeout_s, watch)
                watch.poll()
                for model, seconds in answers.items():
                    row = {"run": run, "ingress": ingress, "model": model, "first_answer_s": seconds}
                    try:
                        t = httpx.get(f"{args.url}/{model}/tuning", timeout=30).json()
                        row.update(cache=t.get("cache"), batch_size=t.get("batch_size"), device_label=t.get("device"),
                                   **timeline_row(t.get("startup"), launched_at))
                        row["startup"] = t.get("startup")
                    except (httpx.HTTPError, ValueError):
                        pass
                    row["deployed_s"] = watch.deployed.get(model)
                    rows.append(row)
                if args.then and run in args.then_runs:
                    say(f"running: {args.then}")
                    done = subprocess.run(args.then, shell=True, cwd=REPO, capture_output=True, text=True)
                    print(done.stdout + done.stderr, flush=True)
                    extra.append({"run": run, "ingress": ingress, "command": args.then, "rc": done.returncode,
                                  "output": done.stdout + done.stderr})
            finally:
                stop(proc)
                with open(log_path, errors="replace") as f:
                    ingress_lines = [line.strip() for line in f if "autobatch: ingress" in line]
                extra.append({"run": run, "ingress": ingress, "launcher_says": ingress_lines,
                              "launcher_s": dict(watch.seen), "deployed_s": dict(watch.deployed), "log": log_path})
                say(f"{run}: launcher: " + ", ".join(f"{k} {v:.1f} s" for k, v in watch.seen.items()))
                write_json(out, {"environment": environment(), "config": args.config, "rows": rows, "runs": extra})
                time.sleep(3)
    print(table(rows, COLUMNS))
    say(f"wrote {out}; launcher logs under {work}")
    failed = any(r["first_answer_s"] is None for r in rows) or any(e.get("rc") for e in extra)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
