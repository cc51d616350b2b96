"""The Ray Serve integration, for real: a local Ray with 2 CPUs, ResNet-50 replicas tuned at
start-up on this CPU, HTTP over 127.0.0.1. Tunings are kept small (max_batch 4, one timed run per
probe) so the module runs in about two minutes on 2 cores."""
from __future__ import annotations

import json
import os
import time

import pytest
from serve_helpers import ServeCluster, image_bytes, stats_delta, warmed_up

pytestmark = pytest.mark.timeout(600)

ROUTE = "/r50"
MAX_BATCH = 4


def r50_app(name: str, route: str, cache_path: str, user_config: dict | None = None) -> dict:
    app = {
        "name": name,
        "route_prefix": route,
        "import_path": "serve.app:build",
        "args": {
            "model": "resnet50", "device": "auto", "latency_budget_ms": 400, "max_batch": MAX_BATCH,
            "repeats": 1, "cache_path": cache_path, "num_cpus": 0.25,
            "options": {"max_image_bytes": 300_000},
            # These apps share one tuning key: without this, the cluster's single-flight coordinator
            # would hand a later app the answer it published, where these tests are about the cache file.
            "single_flight": False,
            # POST <route>/profile on (serve/api/profiling.py), its traces beside the cache
            "profile_dir": os.path.join(os.path.dirname(cache_path), "traces"),
        },
    }
    if user_config is not None:
        app["deployments"] = [{"name": "resnet50", "user_config": user_config}]
    return app


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ServeCluster(num_cpus=2)
    c.cache_path = str(tmp_path_factory.mktemp("serve-cache") / "tuning.json")
    c.deploy([r50_app("r50", ROUTE, c.cache_path)])
    c.wait_running(["r50"])
    c.first_tuning = c.wait_tuning(ROUTE, warmed_up)
    yield c
    c.shutdown()


def reconfigure(cluster, user_config: dict, predicate, timeout: float = 120) -> dict:
    """Apply a user_config to the running r50 app (a live reconfigure) and wait until it shows."""
    cluster.deploy([r50_app("r50", ROUTE, cluster.cache_path, user_config)])
    return cluster.wait_tuning(ROUTE, predicate, timeout)


def pinned(size, wait_ms=250, **extra):
    return {"batch_size": size, "batch_wait_timeout_ms": wait_ms, **extra}


def test_startup_tunes_and_reports_the_tuning(cluster):
    t = cluster.first_tuning
    assert t["cache"] == "miss" and t["from_cache"] is False
    assert t["model"] == "resnet50" and t["device"]["kind"] == "cpu"
    assert t["replica"]["tunings"] == 1 and t["probe_count"] >= 1 and t["replica"]["tuning_wall_s"] > 0.1
    assert t["probes"][0]["batch_size"] == 1 and t["probes"][0]["latency_s"] > 0  # the search really ran here
    assert 1 <= t["batch_size"] <= t["max_safe_batch"] <= MAX_BATCH
    assert 0 <= t["batch_wait_timeout_s"] <= 0.4  # 0 when batching gains no throughput (a flat CPU curve)
    # what @serve.batch was given, and room for the batch to fill
    assert t["serving"]["max_batch_size"] == t["batch_size"]
    assert t["serving"]["batch_wait_timeout_s"] == pytest.approx(t["batch_wait_timeout_s"])
    assert t["serving"]["max_ongoing_requests"] == 2 * MAX_BATCH
    # every size @serve.batch may form has run once: the tuning's probes, the max batch and 1 before
    # traffic, the rest between served batches
    warm = t["warm_sizes"]
    probed = {p["batch_size"] for p in t["probes"] if p["outcome"] == "ok"}
    assert set(warm["already_warm"]) == probed & set(range(1, t["batch_size"] + 1))
    assert set(warm["warmed"]) == set(range(1, t["batch_size"] + 1)) - probed
    assert warm["left_cold"] == [] and all(s > 0 for s in warm["first_run_s"].values())


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_answers_real_images(cluster, fmt, content_type):
    r = cluster.post(ROUTE, image_bytes(fmt, seed=3), content_type)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "resnet50" and len(body["top_k"]) == 5
    assert all(0 <= item["class_id"] < 1000 for item in body["top_k"])


def test_bad_payloads_get_4xx_and_leave_the_replica_healthy(cluster):
    pid = cluster.tuning(ROUTE)["replica"]["pid"]
    jpeg = image_bytes("JPEG")
    cases = [
        (b"", "image/jpeg", 400),
        (b"this is not an image", "text/plain", 415),
        (json.dumps({"prompt": "hi"}).encode(), "application/json", 415),
        (image_bytes("GIF"), "image/gif", 415),
        (jpeg[: len(jpeg) // 2], "image/jpeg", 422),
        (image_bytes("PNG", size=(400, 400), noise=True), "image/png", 413),  # over max_image_bytes
    ]
    for body, content_type, status in cases:
        r = cluster.post(ROUTE, body, content_type)
        assert r.status_code == status, (status, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    r = cluster.http.put(ROUTE, content=jpeg)
    assert r.status_code == 405 and "error" in r.json()
    r = cluster.http.get(f"{ROUTE}/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # still the same replica, still answering
    assert cluster.post(ROUTE, jpeg).status_code == 200
    t = cluster.tuning(ROUTE)
    assert t["replica"]["pid"] == pid
    assert {"400", "413", "415", "422"} <= set(t["stats"]["errors"])


def test_concurrent_requests_form_batches(cluster):
    t = reconfigure(cluster, pinned(MAX_BATCH), lambda t: t["serving"]["pinned_batch_size"] == MAX_BATCH)
    before = cluster.tuning(ROUTE)
    n = 3 * MAX_BATCH
    responses = cluster.post_concurrently(ROUTE, [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(n)], retries_on_503=3)
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200]
    delta = stats_delta(before, cluster.tuning(ROUTE))
    assert delta["samples_served"] == n
    assert max(delta["batch_sizes"]) > 1, delta  # the replica's own record of the batches formed
    assert max(delta["batch_sizes"]) <= MAX_BATCH
    assert t["replica"]["pid"] == before["replica"]["pid"]


def test_a_profile_capture_of_serving_and_of_the_probe_writes_a_trace_and_summarises_it(cluster):
    """POST <route>/profile: the next second of serving, captured while requests are served, then the
    tuner's own measurement of the served batch; each a gzipped Chrome trace and a summary."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        n = MAX_BATCH + 2  # within Ray's proxy queue (max_queued_requests), which would refuse the profile itself
        load = pool.submit(cluster.post_concurrently, ROUTE,
                           [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(n)], retries_on_503=3)
        time.sleep(0.2)
        serving = cluster.http.post(ROUTE + "/profile", json={"seconds": 1.5, "what": "serving"})
        assert [r.status_code for r in load.result()] == [200] * n
    assert serving.status_code == 200, serving.text
    s = serving.json()
    assert s["what"] == "serving" and os.path.exists(s["trace"]) and s["trace"].endswith(".json.gz")
    assert s["summary"]["gpu"] is None  # this CPU
    assert s["summary"]["window_s"] >= 1.5 and s["summary"]["gil_wait_1ms_ticker"]["ticks"] > 0
    probe = cluster.http.post(ROUTE + "/profile", json={"seconds": 1, "what": "probe", "batch_size": 2})
    assert probe.status_code == 200, probe.text
    p = probe.json()
    assert p["batch_size"] == 2 and p["per_batch"]["batches"] >= 1 and p["per_batch"]["mean_batch"] == 2
    assert any(op.startswith("aten::") for op in p["summary"]["top_cpu_ops_ms"])  # the forward thread's operators
    bad = cluster.http.post(ROUTE + "/profile", json={"what": "train"})
    assert bad.status_code == 400 and '"what" is' in bad.json()["error"]
    assert cluster.http.post(ROUTE, content=image_bytes("JPEG"), headers={"content-type": "image/jpeg"}).status_code == 200


def test_batches_ray_closes_while_the_model_computes_run_as_one_device_batch(cluster):
    """With a 1 ms wait, a clock would close batches far faster than the model computes one; the
    batcher merges the requests that wait meanwhile (serve/replica/batcher.py), never past the max."""
    from concurrent.futures import ThreadPoolExecutor

    reconfigure(cluster, pinned(MAX_BATCH, 1), lambda t: t["serving"]["batch_wait_timeout_s"] == 0.001)
    before = cluster.tuning(ROUTE)
    n = 4 * MAX_BATCH

    def staggered(i):  # 10 ms apart, so each is a clock batch of its own (1 ms wait) while a batch computes
        time.sleep(0.010 * i)
        return cluster.post_concurrently(ROUTE, [(image_bytes("JPEG", seed=i), "image/jpeg", {})], retries_on_503=3)[0]

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(staggered, range(n)))
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200]
    after = cluster.tuning(ROUTE)
    delta = stats_delta(before, after)
    queue_before, queue_after = before["serving"]["device_queue"], after["serving"]["device_queue"]
    assert queue_after["coalesced_batches"] > queue_before["coalesced_batches"], (queue_before, queue_after)
    assert queue_after["device_batches"] - queue_before["device_batches"] == sum(delta["batch_sizes"].values())
    assert 1 < max(delta["batch_sizes"]) <= MAX_BATCH, delta
    assert queue_after["waiting_samples"] == 0 and queue_after["batches_in_flight"] == 0


def test_a_poisoned_item_in_a_concurrent_batch_fails_alone(cluster):
    reconfigure(cluster, pinned(MAX_BATCH, faults={"poison_header": "x-poison"}),
                lambda t: t["serving"]["faults"] == {"poison_header": "x-poison"})
    before = cluster.tuning(ROUTE)
    requests = [(image_bytes("JPEG", seed=i), "image/jpeg", {"x-poison": "1"} if i == 1 else {}) for i in range(MAX_BATCH)]
    responses = cluster.post_concurrently(ROUTE, requests, retries_on_503=3)
    statuses = [r.status_code for r in responses]
    assert statuses[1] == 422 and "poisoned" in responses[1].json()["error"], responses[1].text
    assert statuses[:1] + statuses[2:] == [200] * (MAX_BATCH - 1), [r.text for r in responses]
    delta = stats_delta(before, cluster.tuning(ROUTE))
    assert delta["batch_item_retries"] >= 1 and max(delta["batch_sizes"]) > 1, delta
    assert delta["samples_served"] == MAX_BATCH - 1


def test_an_oom_while_serving_splits_the_batch_and_every_request_answers(cluster):
    reconfigure(cluster, pinned(MAX_BATCH, faults={"oom_above": 1}),
                lambda t: t["serving"]["faults"] == {"oom_above": 1} and t["serving"]["max_batch_size"] == MAX_BATCH)
    before = cluster.tuning(ROUTE)
    responses = cluster.post_concurrently(ROUTE, [(image_bytes("PNG", seed=i), "image/png", {}) for i in range(MAX_BATCH)], retries_on_503=3)
    assert [r.status_code for r in responses] == [200] * MAX_BATCH, [r.text for r in responses]
    after = cluster.tuning(ROUTE)
    delta = stats_delta(before, after)
    assert max(delta["batch_sizes"]) > 1 and delta["serving_ooms"] >= 1, delta
    assert delta["samples_served"] == MAX_BATCH
    # the replica learnt: its max batch is lowered below the batch that ran out of memory
    assert after["serving"]["oom_cap"] is not None and after["serving"]["max_batch_size"] < max(delta["batch_sizes"])
    assert after["replica"]["pid"] == before["replica"]["pid"]


def test_reconfigure_changes_the_batch_size_live(cluster):
    pid = cluster.tuning(ROUTE)["replica"]["pid"]
    t = reconfigure(cluster, pinned(3), lambda t: t["serving"]["max_batch_size"] == 3 and warmed_up(t))
    assert t["replica"]["pid"] == pid and t["serving"]["pinned_batch_size"] == 3
    assert 3 in set(t["warm_sizes"]["warmed"]) | set(t["warm_sizes"]["already_warm"])  # a raised pin warms its new sizes
    responses = cluster.post_concurrently(ROUTE, [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(6)], retries_on_503=3)
    assert [r.status_code for r in responses] == [200] * 6
    t = reconfigure(cluster, pinned(2), lambda t: t["serving"]["max_batch_size"] == 2)
    before = t
    responses = cluster.post_concurrently(ROUTE, [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(6)], retries_on_503=3)
    assert [r.status_code for r in responses] == [200] * 6
    delta = stats_delta(before, cluster.tuning(ROUTE))
    assert max(delta["batch_sizes"]) == 2, delta
    # unpinned: back to the tuned size, still the same replica; unless this replica's served batches
    # ran slower than its tuning (a busy 2-core host), and the batch was re-decided from their times
    # (optimizer/served.py), which it then says, and which is never above the tuned size
    t = reconfigure(cluster, {}, lambda t: t["serving"]["pinned_batch_size"] is None)
    assert t["replica"]["pid"] == pid
    re_decided = [n for n in t["serving"]["notes"] if n.startswith("batch re-decided from served batches")]
    assert t["serving"]["max_batch_size"] == t["batch_size"] or (re_decided and t["serving"]["max_batch_size"] < t["batch_size"]), t["serving"]


def test_reconfigure_retunes_live_from_the_cache_or_by_measuring(cluster):
    start = cluster.tuning(ROUTE)
    pid, tunings = start["replica"]["pid"], start["replica"]["tunings"]
    # a new latency budget is a new cache key: measured
    t = reconfigure(cluster, {"latency_budget_ms": 250}, lambda t: t["latency_budget_s"] == 0.25)
    assert t["cache"] == "miss" and t["replica"]["tunings"] == tunings + 1 and t["replica"]["pid"] == pid
    assert t["serve_latency_s"] <= 0.25
    # back to the start-up budget: the cache answers, nothing is measured
    t = reconfigure(cluster, {}, lambda t: t["latency_budget_s"] == 0.4)
    assert t["cache"] == "hit" and t["key"] == start["key"] and t["replica"]["tunings"] == tunings + 2
    # {"retune": true}: measured again although the cache has it
    t = reconfigure(cluster, {"retune": True}, lambda t: t["replica"]["tunings"] == tunings + 3)
    assert t["cache"] == "miss" and t["key"] == start["key"] and t["tuned_at"] >= start["tuned_at"]
    assert t["replica"]["pid"] == pid
    assert cluster.post(ROUTE, image_bytes("JPEG")).status_code == 200


def test_served_batches_are_compared_with_the_tuning_and_can_move_the_wait(cluster):
    start = cluster.tuning(ROUTE)
    for i in range(22):  # batches of one, each served for real
        assert cluster.post(ROUTE, image_bytes("JPEG", seed=i)).status_code == 200
    t = cluster.tuning(ROUTE)
    ratio = t["serving"]["served_vs_tuned_latency"]
    assert ratio is not None and 0.05 < ratio < 20, t["serving"]  # same CPU, same model: the same order of time
    assert t["stats"]["batches"] - start["stats"]["batches"] >= 20
    assert t["serving"]["tuned_batch_wait_timeout_s"] == pytest.approx(t["batch_wait_timeout_s"])
    rederived = [n for n in t["serving"]["notes"] if n.startswith("wait re-derived from served batches")]
    if rederived:  # moved by more than 20%: the tuning's rule with its times scaled by the ratio at the last check
        assert t["serving"]["batch_wait_timeout_s"] != pytest.approx(t["batch_wait_timeout_s"], rel=0.2)
    else:
        assert t["serving"]["batch_wait_timeout_s"] == pytest.approx(t["batch_wait_timeout_s"])
    if t["serving"]["max_batch_size"] > 1 and t["batch_wait_timeout_s"] > 0.0015:
        # one request at a time (the replica was just re-tuned by the test before): each batch's window
        # caught no one, so the arrivals cut the wait to the 1 ms floor (optimizer/wait.py)
        assert t["serving"]["batch_wait_timeout_s"] <= 0.001 + 1e-9, t["serving"]
        assert any("arrived within 0.0 ms" in n for n in rederived), t["serving"]["notes"]


def test_metrics_are_exported_with_model_and_device_tags(cluster):
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from serve.replica.metrics import METRICS

    # every metric but the LLM scheduler's, which only an LLM replica exports (tests/test_llm_openai_live.py)
    wanted = {m.exported_name for m in METRICS if not m.name.startswith("autobatch_llm_")}
    deadline, found = time.time() + 60, {}
    while time.time() < deadline:
        found = {}
        for family in text_string_to_metric_families(cluster.metrics_text()):
            for sample in family.samples:
                base = sample.name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                if base in wanted and sample.labels.get("model") == "resnet50":
                    found.setdefault(base, []).append(sample)
        if set(found) == wanted:
            break
        time.sleep(1)
    assert set(found) == wanted, f"not exported: {sorted(wanted - set(found))}"
    for samples in found.values():
        assert all(s.labels["device"].startswith("cpu:") and s.labels["application"] for s in samples)
    served = sum(s.value for s in found["ray_autobatch_samples_served_total"])
    assert served >= 10
    # the batcher's own batch metrics are there too, in the places of @serve.batch's (the dashboard uses them)
    names = {f.name for f in text_string_to_metric_families(cluster.metrics_text())}
    assert {"ray_autobatch_device_batch_size", "ray_autobatch_batch_wait_seconds"} <= names


def test_a_second_start_is_a_cache_hit_and_skips_tuning(cluster):
    entries_before = json.load(open(cluster.cache_path))["entries"]
    cluster.deploy([r50_app("r50", ROUTE, cluster.cache_path), r50_app("r50-again", "/r50-again", cluster.cache_path)])
    cluster.wait_running(["r50", "r50-again"])
    t = cluster.wait_tuning("/r50-again", warmed_up)
    assert t["cache"] == "hit" and t["from_cache"] is True and t["key"] == cluster.first_tuning["key"]
    assert t["replica"]["pid"] != cluster.tuning(ROUTE)["replica"]["pid"]
    assert t["tuned_at"] == entries_before[t["key"]]["result"]["tuned_at"]  # nothing re-measured or re-saved
    # nothing ran in this process before traffic, so it warmed every size it may serve itself
    assert t["warm_sizes"]["already_warm"] == [] and sorted(t["warm_sizes"]["warmed"]) == list(range(1, t["batch_size"] + 1))
    assert json.load(open(cluster.cache_path))["entries"] == entries_before
    assert cluster.post("/r50-again", image_bytes("JPEG")).status_code == 200


def test_another_device_fingerprint_in_the_cache_means_a_new_tuning(cluster, tmp_path):
    """A cache that holds this model's tuning for another device (another CPU/GPU model) is a miss."""
    from dataclasses import replace

    from optimizer.cache import TuningCache
    from optimizer.tuning import Tuning

    source = json.load(open(cluster.cache_path))["entries"][cluster.first_tuning["key"]]
    foreign_path = str(tmp_path / "foreign.json")
    foreign = TuningCache(foreign_path)
    key_fields = json.loads(json.dumps(source["key_fields"]))
    key_fields["device"]["name"] = "Some Other Device 9000"
    foreign_key = foreign.put(key_fields, replace(Tuning.from_dict(source["result"]), batch_size=1, max_safe_batch=1))
    assert foreign_key != cluster.first_tuning["key"]

    cluster.deploy([r50_app("r50-other", "/r50-other", foreign_path)])
    cluster.wait_running(["r50-other"])
    t = cluster.tuning("/r50-other")
    assert t["cache"] == "miss" and t["key"] == cluster.first_tuning["key"]
    assert t["replica"]["tuning_wall_s"] > 0.1 and t["probe_count"] >= 1
    assert t["tuned_at"] != source["result"]["tuned_at"]  # measured now, not copied from the other device's entry
    assert t["probes"][0]["latency_s"] > 0
    entries = json.load(open(foreign_path))["entries"]
    assert set(entries) == {foreign_key, t["key"]}  # the other device's entry is kept, ours added
    assert cluster.post("/r50-other", image_bytes("JPEG")).status_code == 200


