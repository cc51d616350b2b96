"""One tuning per GPU type across a real two-node Ray cluster on this machine.

A head and a worker started with `ray start` (each with its own temp dir, ports and TMPDIR, so the
per-host tuning lock does not span them), custom resources `gpu_type_a` / `gpu_type_b` standing in
for two GPU types, and two Serve apps of 2 replicas each, placed by those resources. Both nodes are
this one CPU, so the device fingerprint cannot tell them apart: each app's `tuning_group` names its
type, as a cluster with two nodes the fingerprint confuses would. The cache is a URL both nodes
read (local://, through fsspec: no file lock spans its writers), so what keeps each type to one
tuning is the cluster's coordinator actor: per type one replica measures (cache miss) and the other
takes its answer (cache hit), and the actor granted one lease per type.

Only the processes this test starts are stopped (never `ray stop`: other clusters may run here).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from serve.local import stop_cluster, wait_for_head
from serve_helpers import free_port

REPO = Path(__file__).resolve().parent.parent
TYPES = ("gpu_type_a", "gpu_type_b")

DRIVER = """
import json, sys, time
import ray
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve.config import ProxyLocation
from ray.serve.schema import ServeDeploySchema

address, http_port, apps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ray.init(address=address)
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    assert time.time() < deadline, "the worker node never joined"
    time.sleep(0.5)
http_options = {"host": "127.0.0.1", "port": http_port}
client = serve_api.serve_start(http_options=http_options, proxy_location=ProxyLocation.HeadOnly)
client.deploy_apps(ServeDeploySchema.model_validate(
    {"proxy_location": "HeadOnly", "http_options": http_options, "applications": apps}), _blocking=False)
"""

COORDINATOR_STATE = """
import json, sys
import ray
from serve.replica.single_flight import COORDINATOR_NAME, COORDINATOR_NAMESPACE
ray.init(address=sys.argv[1])
print(json.dumps(ray.get(ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE).state.remote())))
"""


def start_node(tmp: Path, name: str, resource: str, env: dict, head_port: int, head: bool) -> subprocess.Popen:
    node_env = {**env, "TMPDIR": str(tmp / f"{name}-tmp"), "AUTOSCALER_METRIC_PORT": str(free_port()),
                "DASHBOARD_METRIC_PORT": str(free_port())}
    os.makedirs(node_env["TMPDIR"], exist_ok=True)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
               "--resources", json.dumps({resource: 1}), "--temp-dir", str(tmp / name),
               "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
    if head:
        command += ["--head", "--port", str(head_port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_port())]
    else:
        command += ["--address", f"127.0.0.1:{head_port}"]
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(command, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def app(resource: str, cache_url: str) -> dict:
    return {"name": resource, "route_prefix": f"/{resource}", "import_path": "serve.app:build",
            "args": {"model": "tiny_mlp", "device": "cpu", "num_replicas": 2, "num_cpus": 0,
                     "resources": {resource: 0.5}, "tuning_group": resource, "cache_path": cache_url,
                     "max_batch": 4, "repeats": 1, "warmup": 0, "warm_sizes_budget_s": 0}}


def replicas_seen(http: httpx.Client, route: str, want: int, timeout_s: float) -> dict[int, dict]:
    """GET /tuning until `want` different replicas (pids) have answered."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        try:
            r = http.get(f"/{route}/tuning", timeout=10)
            if r.status_code == 200:
                seen[r.json()["replica"]["pid"]] = r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return seen


def node_logs(tmp: Path) -> str:
    return "".join(f"\n--- {name}.log\n" + (tmp / f"{name}.log").read_text(errors="replace")[-1500:]
                   for name in ("head", "worker") if (tmp / f"{name}.log").exists())


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="abc", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "fifth_model")]),
           "AUTOBATCH_MODELS": "tiny_mlp=tiny_mlp:TinyMLPSpec", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0",
           # Ray 2.60 turns token authentication on for a head: every node and driver here sends this one
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token")}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "AUTOBATCH_TUNING_GROUP"):
        env.pop(key, None)
    (tmp / "auth_token").write_text(secrets.token_hex(32))
    os.chmod(tmp / "auth_token", 0o600)
    head_port, http_port = free_port(), free_port()
    nodes = []
    try:
        nodes.append(start_node(tmp, "head", TYPES[0], env, head_port, head=True))
        wait_for_head(nodes[0], [head_port], timeout_s=120)
        nodes.append(start_node(tmp, "worker", TYPES[1], env, head_port, head=False))
        cache_url = f"local://{tmp}/shared/tuning.json"
        driver = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{head_port}", str(http_port),
                                 json.dumps([app(t, cache_url) for t in TYPES])],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stderr[-3000:] + node_logs(tmp)
        yield {"tmp": tmp, "env": env, "address": f"127.0.0.1:{head_port}", "http": f"http://127.0.0.1:{http_port}"}
    finally:
        for node in reversed(nodes):
            stop_cluster(node)
        shutil.rmtree(tmp, ignore_errors=True)


def test_each_gpu_type_tunes_once_across_the_cluster(cluster):
    with httpx.Client(base_url=cluster["http"]) as http:
        reports = {t: replicas_seen(http, t, want=2, timeout_s=240) for t in TYPES}
    for gpu_type, replicas in reports.items():
        assert len(replicas) == 2, f"{gpu_type}: {len(replicas)} replica(s) answered /tuning; node logs in {cluster['tmp']}"
        sources = sorted(r["cache"] for r in replicas.values())
        assert sources == ["hit", "miss"], f"{gpu_type}: {sources}: expected one tuning and one answer taken"
        assert all(r["replica"]["tunings"] == 1 and r["replica"]["tuning_group"] == gpu_type
                   and r["replica"]["single_flight"] for r in replicas.values())
        assert len({r["key"] for r in replicas.values()}) == 1  # one key per type...
        assert len({(r["tuned_at"], r["batch_size"]) for r in replicas.values()}) == 1  # ...one measurement
    assert reports[TYPES[0]].popitem()[1]["key"] != reports[TYPES[1]].popitem()[1]["key"]  # a new type misses

    state = subprocess.run([sys.executable, "-c", COORDINATOR_STATE, cluster["address"]], env=cluster["env"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert state.returncode == 0, state.stderr[-3000:]
    grants = json.loads(state.stdout.strip().splitlines()[-1])["grants"]
    assert sorted(grants.values()) == [1, 1], grants  # one lease, one tuning, per GPU type
