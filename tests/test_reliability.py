"""The fault suite, short (issue 15, items 1, 2 and 7), on one shared cluster:

- overload: more concurrent requests than a resnet50 replica can answer within its bound get a JSON
  503 with Retry-After at once; the rest are served. A client deadline it cannot meet is refused.
- a replica killed under load (SIGKILL of its process): what failed, and the replacement serves
  from the cache (no re-tune).
- a binary, then a poisoned cache file, each followed by a replica restart: the replacement re-tunes
  and serves (no crash loop).
- a cache path that cannot be written (/proc): the replica tunes in memory and serves.

The replica-kill numbers are printed (pytest -s) for docs/benchmarks.md's Reliability section.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeCluster, image_bytes

from deployments.registry import MODELS_ENV
from serve.replica.admission import DEADLINE_HEADER

pytestmark = pytest.mark.timeout(600)

FIFTH_DIR = Path(__file__).resolve().parent / "fifth_model"
REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_ENV = {MODELS_ENV: "tiny_mlp=tiny_mlp:TinyMLPSpec",
            "PYTHONPATH": os.pathsep.join([str(FIFTH_DIR), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
TINY_BODY = json.dumps([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0]).encode()


def tiny_app(name: str, cache_path: str) -> dict:
    # single_flight off: these apps share one tuning key, and the cluster's coordinator would hand a
    # restarted replica (or the second app) the answer it already published, where these tests are
    # about what the cache file alone does (tests/test_cluster_single_flight.py covers the coordinator).
    return {"name": name, "route_prefix": f"/{name}", "import_path": "serve.app:build",
            "runtime_env": {"env_vars": TINY_ENV},
            "args": {"model": "tiny_mlp", "device": "cpu", "max_batch": 4, "repeats": 1, "num_cpus": 0.25,
                     "cache_path": cache_path, "single_flight": False}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ServeCluster(num_cpus=2)
    cache_dir = tmp_path_factory.mktemp("reliability-cache")
    c.cache_path = cache_dir / "tuning.json"
    c.deploy([
        {"name": "r50", "route_prefix": "/r50", "import_path": "serve.app:build",
         # max_ongoing_requests above the burst: the replica's admission decides, not Ray's router
         "args": {"model": "resnet50", "device": "cpu", "latency_budget_ms": 400, "max_batch": 2, "repeats": 1,
                  "num_cpus": 0.5, "max_ongoing_requests": 64, "cache_path": str(cache_dir / "r50.json"),
                  "user_config": {"batch_size": 2, "batch_wait_timeout_ms": 20}}},
        tiny_app("tiny", str(c.cache_path)),
        tiny_app("tiny_ro", "/proc/autobatch/tuning.json"),
        # serve_config.yaml's layout: a model without a route of its own, behind the OIP router at /
        {**tiny_app("tiny_behind", str(cache_dir / "behind.json")), "route_prefix": None},
        {"name": "oip", "route_prefix": "/", "import_path": "serve.oip.router:build_router",
         "args": {"models": ["tiny_behind"], "num_cpus": 0.1}},
    ])
    try:
        c.wait_running(["r50", "tiny", "tiny_ro", "tiny_behind", "oip"], timeout=400)
        yield c
    finally:
        c.shutdown()


# ---------------------------------------------------------------- overload
def test_overload_is_refused_at_once_with_retry_after_and_the_rest_served(cluster):
    before = cluster.tuning("/r50")
    n = 32
    started = time.perf_counter()
    responses = cluster.post_concurrently("/r50", [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(n)])
    statuses = [r.status_code for r in responses]
    print(f"\noverload: {n} at once on resnet50 (batch 2): {statuses.count(200)} x 200, {statuses.count(503)} x 503 "
          f"in {time.perf_counter() - started:.1f} s")
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:200]) for r in responses]
    shed = [r for r in responses if r.status_code == 503]
    assert shed and statuses.count(200) >= 2, statuses
    for r in shed:
        assert r.headers["content-type"] == "application/json"
        assert "retry later" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
    after = cluster.tuning("/r50")
    assert after["stats"]["shed"].get("overload", 0) - before["stats"]["shed"].get("overload", 0) == len(shed)
    assert after["stats"]["samples_served"] - before["stats"]["samples_served"] == statuses.count(200)
    admission = after["serving"]["admission"]
    assert admission["pending_samples"] == 0 and admission["bound_s"] > 0


def test_a_deadline_that_cannot_be_met_is_refused_before_it_takes_a_slot(cluster):
    jpeg = image_bytes("JPEG", seed=99)
    before = cluster.tuning("/r50")
    r = cluster.post("/r50", jpeg, headers={DEADLINE_HEADER: "1"})  # one batch alone takes longer
    assert r.status_code == 503 and DEADLINE_HEADER in r.json()["error"] and "retry-after" in r.headers
    assert cluster.post("/r50", jpeg, headers={DEADLINE_HEADER: "60000"}).status_code == 200
    bad = cluster.post("/r50", jpeg, headers={DEADLINE_HEADER: "soon"})
    assert bad.status_code == 400 and "milliseconds" in bad.json()["error"]
    after = cluster.tuning("/r50")
    assert after["stats"]["shed"].get("deadline", 0) - before["stats"]["shed"].get("deadline", 0) == 1
    assert after["stats"]["samples_served"] - before["stats"]["samples_served"] == 1


# ---------------------------------------------------------------- faults: replica kill, cache
class Load:
    """`clients` threads posting to the route until stopped: (sent_at, answered_at, status, body)."""

    def __init__(self, cluster, route: str, clients: int = 4):
        self.records: list[tuple[float, float, int | str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(cluster.base, route), daemon=True)
                         for _ in range(clients)]

    def _run(self, base: str, route: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    r = client.post(route, content=TINY_BODY, headers={"content-type": "application/json"})
                    record = (sent, time.perf_counter(), r.status_code, r.text[:160])
                except httpx.HTTPError as exc:
                    record = (sent, time.perf_counter(), type(exc).__name__, str(exc)[:160])
                self.records.append(record)
                time.sleep(0.01)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(70)


def kill_replica_and_wait(cluster, route: str, predicate) -> tuple[dict, dict, float]:
    """SIGKILL the route's replica process; wait for a replacement that satisfies predicate."""
    before = cluster.tuning(route)
    pid = before["replica"]["pid"]
    killed_at = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    after = cluster.wait_tuning(route, lambda t: t["replica"]["pid"] != pid and predicate(t), timeout=240)
    return before, after, killed_at


def test_a_killed_replica_is_replaced_from_the_cache_and_only_in_flight_requests_fail(cluster):
    clients = 4
    with Load(cluster, "/tiny", clients) as load:
        time.sleep(1.0)
        before, after, killed_at = kill_replica_and_wait(cluster, "/tiny", lambda t: True)
        ok_after = lambda: [r for r in load.records if r[0] > killed_at and r[2] == 200]  # noqa: E731
        deadline = time.time() + 60
        while len(ok_after()) < 5 and time.time() < deadline:
            time.sleep(0.1)
    records = load.records
    failed = [r for r in records if r[2] != 200]
    first_ok = min((r[1] for r in records if r[0] > killed_at and r[2] == 200), default=None)
    recovery_s = None if first_ok is None else first_ok - killed_at
    print(f"\nreplica kill under {clients} clients: {len(records)} requests, failed "
          f"{[(r[2], r[3][:100]) for r in failed]}, first 200 sent after the kill answered "
          f"{recovery_s if recovery_s is None else round(recovery_s, 2)} s after it; new replica cache {after['cache']}")
    assert after["cache"] == "hit"  # started from the cache, not re-tuned
    assert recovery_s is not None
    # only what the dead process held fails: at most one request per client, which was in flight
    assert len(failed) <= clients, failed
    assert all(r[0] < killed_at for r in failed), failed


def test_behind_the_router_a_killed_replica_fails_its_in_flight_requests_with_a_json_503(cluster):
    """serve_config.yaml's layout: the router holds the client's connection, so a request whose
    replica died is answered 503 + Retry-After + JSON (Ray's own proxy would answer a plain 500)."""
    clients = 4
    with Load(cluster, "/tiny_behind", clients) as load:
        time.sleep(1.0)
        _, after, killed_at = kill_replica_and_wait(cluster, "/tiny_behind", lambda t: True)
        deadline = time.time() + 60
        while len([r for r in load.records if r[0] > killed_at and r[2] == 200]) < 5 and time.time() < deadline:
            time.sleep(0.1)
    records = load.records
    failed = [r for r in records if r[2] != 200]
    first_ok = min((r[1] for r in records if r[0] > killed_at and r[2] == 200), default=None)
    print(f"\nreplica kill behind the router, {clients} clients: {len(records)} requests, failed "
          f"{[(r[2], r[3][:120]) for r in failed]}, first 200 sent after the kill answered "
          f"{None if first_ok is None else round(first_ok - killed_at, 2)} s after it; cache {after['cache']}")
    assert first_ok is not None and after["cache"] == "hit"
    for sent, _, status, body in failed:
        assert status == 503, (status, body)
        assert "stopped while answering" in json.loads(body)["error"], body
    assert len(failed) <= clients, failed  # what the dead process held, at most one per client


def test_a_binary_then_a_poisoned_cache_then_a_restart_re_tunes_and_serves(cluster):
    path = cluster.cache_path
    assert json.loads(path.read_text())["entries"]
    path.write_bytes(os.urandom(4096))
    _, after, _ = kill_replica_and_wait(cluster, "/tiny", lambda t: True)
    assert after["cache"] == "miss"  # re-tuned, not crash-looping
    assert list(path.parent.glob(path.name + ".corrupt-*"))
    assert cluster.post("/tiny", TINY_BODY, "application/json").status_code == 200

    cache = json.loads(path.read_text())  # rebuilt by the replacement: now poison its entry
    for entry in cache["entries"].values():
        entry["result"]["batch_size"] = 10**9
        entry["result"]["batch_wait_timeout_s"] = 1e9
    path.write_text(json.dumps(cache))
    _, after, _ = kill_replica_and_wait(cluster, "/tiny", lambda t: True)
    assert after["cache"] == "miss" and after["serving"]["max_batch_size"] <= 4
    assert after["serving"]["batch_wait_timeout_s"] < 1
    assert cluster.post("/tiny", TINY_BODY, "application/json").status_code == 200


def test_an_unwritable_cache_path_tunes_in_memory_and_serves(cluster):
    t = cluster.tuning("/tiny_ro")
    assert t["cache"] == "miss" and 1 <= t["serving"]["max_batch_size"] <= 4
    r = cluster.post("/tiny_ro", TINY_BODY, "application/json")
    assert r.status_code == 200, r.text


def test_the_routers_answer_for_a_lost_replica_says_when_to_retry():
    from ray.exceptions import ActorDiedError

    from serve.oip.router import REPLICA_LOST_RETRY_AFTER_S, ReplicaLost, _error

    response = _error(ReplicaLost("resnet50", ActorDiedError()))
    assert response.status_code == 503 and response.headers["retry-after"] == str(REPLICA_LOST_RETRY_AFTER_S)
    assert "resnet50 replica stopped" in json.loads(response.body)["error"]
