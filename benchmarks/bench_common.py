"""Shared by the benchmark scripts: the repo on sys.path (scripts run as `python benchmarks/x.py`,
with no console scripts installed), offline settings, a record of the machine and the versions the
numbers came from, plain-text tables and JSON output."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("YOLO_OFFLINE", "1"), ("RAY_USAGE_STATS_ENABLED", "0"),
                      ("YOLO_AUTOINSTALL", "False")):
    os.environ.setdefault(_name, _value)

RESULTS = os.path.join(REPO, "benchmarks", "results")
PACKAGES = ("torch", "torchvision", "ray", "ultralytics", "accelerate", "transformers", "bitsandbytes", "httpx", "autobatch")


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", None)


def cpu_model() -> str:
    from optimizer.devices import cpu_model_name

    return cpu_model_name()


def environment(kind: str | None = None) -> dict:
    """What a reader needs to reproduce a number: machine, card, versions, the exact command."""
    import psutil

    env = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "packages": {name: version(name) for name in PACKAGES},
        "device": "cpu",
        # other work on the machine skews CPU timings: the 1/5/15-minute load average when the run began
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if kind == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
            try:
                import pynvml

                pynvml.nvmlInit()
                env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            except Exception:  # noqa: BLE001 - NVML is optional for the record
                pass
    except ImportError:
        pass
    return env


def describe_environment(env: dict) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    dev = env["device"] if env["device"] == "cpu" else f"{env['device']} ({env.get('gpu_memory_gib')} GiB, CUDA {env.get('cuda')}, driver {env.get('driver', '?')})"
    return (f"machine: {env['cpu']} x{env['cpu_count']}, {env['memory_gib']} GiB RAM; device: {dev}; "
            f"Python {env['python']}; {pkgs}\ncommand: {env['command']}  ({env['when']}, load average "
            f"{env.get('load_average_at_start')})")


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec). Right-aligned text, one line per row."""
    cells = [[h for h, _, _ in columns]] + [[fmt(r.get(k), spec) for _, k, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), spec) for _, k, spec in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def default_out(name: str, kind: str, quick: bool = False) -> str:
    return os.path.join(RESULTS, f"{name}-{kind}{'-quick' if quick else ''}.json")


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(num_cpus: int, threads: int | None) -> str:
    """A local Ray (workers inherit the repo on PYTHONPATH and the thread count) and Serve's HTTP
    proxy on a free loopback port. Returns the base URL."""
    import ray
    from ray import serve

    here = os.path.join(REPO, "benchmarks")  # plain_serve.py, imported by the baseline replicas
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, here, os.environ.get("PYTHONPATH")] if p)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # replicas: torch threads (Ray would use floor(num_cpus))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return f"http://127.0.0.1:{port}"


def stop_launcher(proc, timeout_s: float) -> None:
    """Stop a `python -m serve.local` started in a session of its own: SIGINT to its group (it then
    stops `serve run`, Ray and HAProxy), SIGKILL to the group if it has not ended within `timeout_s`."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
