"""The Open Inference Protocol codec (wire/ and serve/oip), Ray-free: request bodies made by the real
tritonclient (HTTP JSON, HTTP binary, gRPC messages) parse into the tensors sent; responses we
encode parse back in tritonclient; each bad request is a PayloadError with the right status and a
message that says what to send."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from serve.oip import metadata, rest
from wire import PayloadError, grpc_codec
from wire.request import InferRequest, InferResponse, RequestedOutput, select_outputs, validate
from wire.tensors import Tensor, deserialize_bytes, serialize_bytes

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


@dataclass(frozen=True)
class Spec:
    """A test double of deployments.base.TensorSpec: the fields the codec reads."""

    name: str
    datatype: str
    shape: tuple
    description: str = "a test tensor"
    optional: bool = False


IMAGE_INPUTS = (Spec("images", "BYTES", (-1,), "encoded images", optional=True),
                Spec("pixels", "UINT8", (-1, -1, -1, 3), "HxWx3 pixels", optional=True))
TEXT_INPUTS = (Spec("text_input", "BYTES", (-1,), "a prompt per sample"),
               Spec("max_tokens", "INT32", (-1,), "tokens to generate", optional=True))
OUTPUTS = (Spec("scores", "FP32", (-1, 5)), Spec("class_ids", "INT64", (-1, 5)))


def http_body(inputs, outputs=None, **kw):
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return body, headers


def bytes_input(name, elements, binary=True):
    tensor = httpclient.InferInput(name, [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    return tensor


def parse(body, headers, model="m", **kw):
    return rest.parse_infer_request(model, body, headers, **kw)


def error_of(fn, *args, **kw) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        fn(*args, **kw)
    return info.value


# ----------------------------------------------------------------- REST parsing
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_bytes_and_numbers_round_trip(binary):
    images = [b"\xff\xd8 jpeg one", b"\x89PNG two", b""] if binary else ["one", "two", ""]
    pixels = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    pix = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    pix.set_data_from_numpy(pixels, binary_data=binary)
    body, headers = http_body([bytes_input("images", images, binary), pix])
    assert ("Inference-Header-Content-Length" in headers) == binary
    request = parse(body, headers)
    assert [t.name for t in request.inputs] == ["images", "pixels"]
    got = request.input("images").data
    assert got.dtype == object and [bytes(x) for x in got] == [x if binary else x.encode() for x in images]
    np.testing.assert_array_equal(request.input("pixels").data, pixels)
    assert request.input("pixels").shape == (2, 4, 5, 3)


def test_json_data_nested_or_flat_agree():
    flat = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3.5, 4]}]}
    nested = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, 4]]}]}
    a = parse(json.dumps(flat).encode(), {}).input("x").data
    b = parse(json.dumps(nested).encode(), {}).input("x").data
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.tolist() == [[1, 2], [3.5, 4]]


def test_bytes_elements_serialize_as_length_prefixed():
    raw = serialize_bytes([b"ab", "\u00e9", b""])
    assert raw == b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa9\x00\x00\x00\x00"
    assert list(deserialize_bytes("t", raw, 3)) == [b"ab", "\u00e9".encode(), b""]


def test_request_id_outputs_and_parameters_are_kept():
    out = httpclient.InferRequestedOutput("scores", binary_data=False)
    body, headers = http_body([bytes_input("images", [b"x"])], outputs=[out], request_id="42")
    request = parse(body, headers)
    assert request.id == "42"
    assert request.outputs == [RequestedOutput("scores", False, {"binary_data": False})]
    assert request.binary_output("scores") is False


# ----------------------------------------------------------------- REST errors
def json_request(*inputs, **extra):
    return json.dumps({"inputs": list(inputs), **extra}).encode()


@pytest.mark.parametrize("item, words", [
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, ["holds 3 elements", "needs 4"]),
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2, 3], [4]]}, ["nested unevenly", "[2, 2]"]),
    ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4], [5, 6]]}, ["nested as [3, 2]"]),
    ({"name": "x", "datatype": "INT32", "shape": [3], "data": [1, 2.5, 3]}, ["element 1", "whole number"]),
    ({"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, 300]}, ["element 1", "outside UINT8"]),
    ({"name": "x", "datatype": "BYTES", "shape": [2], "data": ["a", 7]}, ["element 1", "string"]),
    ({"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}, ["not an Open Inference Protocol type", "FP32"]),
    ({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}, ["shape must be"]),
    ({"name": "x", "datatype": "FP32", "shape": [1]}, ["has no data"]),
])
def test_bad_json_tensors_are_400_naming_what_to_send(item, words):
    err = error_of(parse, json_request(item), {})
    assert err.status == 400
    for word in words:
        assert word in err.message, err.message


def test_binary_size_disagreeing_with_body_is_400():
    body, headers = http_body([bytes_input("images", [b"abc", b"defg"])])
    err = error_of(parse, body[:-2], headers)  # the body lost two bytes of the last element
    assert err.status == 400 and "binary_data_size says 15 bytes" in err.message and "only 13" in err.message
    lying = body[:-8] + b"\x09\x00\x00\x00" + body[-4:]  # element 1 claims 9 bytes, has 4
    err = error_of(parse, lying, headers)
    assert err.status == 400 and "element 1 says it is 9 bytes long" in err.message
    err = error_of(parse, body + b"zz", headers)
    assert err.status == 400 and "add up to" in err.message
    header_len = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:header_len])
    doc["inputs"][0]["parameters"]["binary_data_size"] += 10
    header = json.dumps(doc).encode()
    err = error_of(parse, header + body[header_len:], {"Inference-Header-Content-Length": str(len(header))})
    assert err.status == 400 and "binary_data_size says" in err.message


def test_numeric_binary_of_wrong_size_is_400_with_the_sizes():
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 20}}]}
    header = json.dumps(doc).encode()
    err = error_of(parse, header + bytes(20), {"Inference-Header-Content-Length": str(len(header))})
    assert err.status == 400 and "20 bytes" in err.message and "6 x 4 = 24" in err.message


def test_header_length_and_json_errors():
    assert "not JSON" in error_of(parse, b"\xff\xd8 not json", {}).message
    err = error_of(parse, b"{}", {"Inference-Header-Content-Length": "999"})
    assert "body is 2 bytes" in err.message
    assert "raw binary request" in error_of(parse, b"xx", {"Inference-Header-Content-Length": "0"}).message
    assert '"inputs" array' in error_of(parse, b'{"x": 1}', {}).message


def test_oversize_body_is_413_before_parsing():
    err = error_of(parse, b"{" + b" " * 100, {}, max_body_bytes=50)
    assert err.status == 413 and "101 bytes" in err.message and "fewer samples" in err.message


# ----------------------------------------------------------------- validation against a spec
def request_of(*tensors, outputs=()):
    return InferRequest("resnet50", list(tensors), outputs=list(outputs))


def bytes_tensor(name, elements):
    data = np.empty(len(elements), dtype=object)
    data[:] = elements
    return Tensor(name, "BYTES", (len(elements),), data)


def test_validate_accepts_declared_inputs_and_widens_integers():
    req = InferRequest("llama", [bytes_tensor("text_input", [b"a", b"b"]),
                                 Tensor("max_tokens", "INT64", (2,), np.array([4, 8], dtype=np.int64))])
    out = validate(req, TEXT_INPUTS, OUTPUTS)
    assert out.input("max_tokens").datatype == "INT32" and out.input("max_tokens").data.dtype == np.int32
    assert out.samples == 2


@pytest.mark.parametrize("tensors, words", [
    ([Tensor("images", "FP32", (1,), np.zeros(1, np.float32))], ["is FP32", "images (BYTES [-1])", "send it as BYTES"]),
    ([Tensor("pixels", "UINT8", (1, 4, 4), np.zeros((1, 4, 4), np.uint8))], ["3 dimensions", "pixels (UINT8 [-1, -1, -1, 3])"]),
    ([Tensor("pixels", "UINT8", (1, 4, 4, 4), np.zeros((1, 4, 4, 4), np.uint8))], ["dimension 3 is 4", "takes 3"]),
    ([Tensor("pics", "BYTES", (1,), np.array([b"x"], dtype=object))], ["no input 'pics'", "images (BYTES [-1])"]),
    ([], ["no inputs", "one of"]),
    ([bytes_tensor("images", [b"a", b"b"]), Tensor("pixels", "UINT8", (3, 2, 2, 3), np.zeros((3, 2, 2, 3), np.uint8))],
     ["disagree on the sample count", "images=2", "pixels=3"]),
    ([bytes_tensor("images", [b"a"]), bytes_tensor("images", [b"b"])], ["given twice"]),
    ([Tensor("images", "BYTES", (0,), np.empty(0, dtype=object))], ["no samples"]),
])
def test_validate_rejects_with_400_naming_the_fix(tensors, words):
    err = error_of(validate, request_of(*tensors), IMAGE_INPUTS, OUTPUTS)
    assert err.status == 400
    for word in words:
        assert word in err.message, err.message


def test_validate_missing_required_input_and_unknown_output():
    err = error_of(validate, InferRequest("llama", [Tensor("max_tokens", "INT32", (1,), np.array([3], np.int32))]),
                   TEXT_INPUTS, OUTPUTS)
    assert "missing input text_input (BYTES [-1])" in err.message and "a prompt per sample" in err.message
    err = error_of(validate, request_of(bytes_tensor("images", [b"a"]), outputs=[RequestedOutput("boxes")]),
                   IMAGE_INPUTS, OUTPUTS)
    assert "no output 'boxes'" in err.message and "scores (FP32 [-1, 5])" in err.message
    err = error_of(validate, InferRequest("llama", [bytes_tensor("text_input", [b"a"]),
                                                    Tensor("max_tokens", "INT64", (1,), np.array([2**40]))]),
                   TEXT_INPUTS, OUTPUTS)
    assert "element 0" in err.message and "does not fit INT32" in err.message


# ----------------------------------------------------------------- REST responses, read by tritonclient
def response_tensors(n):
    scores = np.linspace(0, 1, n * 5, dtype=np.float32).reshape(n, 5)
    ids = np.arange(n * 5, dtype=np.int64).reshape(n, 5)
    text = np.array([f"sample {i} \u00e9".encode() for i in range(n)], dtype=object)
    return [Tensor("scores", "FP32", (n, 5), scores), Tensor("class_ids", "INT64", (n, 5), ids),
            Tensor("text_output", "BYTES", (n,), text)]


@pytest.mark.parametrize("binary_output", [True, False, None])
def test_tritonclient_http_reads_our_response(binary_output):
    n = 3
    outputs = response_tensors(n)
    requested = [] if binary_output is None else [RequestedOutput(t.name, binary_output) for t in outputs]
    params = {"binary_data_output": True} if binary_output is None else {}
    request = InferRequest("m", [], id="7", parameters=params, outputs=requested)
    body, headers = rest.encode_infer_response(InferResponse("m", select_outputs(request, outputs), id="7"), request)
    binary = binary_output is not False
    assert ("inference-header-content-length" in headers) == binary
    length = headers.get("inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=None if length is None else int(length))
    assert result.get_response()["id"] == "7" and result.get_response()["model_name"] == "m"
    np.testing.assert_array_equal(result.as_numpy("scores"), outputs[0].data)
    np.testing.assert_array_equal(result.as_numpy("class_ids"), outputs[1].data)
    text = [x.encode() if isinstance(x, str) else bytes(x) for x in result.as_numpy("text_output")]
    assert text == list(outputs[2].data)


def test_select_outputs_keeps_the_requested_order():
    outputs = response_tensors(1)
    request = InferRequest("m", [], outputs=[RequestedOutput("class_ids"), RequestedOutput("scores")])
    assert [t.name for t in select_outputs(request, outputs)] == ["class_ids", "scores"]


def test_non_utf8_bytes_output_asks_for_binary():
    request = InferRequest("m", [], outputs=[RequestedOutput("text_output", False)])
    bad = Tensor("text_output", "BYTES", (1,), np.array([b"\xff\xfe"], dtype=object))
    err = error_of(rest.encode_infer_response, InferResponse("m", [bad]), request)
    assert "binary_data: true" in err.message


# ----------------------------------------------------------------- gRPC
def triton_grpc_request(inputs, **kw):
    from tritonclient.grpc._utils import _get_inference_request

    message = _get_inference_request(model_name="resnet50", inputs=inputs, model_version="", request_id=kw.get("id", ""),
                                     outputs=kw.get("outputs"), sequence_id=0, sequence_start=False,
                                     sequence_end=False, priority=0, timeout=None, parameters=None)
    return grpc_codec.pb.ModelInferRequest.FromString(message.SerializeToString())


def test_tritonclient_grpc_request_parses_and_our_response_reads_back():
    images = np.array([b"\xff\xd8 one", b"two", b""], dtype=object)
    tensor = grpcclient.InferInput("images", [3], "BYTES")
    tensor.set_data_from_numpy(images)
    tokens = grpcclient.InferInput("max_tokens", [3], "INT64")
    tokens.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int64))
    request = grpc_codec.request_from_proto(triton_grpc_request([tensor, tokens], id="9"))
    assert request.model_name == "resnet50" and request.id == "9"
    assert list(request.input("images").data) == list(images)
    assert request.input("max_tokens").data.tolist() == [1, 2, 3]

    outputs = response_tensors(2)
    message = grpc_codec.response_to_proto(InferResponse("resnet50", outputs, id="9"))
    from tritonclient.grpc import service_pb2

    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(message.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("scores"), outputs[0].data)
    np.testing.assert_array_equal(result.as_numpy("class_ids"), outputs[1].data)
    assert [bytes(x) for x in result.as_numpy("text_output")] == list(outputs[2].data)


def test_grpc_typed_contents_and_errors():
    message = grpc_codec.pb.ModelInferRequest(model_name="m")
    item = message.inputs.add(name="x", datatype="INT32", shape=[2, 2])
    item.contents.int_contents.extend([1, 2, 3, 4])
    assert grpc_codec.request_from_proto(message).input("x").data.tolist() == [[1, 2], [3, 4]]
    item.shape[:] = [3, 2]
    err = error_of(grpc_codec.request_from_proto, message)
    assert err.status == 400 and "holds 4 elements" in err.message and "needs 6" in err.message
    message.raw_input_contents.append(b"\x00" * 24)
    err = error_of(grpc_codec.request_from_proto, message)
    assert "use one form" in err.message
    item.ClearField("contents")
    assert grpc_codec.request_from_proto(message).input("x").data.shape == (3, 2)
    err = error_of(grpc_codec.request_from_proto, message, max_body_bytes=10)
    assert err.status == 413
    message.inputs.add(name="y", datatype="FP32", shape=[1])
    assert "2 inputs" in error_of(grpc_codec.request_from_proto, message).message
    assert grpc_codec.grpc_code(404).name == "NOT_FOUND" and grpc_codec.grpc_code(503).name == "UNAVAILABLE"


def test_grpc_metadata_messages():
    doc = metadata.model_metadata("resnet50", IMAGE_INPUTS, OUTPUTS)
    msg = grpc_codec.model_metadata_proto(doc)
    assert msg.name == "resnet50" and list(msg.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.inputs] == [("images", "BYTES", [-1]),
                                                                          ("pixels", "UINT8", [-1, -1, -1, 3])]
    assert msg.properties["input.images"] == "optional; encoded images"
    server = grpc_codec.server_metadata_proto(metadata.server_metadata())
    assert server.name == "autobatch" and list(server.extensions) == ["binary_tensor_data"]


# ----------------------------------------------------------------- metadata and routes
def test_model_metadata_lists_declared_tensors():
    doc = metadata.model_metadata("llama_int4", TEXT_INPUTS, (Spec("text_output", "BYTES", (-1,)),))
    assert doc["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]},
                             {"name": "max_tokens", "datatype": "INT32", "shape": [-1]}]
    assert doc["platform"] == metadata.PLATFORM and doc["versions"] == ["1"]


@pytest.mark.parametrize("method, path, route", [
    ("GET", "/v2", metadata.Route("server_metadata")),
    ("GET", "/v2/health/live", metadata.Route("live")),
    ("GET", "/v2/health/ready/", metadata.Route("ready")),
    ("GET", "/v2/models/resnet50", metadata.Route("model_metadata", "resnet50")),
    ("GET", "/v2/models/resnet50/versions/1", metadata.Route("model_metadata", "resnet50", "1")),
    ("GET", "/v2/models/resnet50/ready", metadata.Route("model_ready", "resnet50")),
    ("POST", "/v2/models/resnet50/versions/1/infer", metadata.Route("infer", "resnet50", "1")),
])
def test_routes(method, path, route):
    assert metadata.match_route(method, path) == route


def test_route_errors():
    err = error_of(metadata.match_route, "GET", "/v2/models/resnet50/stats")
    assert err.status == 404 and "/v2/models/<model>" in err.message
    err = error_of(metadata.match_route, "GET", "/v2/models/resnet50/infer")
    assert err.status == 405 and "takes POST" in err.message
    err = error_of(metadata.check_version, "resnet50", "3")
    assert err.status == 404 and "serves version 1" in err.message
    metadata.check_version("resnet50", None)
    metadata.check_version("resnet50", "1")


# ----------------------------------------------------------------- our own v2 client (autobatch client/bench)
def test_v2_client_request_and_response_forms_agree_with_the_server_codec():
    from autobatch.client.oip_client import decode_http_response, encode_http_request, per_sample, samples_request

    meta = metadata.model_metadata("llama_int4", TEXT_INPUTS, (Spec("text_output", "BYTES", (-1,)),))
    request = samples_request("llama_int4", meta, ["hello", b"\xff raw"], max_tokens=4)
    assert [t.name for t in request.inputs] == ["text_input", "max_tokens"]
    for binary in (True, False):
        if not binary:
            request.inputs[0].data[1] = b"raw"  # JSON carries text only
        body, headers = encode_http_request(request, binary_input=binary)
        parsed = validate(parse(body, headers, model="llama_int4"), TEXT_INPUTS, (Spec("text_output", "BYTES", (-1,)),))
        assert list(parsed.input("text_input").data) == list(request.inputs[0].data)
        assert parsed.input("max_tokens").data.tolist() == [4, 4]
    text = np.array([b"one", b"two"], dtype=object)
    response = InferResponse("llama_int4", [Tensor("text_output", "BYTES", (2,), text)])
    body, headers = rest.encode_infer_response(response, parsed)
    decoded = decode_http_response("llama_int4", body, headers)
    assert per_sample(decoded) == [{"text_output": "one"}, {"text_output": "two"}]
    with pytest.raises(ValueError, match="no BYTES input"):
        samples_request("m", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}], "outputs": []}, [b"a"])
