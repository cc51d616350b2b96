"""Real traffic, live (issue 23): serve_config.yaml's layout (the `oip` router in front of a model
app) under `make serve`'s ingress, Ray Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY, where the
router calls its model replica over gRPC, whose 4 MiB messages refused every larger body), with
ResNet-50 at a small max_batch on the CPU. One cluster for the module.

A 6 MB photo is answered on the simple route and over v2 (HTTP and gRPC); a body over
max_body_bytes is a JSON 413 naming the limit, by Content-Length and when chunked; 10,000 tiny
samples in one v2 request are a 413 naming the bound, and the replica's RSS stays within its
budget; nested JSON is a 400; and the same replica processes answer afterwards."""
from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from serve_helpers import ServeCluster, image_bytes

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parent.parent
MAX_BODY_BYTES = 8 * 2**20  # the router's limit here (default 64 MiB): a 6 MB photo fits, 9 MiB does not
MAX_JSON_BYTES = 2**20
MAX_BATCH = 2


def ingress_env() -> dict:
    """`make serve`'s ingress settings (serve/local.py): HAProxy where its binary runs here, else the
    same throughput-optimized mode without it (direct ingress, gRPC between replicas: the same hop)."""
    from serve.local import haproxy_binary
    from serve.local import ingress_env as local_ingress_env

    path, _ = haproxy_binary()
    env = local_ingress_env("haproxy") if path else {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    # Direct ingress puts each ingress replica on a port of a fixed range (Ray's 30000.. and 40000..),
    # and gRPC servers bind with SO_REUSEPORT: a second cluster on this host (another test run)
    # would share the router's port and answer half its calls. A range of this cluster's own:
    rng = random.Random(os.getpid() ^ int(time.time()))
    for kind, base in (("HTTP", rng.randrange(42000, 50000)), ("GRPC", rng.randrange(51000, 59000))):
        env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"] = str(base)
        env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"] = str(base + 200)
    env["RAY_ADDRESS"] = "local"  # a cluster of its own, even where a `make serve` head left its address file
    # A direct-ingress replica that stops stays open this long first (30 s in Ray 2.60) for a load
    # balancer to deregister it, even when idle: the module's teardown took ~30 s of it. No test here
    # stops a replica (the last checks that none did), so the teardown's stop waits 2 s instead.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    return env


def apps(cache_path: str) -> list[dict]:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    by_name = {app["name"]: app for app in copy.deepcopy(config["applications"])}
    router, model = by_name["oip"], by_name["resnet50"]
    router["args"].update(models=["resnet50"], max_body_bytes=MAX_BODY_BYTES, max_json_bytes=MAX_JSON_BYTES)
    model["args"].update(cache_path=cache_path, max_batch=MAX_BATCH, repeats=1, device="cpu", warm_sizes_budget_s=0)
    return [router, model]


def actor_pids() -> dict[str, int]:
    """Serve replica actor class -> pid, alive ones, from the GCS (no dashboard needed)."""
    import ray

    return {info["ActorClassName"]: info["Pid"] for info in ray._private.state.actors().values()
            if info["State"] == "ALIVE" and info["ActorClassName"].startswith("ServeReplica:")}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    env = ingress_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the raylet ray.init starts, so by every Serve process
    try:
        c = ServeCluster(num_cpus=2, grpc=True)
        deployed = apps(str(tmp_path_factory.mktemp("real-traffic") / "tuning.json"))
        c.deploy(deployed)
        c.wait_running([a["name"] for a in deployed], timeout=420)
        # Behind HAProxy, Ray's fallback proxy takes what HAProxy cannot hand the router directly
        # (busy, not yet registered) and forwards it over gRPC: its ports are fixed here, so the
        # tests send to it too, not only when HAProxy happens to use it.
        c.fallback_ports = ((int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]), int(env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"]))
                            if "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" in env else None)
        c.pids_at_start = actor_pids()
        c.tuning_at_start = c.tuning("/resnet50")
        yield c
        c.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def photo_6mb() -> bytes:
    """A valid JPEG of 6 MB: noisy pixels compress like a detailed photo, at quality 95."""
    pixels = np.random.default_rng(23).integers(0, 256, (2000, 2600, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    assert buf.tell() >= 6_000_000, buf.tell()
    return buf.getvalue()


def replica_rss_bytes(live) -> tuple[int, int]:
    """(the model replica's RSS now, its memory budget), from GET /resnet50/tuning's pid."""
    t = live.tuning("/resnet50")
    return psutil.Process(t["replica"]["pid"]).memory_info().rss, int(t["memory_budget_bytes"])


def v2_images(images: list[bytes], module):
    tensor = module.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def binary_v2_body(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict]:
    doc = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                  "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return doc + raw, {"inference-header-content-length": str(len(doc)), "content-type": "application/octet-stream"}


# ---------------------------------------------------------------- a real photo
def test_a_6mb_photo_is_answered_on_the_simple_route_and_over_v2(live):
    photo = photo_6mb()
    rss_before, budget = replica_rss_bytes(live)
    simple = live.post("/resnet50", photo)
    assert simple.status_code == 200, simple.text
    want = [c["class_id"] for c in simple.json()["top_k"]]
    ingresses = [(live.http_port, live.grpc_port)] + ([live.fallback_ports] if live.fallback_ports else [])
    for http_port, grpc_port in ingresses:
        r = httpx.post(f"http://127.0.0.1:{http_port}/resnet50", content=photo, headers={"content-type": "image/jpeg"},
                       timeout=120)
        assert r.status_code == 200 and [c["class_id"] for c in r.json()["top_k"]] == want, (http_port, r.text)
        http = tritonclient_http.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=300,
                                                       connection_timeout=300)
        grpc = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            for client, module in ((http, tritonclient_http), (grpc, tritonclient_grpc)):
                result = client.infer("resnet50", [v2_images([photo], module)])
                assert result.as_numpy("class_ids")[0].tolist() == want, (module.__name__, http_port, grpc_port)
        finally:
            http.close()
            grpc.close()
    time.sleep(1.0)  # the heap trim runs in a thread of its own once a request is answered
    rss_warm, _ = replica_rss_bytes(live)
    for _ in range(3):  # more of them: the replica's memory must come back, not pile up
        assert live.post("/resnet50", photo).status_code == 200
    time.sleep(1.0)
    rss_after, _ = replica_rss_bytes(live)
    assert rss_after <= budget, (rss_after, budget)
    # Three more 6 MB bodies and their 2600x2000 decodes (3 x 15.6 MB of RGB each) passed through
    # a replica that had served the size before: what stays is less than one of them.
    assert rss_after - rss_warm < 48 * 2**20, (rss_before, rss_warm, rss_after)


# ---------------------------------------------------------------- bodies over the limit
@pytest.mark.parametrize("path", ["/resnet50", "/v2/models/resnet50/infer"])
def test_a_body_over_the_limit_is_a_json_413_naming_it(live, path):
    body = b"\0" * (MAX_BODY_BYTES + 2**20)
    by_length = live.http.post(path, content=body, headers={"content-type": "application/octet-stream"})
    assert by_length.status_code == 413 and str(MAX_BODY_BYTES) in by_length.json()["error"], by_length.text

    def chunks():  # no Content-Length: the router counts the bytes as they stream in
        for start in range(0, len(body), 2**20):
            yield body[start:start + 2**20]

    chunked = live.http.post(path, content=chunks(), headers={"content-type": "application/octet-stream"})
    assert chunked.status_code == 413 and str(MAX_BODY_BYTES) in chunked.json()["error"], chunked.text


# ---------------------------------------------------------------- what a request costs
def test_10000_tiny_samples_in_one_request_are_a_413_with_the_bound(live):
    bound = live.tuning("/resnet50")["serving"]["admission"]["max_request_samples"]
    assert bound is not None and MAX_BATCH <= bound <= 8 * MAX_BATCH
    pixels = np.full((10_000, 2, 2, 3), 7, dtype=np.uint8)
    body, headers = binary_v2_body("pixels", "UINT8", list(pixels.shape), pixels.tobytes())
    r = live.http.post("/v2/models/resnet50/infer", content=body, headers=headers)
    assert r.status_code == 413 and str(bound) in r.json()["error"] and "10000" in r.json()["error"], r.text
    tiny = image_bytes("JPEG", size=(8, 8))
    from wire.tensors import serialize_bytes

    body, headers = binary_v2_body("images", "BYTES", [10_000], serialize_bytes([tiny] * 10_000))
    r = live.http.post("/v2/models/resnet50/infer", content=body, headers=headers)
    assert r.status_code == 413 and str(bound) in r.json()["error"], r.text
    rss, budget = replica_rss_bytes(live)
    assert rss <= budget, (rss, budget)


def test_the_replica_refuses_too_many_samples_itself(live):
    """Behind the router's check, the replica's own (a router with stale metadata, another caller)."""
    from ray.serve.handle import DeploymentHandle

    from wire.request import InferFailure, InferRequest
    from wire.tensors import Tensor

    pixels = np.zeros((10_000, 2, 2, 3), dtype=np.uint8)
    request = InferRequest("resnet50", [Tensor("pixels", "UINT8", pixels.shape, pixels)])

    async def call():
        # a handle of its own, shut down in this loop (in the throughput-optimized mode a handle's
        # router runs on the loop that made it; serve.shutdown would find that loop closed)
        handle = DeploymentHandle("resnet50", "resnet50")
        try:
            return await handle.oip_infer.remote(request)
        finally:
            await handle.shutdown_async()

    answer = asyncio.run(call())
    assert isinstance(answer, InferFailure) and answer.status == 413, answer
    rss, budget = replica_rss_bytes(live)
    assert rss <= budget, (rss, budget)


def test_nested_and_oversized_json_are_400s_naming_the_limit(live):
    r = live.http.post("/v2/models/resnet50/infer", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "32" in r.json()["error"] and "nests" in r.json()["error"], r.text
    big = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [' + b"1," * MAX_JSON_BYTES + b"1]}]}"
    r = live.http.post("/v2/models/resnet50/infer", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 400 and str(MAX_JSON_BYTES) in r.json()["error"], r.text


# ---------------------------------------------------------------- nobody was hurt
def test_the_same_replicas_answer_afterwards(live):
    r = live.post("/resnet50", image_bytes("JPEG"))
    assert r.status_code == 200, r.text
    assert live.tuning("/resnet50")["replica"]["pid"] == live.tuning_at_start["replica"]["pid"]
    assert actor_pids() == live.pids_at_start
    stats = live.tuning("/resnet50")["stats"]
    assert stats["serving_ooms"] == 0, stats
