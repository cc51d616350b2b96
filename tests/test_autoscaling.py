"""Autoscaling that knows the batch (issue 21, item 1).

The pure parts: the target a tuned replica derives (served batch x device slots) and its admission
bound in samples, the autoscaling_config the builder deploys, and the policy Ray's controller runs,
given Ray's own AutoscalingContext. Then live, on a local Ray: a load step scales an app of the
stand-in device (benchmarks/stand_in_device.py: its batches sleep like an accelerator's, so two
cores carry the load) from 1 replica to 2 and back, every answer a 200 or a 503 with Retry-After,
and the second replica takes the first one's tuning from the cache instead of measuring again.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from serve.replica.autoscaling import (PENDING_SAMPLES_METRIC, POLICY_PATH, TARGET_SAMPLES_METRIC, BatchAwarePolicy,
                                       autoscaling_config, derive_targets, describe_config)

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parent.parent
ROUTE = "/standin"
APP = "standin"
MAX_BATCH = 8


# ----------------------------------------------------------------------------- pure: the numbers
def test_the_target_is_the_served_batch_times_the_device_slots_and_the_bound_is_admissions():
    t = derive_targets(batch_size=16, slots=2, bound_s=1.0, batch_time_s=0.2, wait_s=0.01)
    assert t.target_ongoing_samples == 32
    assert t.max_ongoing_requests_derived == 4 * 16  # floor((1.0 - 0.01) / 0.2) = 4 whole batches
    assert "16 x 2 device slot(s)" in t.reason and "4 batch(es)" in t.reason
    one_slot = derive_targets(batch_size=16, slots=1, bound_s=1.0, batch_time_s=0.2, wait_s=0.01)
    assert one_slot.target_ongoing_samples == 16
    # never a bound the target reaches: admission keeps at least one batch above it
    tight = derive_targets(batch_size=8, slots=2, bound_s=0.45, batch_time_s=0.2, wait_s=0.05)
    assert tight.max_ongoing_requests_derived == 3 * 8
    unknown = derive_targets(batch_size=8, slots=1, bound_s=0.0, batch_time_s=0.0, wait_s=0.0)
    assert unknown.max_ongoing_requests_derived == 16  # nothing timed: one batch computing, one filling


def test_the_deployed_config_names_the_policy_and_keeps_what_the_user_set():
    derived = autoscaling_config({"max_replicas": 4, "upscale_delay_s": 5}, max_replicas_default=2)
    assert derived["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"target_ongoing_requests": None}}
    assert derived["max_replicas"] == 4 and derived["min_replicas"] == 1 and derived["upscale_delay_s"] == 5
    assert "target_ongoing_requests" not in derived  # left to the tuning
    assert autoscaling_config(None, max_replicas_default=3)["max_replicas"] == 3  # the cards' worth
    user = autoscaling_config({"target_ongoing_requests": 12}, 2)
    assert user["target_ongoing_requests"] == 12 and user["policy"]["policy_kwargs"] == {"target_ongoing_requests": 12}
    with pytest.raises(ValueError, match="unknown autoscaling_config key"):
        autoscaling_config({"max_replica": 2}, 1)

    from ray.serve.config import AutoscalingConfig

    shown = describe_config(AutoscalingConfig(**derived))
    assert shown["target_from"] == "tuning" and shown["max_replicas"] == 4 and shown["policy"] == POLICY_PATH
    assert describe_config(AutoscalingConfig(**user))["target_from"] == "autoscaling_config"
    assert describe_config(None) is None


def test_the_builder_deploys_autoscaling_for_num_replicas_auto(monkeypatch):
    import serve.app as app_module

    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 2.0)
    d = app_module.build({"model": "resnet50", "num_replicas": "auto", "num_gpus": 0.25})._bound_deployment
    config = d._deployment_config.autoscaling_config
    assert config.max_replicas == 2 and config.min_replicas == 1  # one per card: fills the two cards' shares
    assert config.policy.policy_function == POLICY_PATH
    d = app_module.build({"model": "resnet50", "autoscaling_config": {"max_replicas": 3, "target_ongoing_requests": 6},
                          "replicas_per_gpu": 2})._bound_deployment
    config = d._deployment_config.autoscaling_config
    assert config.max_replicas == 3 and config.policy.policy_kwargs == {"target_ongoing_requests": 6}
    with pytest.raises(ValidationError, match="disagree"):
        app_module.build({"model": "resnet50", "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}})
    with pytest.raises(ValidationError, match="unknown autoscaling_config key"):
        app_module.build({"model": "resnet50", "autoscaling_config": {"target": 3}})


# ----------------------------------------------------------------------------- pure: the policy
def context(replicas: int, ongoing: float, queued: float, metrics: dict | None, target_now: int | None = None):
    """Ray's own AutoscalingContext, as its controller builds one per tick."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="m", app_name="m")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(replicas)]
    per_replica = {name: dict(zip(ids, values)) for name, values in (metrics or {}).items()}
    return AutoscalingContext(
        deployment_id=dep, deployment_name="m", app_name="m", current_num_replicas=replicas,
        target_num_replicas=target_now if target_now is not None else replicas, running_replicas=ids,
        total_num_requests=ongoing + queued, total_queued_requests=queued, aggregated_metrics=per_replica,
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=4))


def test_the_policy_scales_by_samples_held_against_the_tuned_target():
    policy = BatchAwarePolicy()
    # one replica holding 24 samples of single-sample requests, its target 8: three replicas' worth
    desired, state = policy(context(1, ongoing=24, queued=0, metrics={TARGET_SAMPLES_METRIC: [8], PENDING_SAMPLES_METRIC: [24]}))
    assert desired == pytest.approx(3) and "against 8 per replica" in state["autobatch_reason"]
    # requests of 32 samples (Open Inference Protocol): 2 held, 2 more queued at the proxy -> 4 x 32 samples
    desired, _ = policy(context(1, ongoing=2, queued=2, metrics={TARGET_SAMPLES_METRIC: [64], PENDING_SAMPLES_METRIC: [64]}))
    assert desired == pytest.approx(2.0)
    # idle: under one replica's worth (Ray's bounds keep min_replicas)
    desired, _ = policy(context(2, ongoing=0, queued=0, metrics={TARGET_SAMPLES_METRIC: [8, 8], PENDING_SAMPLES_METRIC: [0, 0]}))
    assert desired == 0
    # nothing tuned yet: hold what Ray has
    desired, state = policy(context(1, ongoing=50, queued=0, metrics={}, target_now=1))
    assert desired == 1 and "no tuned replica" in state["autobatch_reason"]
    # a user's target wins, in Ray's own terms (requests)
    desired, _ = BatchAwarePolicy(target_ongoing_requests=5)(context(1, ongoing=20, queued=0, metrics={TARGET_SAMPLES_METRIC: [8]}))
    assert desired == pytest.approx(4)


# ----------------------------------------------------------------------------- live: a load step
PUSH_INTERVALS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                  "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def standin_app(cache_path: str) -> dict:
    python_path = os.pathsep.join([str(REPO / "benchmarks"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {
        "name": APP, "route_prefix": ROUTE, "import_path": "serve.app:build",
        "runtime_env": {"env_vars": {"AUTOBATCH_MODELS": "stand_in_device=stand_in_device:StandInDeviceSpec",
                                     "PYTHONPATH": python_path, **PUSH_INTERVALS}},
        "args": {"model": "stand_in_device", "device": "cpu", "max_batch": MAX_BATCH, "latency_budget_ms": 400,
                 "repeats": 1, "warmup": 0, "warm_sizes_budget_s": 0, "num_cpus": 0.25, "cache_path": cache_path,
                 "options": {"fixed_ms": 100, "per_sample_ms": 5},
                 # Ray's delays are 30 s up and 600 s down; a test's step is seconds long
                 "num_replicas": "auto",
                 "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 3,
                                        "look_back_period_s": 1}},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from serve_helpers import ServeCluster

    saved = {k: os.environ.get(k) for k in PUSH_INTERVALS}
    os.environ.update(PUSH_INTERVALS)  # the controller and the proxy's handles take them from Ray's processes
    try:
        c = ServeCluster(num_cpus=2)
        try:
            c.deploy([standin_app(str(tmp_path_factory.mktemp("autoscale") / "tuning.json"))])
            c.wait_running([APP])
            yield c
        finally:
            c.shutdown()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


class LoadStep:
    """Closed-loop clients sending one sample each until stopped; every answer's status is kept."""

    def __init__(self, base: str, clients: int):
        self.base, self.clients = base, clients
        self.stop = threading.Event()
        self.answers: Counter = Counter()
        self.unexpected: list[str] = []
        self.shed: Counter = Counter()  # the 503s' messages, up to their first colon
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(ROUTE, content=b"1.5", headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.unexpected.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.answers[r.status_code] += 1
                    if r.status_code == 503 and "retry-after" in r.headers:
                        self.shed[r.text.split(":")[0][:80]] += 1
                    elif r.status_code != 200 or r.json().get("echo") != 1.5:
                        self.unexpected.append(f"{r.status_code}: {r.text[:200]}")
                if r.status_code == 503:
                    time.sleep(float(r.headers.get("retry-after", 1)))

    def __enter__(self) -> "LoadStep":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=90)


def tunings_by_pid(c, want: int, timeout_s: float) -> dict[int, dict]:
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        try:
            t = c.tuning(ROUTE)
            seen[t["replica"]["pid"]] = t
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(0.1)
    return seen


def test_a_load_step_scales_one_replica_to_two_and_back_without_a_second_tuning(cluster):
    first = cluster.tuning(ROUTE)
    assert running_replicas() == 1 and first["cache"] == "miss"
    auto = first["serving"]["autoscaling"]
    slots = first["serving"]["device_queue"]["slots"]
    assert auto["target_ongoing_samples"] == first["serving"]["max_batch_size"] * slots
    assert auto["config"]["target_from"] == "tuning" and auto["config"]["max_replicas"] == 2
    assert auto["max_ongoing_requests_derived"] >= auto["target_ongoing_samples"] + first["serving"]["max_batch_size"]

    # far more than one replica's target: 3 x its served batch in flight at all times
    with LoadStep(cluster.base, clients=3 * first["serving"]["max_batch_size"]) as load:
        wait_for(lambda: running_replicas() == 2, 90, "scaling up to 2 replicas")
        replicas = tunings_by_pid(cluster, want=2, timeout_s=60)
    assert load.unexpected == [], load.unexpected[:5]
    assert load.answers[200] > 0, load.answers
    assert set(load.answers) <= {200, 503}, load.answers

    assert len(replicas) == 2, f"{len(replicas)} replica(s) answered GET /tuning"
    newer = next(t for pid, t in replicas.items() if pid != first["replica"]["pid"])
    assert newer["cache"] == "hit" and newer["replica"]["tunings"] == 1  # took the cache, measured nothing
    assert (newer["tuned_at"], newer["batch_size"], newer["key"]) == (first["tuned_at"], first["batch_size"], first["key"])

    wait_for(lambda: running_replicas() == 1, 90, "scaling back down to 1 replica")
    after = cluster.post(ROUTE, b"2.5", "application/json")
    assert after.status_code == 200 and after.json()["echo"] == 2.5
    print(json.dumps({"answers": dict(load.answers), "shed": dict(load.shed), "target": auto}))


def test_the_continuous_schedulers_target_is_its_sequences_and_its_bound_its_kv_admission():
    from serve.replica.autoscaling import continuous_targets

    t = continuous_targets(max_sequences=22, kv_queue_factor=1.0)
    assert (t.target_ongoing_samples, t.max_ongoing_requests_derived) == (22, 44)
    assert "22 ongoing requests" in t.reason
    # no queue: the bound is still above the target, as derive_targets keeps it
    assert continuous_targets(max_sequences=4, kv_queue_factor=0.0).max_ongoing_requests_derived == 5
