"""serve_config.yaml and the app builder: the file's shape, the builder's arguments and placement,
and the file's four applications started for real (as `serve run serve_config.yaml` starts them)
and answering real images and a prompt over HTTP."""
from __future__ import annotations

import copy
import os
import json
import time
from pathlib import Path

import pytest
import yaml
from serve_helpers import ServeCluster, image_bytes, warmed_up

from deployments.registry import BUILTIN_MODELS, spec_class

CONFIG_PATH = Path(__file__).resolve().parent.parent / "serve_config.yaml"
ROUTES = {name: f"/{name}" for name in BUILTIN_MODELS}  # the file serves every family that ships, through the router


def load_config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


# ---------------------------------------------------------------- the file, without Ray
def test_config_file_has_an_application_per_built_in_model_and_starts_on_two_cores():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    from serve.oip.router import build_router

    config = load_config()
    ServeDeploySchema.model_validate(config)  # what `serve run` does first
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": [ServeCluster.OIP_SERVICER]}
    apps = {app["name"]: app for app in config["applications"]}
    # one routed application, the OIP router: Ray's gRPC proxy reaches it without metadata only then
    assert {name: app["route_prefix"] for name, app in apps.items()} == {"oip": "/", **{m: None for m in ROUTES}}
    router = apps.pop("oip")
    assert router["import_path"] == "serve.oip.router:build_router" and router["args"]["models"] == list(ROUTES)
    router_deployment = build_router(router["args"])._bound_deployment
    total_cpus = router_deployment.ray_actor_options["num_cpus"]
    for name, app in apps.items():
        assert app["import_path"] == "serve.app:build"
        args = AppArgs.model_validate(app["args"])  # every model is registered, every key known
        assert args.model == name and args.device == "auto"
        assert 0 < args.num_cpus < 1 and 0 < args.num_gpus <= 1
        total_cpus += args.num_cpus
    assert total_cpus <= 1.5  # leaves room on a 2-core machine for Serve's own actors


# ---------------------------------------------------------------- the builder, without Ray
def test_builder_rejects_unknown_arguments_and_models_with_a_useful_message():
    from pydantic import ValidationError

    from serve.app import build

    with pytest.raises(ValidationError, match="max_batch_size"):
        build({"model": "resnet50", "max_batch_size": 8})
    with pytest.raises(ValidationError, match="choose one of: .*resnet50"):
        build({"model": "resnet5"})
    with pytest.raises(ValidationError, match="unknown user_config key"):
        build({"model": "resnet50", "user_config": {"batchsize": 8}})
    with pytest.raises(ValidationError, match="memory_fraction"):
        build({"model": "resnet50", "memory_fraction": 1.5})


def test_the_builder_hands_each_replica_one_settings_object_of_its_own_arguments(monkeypatch):
    """AppArgs is ReplicaSettings plus placement: every replica setting is a builder argument of the
    same name, and the deployment is bound with those values (the cache path expanded, the
    max_ongoing_requests default filled in) and the GPU share it was placed on."""
    import serve.app as app_module
    from serve.replica.settings import ReplicaSettings

    assert issubclass(app_module.AppArgs, ReplicaSettings)
    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 4.0)
    app = app_module.build({"model": "resnet50", "num_gpus": 0.25, "max_batch": 64, "cache_path": "~/t.json",
                            "warmup": 2, "options": {"overlap": False}})
    (settings,), kwargs = app._bound_deployment.init_args, app._bound_deployment.init_kwargs
    assert isinstance(settings, ReplicaSettings) and kwargs == {"gpu_share": 0.25}
    assert (settings.max_batch, settings.warmup, settings.options) == (64, 2, {"overlap": False})
    assert settings.max_ongoing_requests == 128 and settings.cache_path == os.path.expanduser("~/t.json")


def _deployment_of(app):
    return app._bound_deployment


def test_builder_places_replicas_on_a_gpu_share_when_the_cluster_has_gpus(monkeypatch):
    import serve.app as app_module

    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 4.0)
    d = _deployment_of(app_module.build({"model": "resnet50", "num_gpus": 0.25, "num_cpus": 0.5, "max_batch": 64}))
    assert d.ray_actor_options["num_gpus"] == 0.25 and d.ray_actor_options["num_cpus"] == 0.5
    assert d.max_ongoing_requests == 128  # twice the largest batch, not Ray's default of 5
    assert _deployment_of(app_module.build({"model": "resnet50", "max_batch": 64, "max_ongoing_requests": 300})).max_ongoing_requests == 300
    # device cpu never asks for a GPU
    d = _deployment_of(app_module.build({"model": "resnet50", "device": "cpu"}))
    assert d.ray_actor_options["num_gpus"] == 0

    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 0.0)
    d = _deployment_of(app_module.build({"model": "resnet50", "num_gpus": 0.25, "num_cpus": 0.25}))
    assert d.ray_actor_options["num_gpus"] == 0 and d.ray_actor_options["num_cpus"] == 0.25


def test_replicas_per_gpu_packs_k_replicas_that_share_one_tuning_key(monkeypatch):
    import serve.app as app_module
    from optimizer.devices import DeviceFingerprint
    from optimizer.tune import resolve
    from serve.replica.settings import ReplicaConfig
    from deployments.registry import create_spec
    from pydantic import ValidationError

    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 1.0)
    d = _deployment_of(app_module.build({"model": "resnet50", "replicas_per_gpu": 4}))
    assert d.ray_actor_options["num_gpus"] == 0.25 and d.num_replicas == 4
    d = _deployment_of(app_module.build({"model": "resnet50", "replicas_per_gpu": 2, "num_replicas": 6}))
    assert d.ray_actor_options["num_gpus"] == 0.5 and d.num_replicas == 6  # three cards' worth
    with pytest.raises(ValidationError, match="disagree"):
        app_module.build({"model": "resnet50", "replicas_per_gpu": 2, "num_gpus": 0.25})
    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: 0.0)  # a CPU cluster: one replica, no GPU
    d = _deployment_of(app_module.build({"model": "resnet50", "replicas_per_gpu": 4}))
    assert d.ray_actor_options["num_gpus"] == 0 and d.num_replicas == 1

    # the replicas of one card get the same key (they tune once, the rest take the cache) within
    # 1/k of it; another share is another key
    card = DeviceFingerprint(kind="cuda", name="NVIDIA H200", total_memory_bytes=143_771_287_552, uuid="GPU-0",
                             driver_version="580", cuda_version="13.0", torch_version="2.14.1")
    spec = create_spec("resnet50")

    def key(share):
        config = ReplicaConfig(model="resnet50", gpu_share=share)
        return resolve(spec, config.tuning_settings("cuda"), card)

    a, b, other = key(0.25), key(0.25), key(0.5)
    assert a.key_fields(spec) == b.key_fields(spec) != other.key_fields(spec)
    assert a.memory_budget_bytes == int(0.9 * 0.25 * card.total_memory_bytes)


def test_a_gpu_share_tunes_within_its_share_of_the_memory():
    from serve.cluster.deployment import memory_fraction_for

    assert memory_fraction_for("cuda", None, 0.25) == pytest.approx(0.9 * 0.25)
    assert memory_fraction_for("cuda", None, 1.0) is None  # the optimizer's default (0.9 of the card)
    assert memory_fraction_for("cuda", 0.2, 0.25) == 0.2
    assert memory_fraction_for("cpu", None, 0.25) is None


def test_user_config_is_validated():
    from serve.cluster.deployment import parse_user_config

    assert parse_user_config({"batch_size": 8.0, "latency_budget_ms": 50})["batch_size"] == 8
    for bad in ({"batch_size": 0}, {"batch_size": 2.5}, {"memory_fraction": 2}, {"faults": {"oom_above": -1}},
                {"faults": {"explode": 1}}, {"retune_now": True}, ["batch_size", 4]):
        with pytest.raises(ValueError):
            parse_user_config(bad)


# ---------------------------------------------------------------- the file's applications, for real
def fast_apps(cache_path: str) -> list[dict]:
    """The file's applications as they are (names, routes, import path, device, CPU/GPU requests),
    with the tuning made small enough for a 2-core test: a temporary cache, max_batch 4, one timed
    run per probe, and a short worst-case prompt for the LLM."""
    apps = copy.deepcopy(load_config()["applications"])
    for app in apps:
        if app["name"] == "oip":
            continue
        app["args"].update(cache_path=cache_path, max_batch=4, repeats=1)
        if app["args"]["model"] == "llama_int4":
            app["args"]["options"] = {**app["args"].get("options", {}), "max_prompt_tokens": 16,
                                      "max_new_tokens": 4, "default_new_tokens": 4}
    return apps


@pytest.fixture(scope="module")
def config_cluster(tmp_path_factory):
    c = ServeCluster(num_cpus=2)
    c.cache_path = str(tmp_path_factory.mktemp("serve-config-cache") / "tuning.json")
    apps = fast_apps(c.cache_path)
    c.deploy(apps)
    c.wait_running([app["name"] for app in apps], timeout=420)
    yield c
    c.shutdown()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", list(ROUTES))
def test_every_route_of_the_config_answers(config_cluster, model):
    route = ROUTES[model]
    if model == "llama_int4":
        r = config_cluster.post(route, json.dumps({"prompt": "Hello, batch", "max_new_tokens": 3}).encode(), "application/json")
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["text"], str) and 1 <= body["completion_tokens"] <= 3
        bad = config_cluster.post(route, b"{not json", "application/json")
        assert bad.status_code == 400 and "error" in bad.json()
    else:
        r = config_cluster.post(route, image_bytes("JPEG", size=(320, 240), seed=7))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model
        assert ("top_k" in body) if model != "yolo11n_pose" else ("keypoints" in body and body["image_size"] == [320, 240])
        bad = config_cluster.post(route, b"GIF89a not really", "image/gif")
        assert 400 <= bad.status_code < 500 and "error" in bad.json()
    t = config_cluster.wait_tuning(route, warmed_up)
    assert t["model"] == model and t["cache"] == "miss" and t["probe_count"] >= 1
    assert 1 <= t["serving"]["max_batch_size"] <= 4 and t["serving"]["max_ongoing_requests"] == 8
    assert t["stats"]["samples_served"] >= 1
    warm = t["warm_sizes"]
    if not spec_class(model).fixed_sample_shape:  # prompt lengths change its shapes too: no size warming, and it says so
        assert "prompt lengths" in warm["skipped"]
    else:  # every size @serve.batch may form ran once before traffic: in the tuning or in the warm-up
        assert set(warm["warmed"]) | set(warm["already_warm"]) >= set(range(1, t["serving"]["max_batch_size"] + 1))
        assert warm["left_cold"] == []


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", list(ROUTES))
def test_every_model_answers_the_open_inference_protocol_through_the_router(config_cluster, model):
    """Two samples in one request to /v2/models/<model>/infer, as the spec's declared outputs."""
    declared = spec_class(model)().outputs() if model != "llama_int4" else None
    if model == "llama_int4":
        inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["Hello", "batch"]}]
    else:
        inputs = [{"name": "pixels", "datatype": "UINT8", "shape": [2, 8, 6, 3], "data": [7] * (2 * 8 * 6 * 3)}]
    r = config_cluster.http.post(f"/v2/models/{model}/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    names = {t.name for t in declared} if declared else {"text_output"}
    assert set(outputs) == names and all(o["shape"][0] == 2 for o in outputs.values()), r.text


# ---------------------------------------------------------------- the malformed-input matrix, live
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and whose data is almost nothing: a
    decompression bomb as a client sends it (decoding it would need width * height * 3 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _plain_image(mode: str, fmt: str) -> bytes:
    import io

    from PIL import Image

    fill = {"RGBA": (10, 20, 30, 40), "CMYK": (1, 2, 3, 4)}.get(mode, 128)
    buffer = io.BytesIO()
    Image.new(mode, (64, 48), fill).save(buffer, fmt)
    return buffer.getvalue()


FIFTY_MB = 50 * 2**20


def image_matrix() -> list[tuple[str, bytes, str, set[int]]]:
    """(case, body, content type, accepted statuses): issue 15's list for an image route. Images that
    are unusual but valid (16-bit, alpha, CMYK) are converted and answered; the rest are refused."""
    jpeg = image_bytes("JPEG", size=(320, 240), seed=3)
    return [
        ("empty", b"", "image/jpeg", {400}),
        ("1 byte", b"\xff", "image/jpeg", {415}),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], "image/jpeg", {422}),
        ("text as JPEG", b"this is a sentence, not a picture", "image/jpeg", {415}),
        ("GIF", image_bytes("GIF"), "image/gif", {415}),
        ("BMP", _plain_image("RGB", "BMP"), "image/bmp", {415}),
        ("16-bit PNG", _plain_image("I;16", "PNG"), "image/png", {200}),
        ("alpha PNG", _plain_image("RGBA", "PNG"), "image/png", {200}),
        ("CMYK JPEG", _plain_image("CMYK", "JPEG"), "image/jpeg", {200}),
        ("20000x20000 bomb", _png_header_only(20000, 20000), "image/png", {413}),
        ("50 MB body", b"\xff\xd8\xff" + b"\0" * FIFTY_MB, "image/jpeg", {413}),
        ("JSON", b'{"image": "cat.jpg"}', "application/json", {415}),
    ]


def llama_matrix() -> list[tuple[str, bytes, str, set[int]]]:
    as_json = lambda body: json.dumps(body).encode()  # noqa: E731
    return [
        ("empty", b"", "application/json", {400}),
        ("1 byte", b"{", "application/json", {400}),
        ("bad JSON", b"{not json", "application/json", {400}),
        ("10,000-deep JSON", b"[" * 10_000 + b"]" * 10_000, "application/json", {400}),
        ("an array", b"[1, 2]", "application/json", {400}),
        ("not UTF-8", b'{"prompt": "\xff\xfe"}', "application/json", {400}),
        ("prompt a number", as_json({"prompt": 5}), "application/json", {422}),
        ("empty prompt", as_json({"prompt": ""}), "application/json", {422}),
        ("max_new_tokens as text", as_json({"prompt": "hi", "max_new_tokens": "7"}), "application/json", {422}),
        ("max_new_tokens a bool", as_json({"prompt": "hi", "max_new_tokens": True}), "application/json", {422}),
        ("huge max_new_tokens", as_json({"prompt": "hi", "max_new_tokens": 10**9}), "application/json", {422}),
        ("an unknown field", as_json({"prompt": "hi", "temperature": 2}), "application/json", {422}),
        ("a 1 MB prompt", as_json({"prompt": "a" * 2**20}), "application/json", {413}),
        ("50 MB body", b'{"prompt": "' + b"a" * FIFTY_MB + b'"}', "application/json", {413}),
        # control tokens typed into a prompt stay text: answered, never a stop or an injection
        ("special tokens", as_json({"prompt": "<|end_of_text|>", "max_new_tokens": 2}),
         "application/json", {200}),
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", list(ROUTES))
def test_every_malformed_payload_is_a_4xx_that_says_what_to_send_and_the_replica_stays(config_cluster, model):
    """Issue 15's malformed-input matrix against each route of the file, through the router as
    served: every case is answered (4xx with a JSON message, or 200 for an unusual valid image), none
    is a 5xx or a hang, and the same replica answers a good request afterwards."""
    route = ROUTES[model]
    pid = config_cluster.tuning(route)["replica"]["pid"]
    cases = llama_matrix() if model == "llama_int4" else image_matrix()
    answered = {}
    for case, body, content_type, accepted in cases:
        for _ in range(5):  # a loaded 2-core machine may shed a good request: resend it, as a client would
            r = config_cluster.post(route, body, content_type)
            if r.status_code != 503:
                break
            time.sleep(float(r.headers.get("retry-after", 1)))
        answered[case] = r.status_code
        assert r.status_code in accepted, (case, r.status_code, r.text[:300])
        if r.status_code != 200:
            message = r.json()["error"]
            assert isinstance(message, str) and ("send" in message or "shorten" in message), (case, message)
    after = config_cluster.tuning(route)
    assert after["replica"]["pid"] == pid, answered  # no payload took the replica down
    good = (json.dumps({"prompt": "Hello", "max_new_tokens": 2}).encode(), "application/json") if model == "llama_int4" \
        else (image_bytes("JPEG", size=(320, 240), seed=11), "image/jpeg")
    assert config_cluster.post(route, *good).status_code == 200
