"""An Open Inference Protocol v2 client over HTTP (JSON or binary tensor data) and gRPC, for
`autobatch client --protocol v2` and `autobatch bench --protocol v2`. Ray-free; tritonclient is
not needed (it is what the tests check the server against).

    async with V2Client("http://127.0.0.1:8000") as c:            # or V2Client("127.0.0.1:9000", transport="grpc")
        meta = await c.model_metadata("resnet50")
        request = samples_request("resnet50", meta, [open("cat.jpg", "rb").read()] * 32)
        response = await c.infer(request)                          # InferResponse, numpy outputs
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from wire.request import InferRequest, InferResponse, RequestedOutput
from wire.tensors import Tensor, from_binary, from_json, http_body, http_tensor_entries

TRANSPORTS = ("http", "grpc")


class V2Error(Exception):
    """The server refused a request: `status` (HTTP status, or the gRPC code's name) and its message."""

    def __init__(self, status: int | str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def samples_request(model: str, meta: dict, samples: Sequence[Any], max_tokens: int | None = None,
                    binary_output: bool = True) -> InferRequest:
    """One request carrying `samples` in the model's first BYTES input (encoded images, prompts),
    plus `max_tokens` where the model declares it. The model's metadata says which input that is."""
    target = next((t for t in meta["inputs"] if t["datatype"] == "BYTES"), None)
    if target is None:
        raise ValueError(f"model {model!r} has no BYTES input to carry files or prompts; its inputs are "
                         f"{[(t['name'], t['datatype'], t['shape']) for t in meta['inputs']]}")
    data = np.empty(len(samples), dtype=object)
    data[:] = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in samples]
    inputs = [Tensor(target["name"], "BYTES", (len(samples),), data)]
    declared = {t["name"]: t for t in meta["inputs"]}
    if max_tokens is not None and "max_tokens" in declared:
        dtype = {"INT32": np.int32, "INT64": np.int64}.get(declared["max_tokens"]["datatype"], np.int32)
        inputs.append(Tensor("max_tokens", declared["max_tokens"]["datatype"], (len(samples),),
                             np.full(len(samples), max_tokens, dtype=dtype)))
    outputs = [RequestedOutput(t["name"], binary_output) for t in meta["outputs"]]
    return InferRequest(model, inputs, outputs=outputs)


def per_sample(response: InferResponse) -> list[dict]:
    """The response as one dict per sample: output name -> that sample's row (bytes as text)."""
    rows = []
    count = response.outputs[0].shape[0] if response.outputs and response.outputs[0].shape else 0
    for index in range(count):
        row = {}
        for tensor in response.outputs:
            value = tensor.data[index]
            if tensor.datatype == "BYTES":
                value = (np.vectorize(lambda b: bytes(b).decode("utf-8", "replace"), otypes=[object])(value).tolist()
                         if isinstance(value, np.ndarray) else bytes(value).decode("utf-8", "replace"))
            else:
                value = np.asarray(value).tolist()
            row[tensor.name] = value
        rows.append(row)
    return rows


def encode_http_request(request: InferRequest, binary_input: bool = True) -> tuple[bytes, dict[str, str]]:
    """The request body and headers a tritonclient would send (binary inputs after the JSON)."""
    items, blobs = http_tensor_entries(request.inputs, lambda name: binary_input)
    document: dict[str, Any] = {"inputs": items}
    if request.id:
        document["id"] = request.id
    if request.outputs:
        document["outputs"] = [{"name": o.name, **({"parameters": {"binary_data": o.binary}} if o.binary is not None else {})}
                               for o in request.outputs]
    return http_body(json.dumps(document).encode(), blobs)


def decode_http_response(model: str, body: bytes, headers) -> InferResponse:
    length = headers.get("inference-header-content-length")
    header, binary = (body, b"") if length is None else (body[:int(length)], memoryview(body)[int(length):])
    document = json.loads(header)
    outputs, offset = [], 0
    for item in document.get("outputs", []):
        shape = tuple(item["shape"])
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            data = from_binary(item["name"], item["datatype"], shape, binary[offset:offset + size])
            offset += size
        else:
            data = from_json(item["name"], item["datatype"], shape, item["data"])
        outputs.append(Tensor(item["name"], item["datatype"], shape, data))
    return InferResponse(document.get("model_name", model), outputs, document.get("model_version", ""),
                         document.get("id", ""))


class V2Client:
    """Async OIP client. `url`: http://host:port for HTTP, host:port for gRPC."""

    def __init__(self, url: str, transport: str = "http", timeout_s: float = 300.0, connections: int = 64):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.url, self.transport, self.timeout_s = url.rstrip("/"), transport, timeout_s
        if transport == "http":
            import httpx

            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, limits=limits, trust_env=False)
        else:
            import grpc

            from wire import grpc_predict_v2_pb2_grpc

            target = self.url.split("://", 1)[-1]
            self._channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                                       ("grpc.max_receive_message_length", -1)])
            self._stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    # ----- HTTP
    async def _get(self, path: str) -> dict:
        response = await self._http.get(path)
        body = response.json() if response.content else {}
        if response.status_code >= 400:
            raise V2Error(response.status_code, body.get("error", response.text) if isinstance(body, dict) else response.text)
        return body

    async def post_infer(self, model: str, body: bytes, headers: dict[str, str]) -> InferResponse:
        response = await self._http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise V2Error(response.status_code, message)
        return decode_http_response(model, response.content, response.headers)

    # ----- gRPC
    async def _call(self, method: str, message):
        import grpc

        try:
            return await getattr(self._stub, method)(message, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise V2Error(exc.code().name, exc.details() or "") from None

    async def call_infer(self, message) -> InferResponse:
        from wire.grpc_codec import response_from_proto

        return response_from_proto(await self._call("ModelInfer", message))

    # ----- the protocol
    async def server_metadata(self) -> dict:
        if self.transport == "http":
            return await self._get("/v2")
        from wire import grpc_predict_v2_pb2 as pb

        m = await self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": m.name, "version": m.version, "extensions": list(m.extensions)}

    async def model_metadata(self, model: str) -> dict:
        if self.transport == "http":
            return await self._get(f"/v2/models/{model}")
        from wire import grpc_predict_v2_pb2 as pb

        m = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=model))
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return {"name": m.name, "versions": list(m.versions), "platform": m.platform,
                "inputs": tensors(m.inputs), "outputs": tensors(m.outputs), "properties": dict(m.properties)}

    async def model_ready(self, model: str) -> bool:
        if self.transport == "http":
            response = await self._http.get(f"/v2/models/{model}/ready")
            return response.status_code == 200
        from wire import grpc_predict_v2_pb2 as pb

        return (await self._call("ModelReady", pb.ModelReadyRequest(name=model))).ready

    def prepare(self, request: InferRequest, binary: bool = True):
        """The request in this transport's wire form, made once (bench sends it many times)."""
        if self.transport == "http":
            return encode_http_request(request, binary_input=binary)
        from wire.grpc_codec import request_to_proto

        return request_to_proto(request)

    async def send(self, model: str, prepared) -> InferResponse:
        if self.transport == "http":
            body, headers = prepared
            return await self.post_infer(model, body, headers)
        return await self.call_infer(prepared)

    async def infer(self, request: InferRequest, binary: bool = True) -> InferResponse:
        return await self.send(request.model_name, self.prepare(request, binary))

    async def aclose(self) -> None:
        if self.transport == "http":
            await self._http.aclose()
        else:
            await self._channel.close()

    async def __aenter__(self) -> "V2Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
