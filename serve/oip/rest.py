"""The REST wire of the Open Inference Protocol v2 (kserve `inference_rest.md`) with Triton's
binary tensor data extension (`extension_binary_data.md`): an infer request's bytes -> InferRequest,
an InferResponse -> bytes and headers. Ray-free; the router calls it."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Mapping

import numpy as np

from wire import PayloadError
from wire.request import InferRequest, InferResponse, RequestedOutput
from wire.tensors import Tensor, check_datatype, check_shape, from_binary, from_json, http_body, http_tensor_entries

HEADER_LENGTH = "inference-header-content-length"
# A request body over this is answered 413 before it is read whole; the router's default. Room for
# a batch of phone photos (3-8 MB each) in one request; larger bodies belong in several requests.
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
# The JSON part of a request (all of it, or the header before binary tensor data) is bounded before
# it is parsed: Python's parser builds an object per number (a JSON image is ~10x its pixels in
# memory) and recurses per nesting level (`[` x 100,000 is a RecursionError). OIP tensors nest at
# most as deep as their shape (a few levels) inside the request object; tensor data this large
# belongs in binary form (binary_data_size).
DEFAULT_MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
_DEPTH_CHUNK_BYTES = 4 * 2**20


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


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def check_body_size(length: int, max_body_bytes: int) -> None:
    if length > max_body_bytes:
        raise PayloadError(f"the request body is {length} bytes, over this server's limit of {max_body_bytes} "
                           f"bytes ({_mib(max_body_bytes)}, the router's max_body_bytes); send fewer samples per "
                           f"request or smaller images", status=413)


async def read_limited(chunks: AsyncIterator[bytes], content_length: str | None, max_body_bytes: int) -> bytes:
    """The whole body, or PayloadError 413 as soon as it is known to be over `max_body_bytes`: from
    its Content-Length before a byte is read, else (chunked) once the bytes read pass the limit."""
    if content_length is not None and content_length.strip().isdigit():
        check_body_size(int(content_length), max_body_bytes)
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_body_bytes:
            raise PayloadError(f"the request body passed this server's limit of {max_body_bytes} bytes "
                               f"({_mib(max_body_bytes)}, the router's max_body_bytes) while it was read; send "
                               f"fewer samples per request or smaller images", status=413)
        if chunk:
            parts.append(chunk)
    return b"".join(parts)


def json_depth(data: bytes) -> int:
    """How deeply a JSON text nests arrays and objects, counted without parsing it (brackets inside
    strings do not count), in C-speed passes. Escapes are removed first: every `\\` pair, then
    every `\"`; what remains of a backslash is outside any string, where JSON allows none (the
    parser refuses it there, before it nests any deeper than this count)."""
    clean = bytes(data).replace(b"\\\\", b"").replace(b'\\"', b"")
    view = np.frombuffer(clean, dtype=np.uint8)
    depth = deepest = 0
    in_string = False
    for start in range(0, len(view), _DEPTH_CHUNK_BYTES):
        chunk = view[start:start + _DEPTH_CHUNK_BYTES]
        inside = (np.cumsum(chunk == 34, dtype=np.uint8) & 1).astype(bool) ^ in_string  # 34: '"'
        step = ((chunk == 91) | (chunk == 123)).astype(np.int32) - ((chunk == 93) | (chunk == 125))  # [{ ]}
        step[inside] = 0
        running = np.cumsum(step, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        in_string = bool(inside[-1])
    return deepest


def check_json(data: bytes, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
               what: str = "the inference request's JSON") -> None:
    """PayloadError 400, naming the limit, for JSON too large or too deeply nested to parse safely."""
    if len(data) > max_json_bytes:
        raise PayloadError(f"{what} is {len(data)} bytes, over this server's limit of {max_json_bytes} bytes "
                           f"({_mib(max_json_bytes)}) of JSON; send tensor data as binary (Triton's binary tensor "
                           f"data extension: parameters.binary_data_size, and Inference-Header-Content-Length)")
    depth = json_depth(data)
    if depth > max_depth:
        raise PayloadError(f"{what} nests {depth} levels deep, over this server's limit of {max_depth}; nest "
                           f"tensor data as its shape, or send it flattened")


def parse_infer_request(model_name: str, body: bytes, headers: Mapping[str, str], model_version: str = "",
                        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> InferRequest:
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
    check_json(json_bytes, max_json_bytes)
    try:
        document = json.loads(json_bytes)
    except RecursionError:  # within MAX_JSON_DEPTH this cannot happen; a lowered recursion limit could
        raise PayloadError(f"the inference request's JSON nests too deeply to parse; keep it within "
                           f"{MAX_JSON_DEPTH} levels") from None
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
    outputs_json, blobs = http_tensor_entries(response.outputs, request.binary_output)
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        document["model_version"] = response.model_version
    if request.id:
        document["id"] = request.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs_json
    return http_body(json.dumps(document, separators=(",", ":")).encode(), blobs)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
