"""The Open Inference Protocol v2 live: serve_config.yaml's layout (the OIP router the only routed
application, the models behind it, gRPC on) cut to ResNet-50 and the small Llama, called with the
stock Triton clients (tritonclient.http and tritonclient.grpc, no metadata, no headers): metadata,
readiness, many samples per request batched by sample (a request larger than the tuned batch
spread over several batches), JSON and binary tensors, and bad requests answered with the status
and a message that says what to send, the replica still serving after them."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from serve_helpers import ServeCluster, image_bytes

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = ("resnet50", "llama_int4")
MAX_BODY_BYTES = 4 * 2**20
MAX_NEW_TOKENS = 16  # README's examples ask for 16


def live_apps(cache_path: str) -> list[dict]:
    """serve_config.yaml's router and two of its models, as they are there, tuned small."""
    apps = {app["name"]: app for app in copy.deepcopy(yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"])}
    router = apps["oip"]
    router["args"].update(models=list(MODELS), max_body_bytes=MAX_BODY_BYTES)
    chosen = [router]
    for name in MODELS:
        app = apps[name]
        app["args"].update(cache_path=cache_path, max_batch=4, repeats=1, device="cpu")
        if name == "llama_int4":
            app["args"]["options"] = {"max_prompt_tokens": 32, "max_new_tokens": MAX_NEW_TOKENS,
                                      "default_new_tokens": 2}
        chosen.append(app)
    return chosen


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    c = ServeCluster(num_cpus=2, grpc=True)
    cache_path = str(tmp_path_factory.mktemp("oip-live-cache") / "tuning.json")
    apps = live_apps(cache_path)
    c.deploy(apps)
    c.wait_running([app["name"] for app in apps], timeout=420)
    c.http_client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{c.http_port}", network_timeout=300,
                                                            connection_timeout=300)
    c.grpc_client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{c.grpc_port}")
    yield c
    c.http_client.close()
    c.grpc_client.close()
    c.shutdown()


def images_input(module, images: list[bytes]):
    """Encoded images: binary over HTTP too (JSON carries BYTES as UTF-8 strings, which image bytes are not)."""
    tensor = module.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def single_answer(live, image: bytes) -> dict:
    r = live.post("/resnet50", image)
    assert r.status_code == 200, r.text
    return {"class_ids": [c["class_id"] for c in r.json()["top_k"]], "scores": [c["score"] for c in r.json()["top_k"]]}


def assert_rows_match(result, expected: list[dict]):
    class_ids, scores = result.as_numpy("class_ids"), result.as_numpy("scores")
    assert class_ids.shape == scores.shape == (len(expected), 5)
    for row, want in enumerate(expected):
        assert class_ids[row].tolist() == want["class_ids"], row
        assert scores[row] == pytest.approx(want["scores"], rel=1e-4, abs=1e-6), row


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


# ---------------------------------------------------------------- metadata and readiness
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_server_and_model_metadata_and_readiness(live, transport):
    client = live.http_client if transport == "http" else live.grpc_client
    assert client.is_server_live() and client.is_server_ready()
    as_json = {} if transport == "http" else {"as_json": True}  # the gRPC client answers protobuf messages otherwise
    server = client.get_server_metadata(**as_json)
    assert server["name"] == "autobatch" and "binary_tensor_data" in server["extensions"]
    for model in MODELS:
        assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    meta = client.get_model_metadata("resnet50", **as_json)
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {"images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, 3])}
    assert {t["name"] for t in meta["outputs"]} == {"scores", "class_ids"}
    llama = client.get_model_metadata("llama_int4", **as_json)
    assert [t["name"] for t in llama["inputs"]] == ["text_input", "max_tokens"]


# ---------------------------------------------------------------- inference, many samples per request
@pytest.mark.parametrize("transport,binary", [("http", True), ("http", False), ("grpc", True)])
def test_several_images_in_one_request_answer_as_the_simple_route_does(live, transport, binary):
    images = [image_bytes("JPEG", size=(160, 120), seed=seed) for seed in (1, 2, 3)]
    expected = [single_answer(live, image) for image in images]
    module = tritonclient_http if transport == "http" else tritonclient_grpc
    client = live.http_client if transport == "http" else live.grpc_client
    outputs = None
    if transport == "http":
        outputs = [module.InferRequestedOutput(name, binary_data=binary) for name in ("scores", "class_ids")]
    result = client.infer("resnet50", [images_input(module, images)], outputs=outputs)
    assert_rows_match(result, expected)
    if transport == "http":  # the answer came in the form asked for
        response = result.get_response()
        assert all(("binary_data_size" in o.get("parameters", {})) == binary for o in response["outputs"])


def test_a_request_larger_than_the_batch_spreads_over_batches_and_keeps_its_order(live):
    images = [image_bytes("PNG", size=(96, 96), seed=10 + i) for i in range(9)]
    expected = [single_answer(live, image) for image in images]
    before = live.tuning("/resnet50")
    max_batch = before["serving"]["max_batch_size"]
    assert max_batch <= 4 < len(images)
    result = live.grpc_client.infer("resnet50", [images_input(tritonclient_grpc, images)])
    assert_rows_match(result, expected)
    after = live.tuning("/resnet50")
    # batched by sample: 9 more samples served, in batches no larger than the tuned size
    assert after["stats"]["samples_served"] - before["stats"]["samples_served"] == len(images)
    assert max(int(size) for size in after["stats"]["batch_sizes"]) <= max_batch


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_pixels_are_served_like_the_same_image_encoded(live, transport):
    pixels = np.stack([np.full((64, 48, 3), value, np.uint8) for value in (30, 200)])
    encoded = []
    for row in pixels:
        from io import BytesIO

        from PIL import Image

        buffer = BytesIO()
        Image.fromarray(row).save(buffer, "PNG")  # lossless: the same pixels
        encoded.append(buffer.getvalue())
    module = tritonclient_http if transport == "http" else tritonclient_grpc
    client = live.http_client if transport == "http" else live.grpc_client
    tensor = module.InferInput("pixels", list(pixels.shape), "UINT8")
    if transport == "http":
        tensor.set_data_from_numpy(pixels, binary_data=False)  # the JSON `data` form of a request
    else:
        tensor.set_data_from_numpy(pixels)
    result = client.infer("resnet50", [tensor])
    assert_rows_match(result, [single_answer(live, image) for image in encoded])


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_llama_generates_for_each_prompt(live, transport):
    module = tritonclient_http if transport == "http" else tritonclient_grpc
    client = live.http_client if transport == "http" else live.grpc_client
    prompts = np.array([b"Hello, batch", "Grüße".encode()], dtype=object)
    text = module.InferInput("text_input", [2], "BYTES")
    text.set_data_from_numpy(prompts)
    tokens = module.InferInput("max_tokens", [2], "INT32")
    tokens.set_data_from_numpy(np.array([1, MAX_NEW_TOKENS], np.int32))
    result = client.infer("llama_int4", [text, tokens])
    out = result.as_numpy("text_output")
    assert out.shape == (2,) and all(isinstance(t, bytes) for t in out)
    # the request's parameter stands in for a max_tokens input left out
    result = client.infer("llama_int4", [text], parameters={"max_tokens": 3})
    assert result.as_numpy("text_output").shape == (2,)


# ---------------------------------------------------------------- bad requests
def infer_raw(live, model: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return live.http.post(f"/v2/models/{model}/infer", content=body, headers=headers or {})


def test_bad_requests_get_the_right_status_and_say_what_to_send(live):
    good = image_bytes("JPEG", size=(64, 64), seed=5)
    # wrong datatype
    wrong = tritonclient_http.InferInput("images", [1, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4), np.float32))
    status, message = status_of(lambda: live.http_client.infer("resnet50", [wrong]))
    assert status == "400" and "FP32" in message and "BYTES" in message, message
    # a shape that disagrees with the data
    r = infer_raw(live, "resnet50", json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                                            "data": [0] * 5}]}).encode())
    assert r.status_code == 400 and "12" in r.json()["error"] and "5" in r.json()["error"], r.text
    # a missing input
    tokens = tritonclient_grpc.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([2], np.int32))
    status, message = status_of(lambda: live.grpc_client.infer("llama_int4", [tokens]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "missing input text_input" in message, message
    # a binary size that disagrees with the body
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(good) + 100}}]}).encode()
    r = infer_raw(live, "resnet50", header + len(good).to_bytes(4, "little") + good,
                  {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"], r.text
    # an unknown model, both ways
    status, message = status_of(lambda: live.http_client.infer("resnet5", [images_input(tritonclient_http, [good])]))
    assert status == "404" and "resnet50" in message, message
    status, message = status_of(lambda: live.grpc_client.get_model_metadata("resnet5"))
    assert status == "StatusCode.NOT_FOUND" and "resnet50" in message, message
    # a body over the router's limit
    r = infer_raw(live, "resnet50", b"x" * (MAX_BODY_BYTES + 1), {"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in r.json()["error"], r.text
    # one bad element fails its request, naming it; its neighbours decode fine
    status, message = status_of(lambda: live.grpc_client.infer(
        "resnet50", [images_input(tritonclient_grpc, [good, b"GIF89a not an image", good])]))
    assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith("element 1: ") and "JPEG" in message, message
    # the replica is healthy after all of it
    assert live.grpc_client.is_model_ready("resnet50")
    result = live.grpc_client.infer("resnet50", [images_input(tritonclient_grpc, [good])])
    assert_rows_match(result, [single_answer(live, good)])


# ---------------------------------------------------------------- what users run
def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"^## Open Inference Protocol v2.*?(?=^## )", text, re.S | re.M).group(0)


@pytest.mark.parametrize("model", MODELS)
def test_the_readme_curl_examples_run(live, model):
    lines = [line for line in readme_section().splitlines()
             if line.startswith("curl ") and f"/v2/models/{model}/infer" in line]
    assert lines, f"README has no curl example for {model}"
    for line in lines:
        line = line.replace("localhost:8000", f"127.0.0.1:{live.http_port}")
        done = subprocess.run(["bash", "-c", line + " -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=300)
        body, status = done.stdout.rsplit("\n", 1)
        assert status == "200", (line, done.stdout, done.stderr)
        outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        assert set(outputs) == ({"scores", "class_ids"} if model == "resnet50" else {"text_output"}), body


def test_the_readme_tritonclient_example_runs(live):
    code = re.search(r"```python\n(.*?)```", readme_section(), re.S).group(1)
    code = code.replace("localhost:9000", f"127.0.0.1:{live.grpc_port}")
    # as written, from a clone's root: the images it names are the ones examples/ ships
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[") >= 3 and "b'" in done.stdout, done.stdout  # class ids, scores, texts printed


def test_the_examples_client_script_runs_for_every_model_both_transports(live):
    """examples/oip_clients.py, which the GPU run uses for all four models, on this app's two."""
    done = subprocess.run([sys.executable, "examples/oip_clients.py", "--http", f"127.0.0.1:{live.http_port}",
                           "--grpc", f"127.0.0.1:{live.grpc_port}", "--models", *MODELS, "--samples", "1", "3",
                           "--max-tokens", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(MODELS) * 2, done.stdout  # transport x model x samples
    assert any("class_ids[3, 5]" in line for line in lines) and any("text_output[3]" in line for line in lines), done.stdout


def test_the_timeout_parameter_is_the_requests_deadline(live):
    """Triton's `timeout` request parameter (microseconds): a request that cannot be answered within
    it is refused (503) or dropped before compute (504), never served late; a bad value is a 400."""
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [9] * 12}
    r = infer_raw(live, "resnet50", json.dumps({"inputs": [pixels], "parameters": {"timeout": 1}}).encode())
    assert r.status_code in (503, 504), r.text
    r = infer_raw(live, "resnet50", json.dumps({"inputs": [pixels], "parameters": {"timeout": -5}}).encode())
    assert r.status_code == 400 and "microseconds" in r.json()["error"], r.text
    r = infer_raw(live, "resnet50", json.dumps({"inputs": [pixels], "parameters": {"timeout": 600_000_000}}).encode())
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_bench_v2_sends_many_samples_per_request_through_the_router(live, transport, tmp_path):
    """`autobatch bench --protocol v2 --samples-per-request N` as the lead runs it on the GPU, small:
    6 samples per request (more than the tuned batch of at most 4), one request at a time: admission
    counts samples, and on this CPU two such requests queued are over its bound (503, shed)."""
    from autobatch.client.bench import main as bench_main

    out = tmp_path / "report.json"
    argv = ["--url", live.base, "--route", "resnet50", "--protocol", "v2", "--transport", transport,
            "--samples-per-request", "6", "--requests", "4", "--concurrency", "1", "--duration", "120",
            "--no-progress", "--json", "--out", str(out)]
    if transport == "grpc":
        argv += ["--grpc-url", f"127.0.0.1:{live.grpc_port}"]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == report["ok"] == 4 and report["errors"] == {}, report
    assert report["samples"] == 24 and report["samples_per_request"] == 6 and report["transport"] == transport
