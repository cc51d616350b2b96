"""The REST wire of the Open Inference Protocol v2 (kserve `inference_rest.md`) with Triton's
binary tensor data extension (`extension_binary_data.md`): an infer request's bytes -> InferRequest,
an InferResponse -> bytes and headers. Ray-free; the router calls it."""
from __future__ import annotations

import json
from typing import Any, Mapping

from deployments.base import PayloadError

from .request import InferRequest, InferResponse, RequestedOutput
from .tensors import Tensor, check_datatype, check_shape, from_binary, from_json, to_binary, to_json

HEADER_LENGTH = "inference-header-content-length"
# A request body over this is answered 413 before it is parsed; the router's default.
DEFAULT_MAX_BODY_BYTES = 256 * 2**20


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _parameters(where: str, value) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise PayloadError(f"{where}: parameters must be a JSON object of strings, numbers or booleans, got {value!r}")
    return dict(value)


def check_body_size(length: int, max_body_bytes: int) -> None:
    if length > max_body_bytes:
        raise PayloadError(f"the request body is {length} bytes, over this server's limit of {max_body_bytes}; "
                           f"send fewer samples per request", status=413)


def parse_infer_request(model_name: str, body: bytes, headers: Mapping[str, str], model_version: str = "",
                        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> InferRequest:
    """Parse POST /v2/models/<model>/infer: a JSON request, or a JSON header of
    Inference-Header-Content-Length bytes followed by each binary input's `binary_data_size`
    bytes in input order."""
    check_body_size(len(body), max_body_bytes)
    header_length = _header(headers, HEADER_LENGTH)
    if header_length is None:
        json_bytes, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise PayloadError(f"Inference-Header-Content-Length must be a whole number of bytes, got {header_length!r}") from None
        if size == 0:
            raise PayloadError("Inference-Header-Content-Length 0 (a raw binary request without a JSON header) is "
                               "not served; send the JSON inference header before the binary data")
        if not 0 < size <= len(body):
            raise PayloadError(f"Inference-Header-Content-Length is {size} but the body is {len(body)} bytes; "
                               f"give the length of the JSON header at the start of the body")
        json_bytes, binary = body[:size], memoryview(body)[size:]
    try:
        document = json.loads(json_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = ("; with binary tensor data, set Inference-Header-Content-Length to the JSON header's length"
                if header_length is None and body[:1] == b"{" else "")
        raise PayloadError(f"the inference request is not JSON ({exc}){hint}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise PayloadError('the inference request must be a JSON object with an "inputs" array of '
                           '{"name", "shape", "datatype", "data" or parameters.binary_data_size}')
    inputs = _parse_inputs(document["inputs"], binary)
    outputs = []
    for index, item in enumerate(document.get("outputs") or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PayloadError(f'outputs[{index}] must be an object with a "name"')
        params = _parameters(f"output {item['name']!r}", item.get("parameters"))
        binary_flag = params.get("binary_data")
        outputs.append(RequestedOutput(item["name"], None if binary_flag is None else bool(binary_flag), params))
    request_id = document.get("id", "")
    return InferRequest(model_name=model_name, model_version=model_version,
                        id=request_id if isinstance(request_id, str) else str(request_id),
                        parameters=_parameters("the request", document.get("parameters")),
                        inputs=inputs, outputs=outputs)


def _parse_inputs(items: list, binary: memoryview | bytes) -> list[Tensor]:
    inputs = []
    offset = 0
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PayloadError(f'inputs[{index}] must be an object with a "name", "shape", "datatype" and "data"')
        name = item["name"]
        datatype = check_datatype(name, item.get("datatype"))
        shape = check_shape(name, item.get("shape"))
        params = _parameters(f"input {name!r}", item.get("parameters"))
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise PayloadError(f"input {name!r}: binary_data_size must be a whole number of bytes, got {size!r}")
            if "data" in item:
                raise PayloadError(f"input {name!r} has both data and binary_data_size; send one")
            if offset + size > len(binary):
                raise PayloadError(f"input {name!r}: binary_data_size says {size} bytes from byte {offset} of the "
                                   f"binary data, but only {len(binary) - offset} are left after the JSON header; "
                                   f"make each binary_data_size the tensor's byte count")
            data = from_binary(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            data = from_json(name, datatype, shape, item["data"])
        else:
            raise PayloadError(f"input {name!r} has no data; send \"data\" or the binary_data_size parameter with "
                               f"the bytes after the JSON header")
        inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise PayloadError(f"the body has {len(binary)} bytes after the JSON header but the inputs' binary_data_size "
                           f"add up to {offset}; make them agree")
    return inputs


def encode_infer_response(response: InferResponse, request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON + binary outputs (each output asked for as
    binary data, or all with binary_data_output) with Inference-Header-Content-Length."""
    outputs_json = []
    blobs = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.binary_output(tensor.name):
            blob = to_binary(tensor.datatype, tensor.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_json(tensor.datatype, tensor.data)
        outputs_json.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        document["model_version"] = response.model_version
    if request.id:
        document["id"] = request.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs_json
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
