"""The Open Inference Protocol ingress: one Ray Serve deployment that owns every
`/inference.GRPCInferenceService/*` method and the REST `/v2/...` paths, and forwards each
request to the model it names by DeploymentHandle (docs/oip.md says why one ingress: Ray's gRPC
proxy picks an application by the `application` metadata key, which a stock tritonclient does not
send, and falls back to the only application that has a route).

The router parses and validates (serve/oip, Ray-free) and encodes the answer in the client's form;
the model's replica sees an InferRequest of numpy tensors and answers an InferResponse. The model
side of the contract, on each model deployment (named as its application, see serve/app.py):
  oip_metadata() -> dict    model_metadata(): name, inputs and outputs as TensorSpec fields
                            (name, datatype, shape, description, optional)
  oip_ready() -> bool       loaded and tuned
  oip_infer(InferRequest) -> InferResponse | InferFailure   (a failure, not an exception: it crosses
                            the actor boundary as a value and keeps its status and message)
  http(method, subpath, headers, body) -> (status, headers, body)   the simple routes (/resnet50...)
                            when the models sit behind this one ingress

Bodies: a request up to `max_body_bytes` (DEFAULT_MAX_BODY_BYTES, 64 MiB) reaches its
replica, and one over it is a JSON 413 before it is read whole (its Content-Length, or the bytes
counted as a chunked body streams in). Under `make serve`'s HAProxy ingress Ray Serve's handles
call replicas over gRPC, whose message limit (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, 4 MiB)
refused every larger body; a call carrying BY_REFERENCE_MIN_BYTES or more, or answering
BY_REFERENCE_MIN_SAMPLES or more samples, goes by Ray's actor path instead, its arguments through
the object store: that costs no more than gRPC with a raised limit (docs/benchmarks.md §10), and
a raised limit would need the same setting in every process. The one hop into the router
that Ray makes itself (its fallback proxy, behind HAProxy) gets the raised limit: `router_env`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wire import PayloadError, grpc_codec
from wire import grpc_predict_v2_pb2 as pb
from wire.request import InferFailure, InferRequest, InferResponse, select_outputs, validate

from ..api import costs
from ..replica.admission import REQUEST_BATCHES
from . import metadata, rest
from ..api.calls import ReplicaLost, call_model
from .shed import RouterShedder, Shed, content_length, shed_counter

log = logging.getLogger("ray.serve")

DEFAULT_READY_TIMEOUT_S = 2.0
DEFAULT_METADATA_TTL_S = 30.0
REPLICA_LOST_RETRY_AFTER_S = 2  # Serve notices a dead replica within its health check period (2 s)
# A call to a replica carrying this much, or answering this many samples, goes through the object
# store (the actor path) rather than Ray Serve's gRPC transport and its 4 MiB messages: well under
# the limit, where the two cost the same (docs/benchmarks.md §10), so no call nears it; and an
# answer of many samples (YOLO's keypoints) can pass 4 MiB from a small request.
BY_REFERENCE_MIN_BYTES = 2**20
BY_REFERENCE_MIN_SAMPLES = 64
ROUTER_GRPC_MARGIN_BYTES = 2**20  # a body's headers and its request's pickled envelope


def forward(handle, method: str, payload_bytes: int, samples: int = 1):
    """The handle method to call: by reference (object store) for a large call, else as configured."""
    if payload_bytes >= BY_REFERENCE_MIN_BYTES or samples >= BY_REFERENCE_MIN_SAMPLES:
        return handle.options(method_name=method, _by_reference=True)
    return getattr(handle, method)


class TensorDecl:
    """A model's declared tensor as the router reads it back from oip_metadata()."""

    def __init__(self, name: str, datatype: str, shape, description: str = "", optional: bool = False):
        self.name, self.datatype, self.shape = name, datatype, tuple(shape)
        self.description, self.optional = description, optional


class ModelDirectory:
    """Model name -> DeploymentHandle and its declared tensors (fetched once per TTL)."""

    def __init__(self, models: list[str], metadata_ttl_s: float = DEFAULT_METADATA_TTL_S):
        self.models = list(models)
        self._handles: dict[str, Any] = {}
        self._metadata: dict[str, tuple[float, dict]] = {}
        self._ttl_s = metadata_ttl_s

    def check_known(self, model: str | None) -> str:
        if model not in self.models:
            raise PayloadError(f"unknown model {model!r}; this server has: {', '.join(self.models)}", status=404)
        return model

    async def handle(self, model: str):
        self.check_known(model)
        if model not in self._handles:  # the controller lookup blocks: keep it off the event loop
            # A model is an application: its ingress deployment answers, whatever that deployment
            # is named (serve.app:build names it after the model family, not the application).
            try:
                self._handles[model] = await asyncio.to_thread(serve.get_app_handle, model)
            except (KeyError, RayServeException):
                raise PayloadError(f"model {model!r} is not deployed: the router serves it, but there is no "
                                   f"application {model!r} running; deploy it, or take it out of the router's "
                                   f"models", status=503) from None
        return self._handles[model]

    async def metadata(self, model: str) -> dict:
        cached = self._metadata.get(model)
        if cached and time.monotonic() - cached[0] < self._ttl_s:
            return cached[1]
        doc = await (await self.handle(model)).oip_metadata.remote()
        self._metadata[model] = (time.monotonic(), doc)
        return doc

    async def declared(self, model: str) -> tuple[list[TensorDecl], list[TensorDecl]]:
        doc = await self.metadata(model)
        return ([TensorDecl(**t) for t in doc["inputs"]], [TensorDecl(**t) for t in doc["outputs"]])

    async def ready(self, model: str, timeout_s: float) -> bool:
        try:
            handle = await self.handle(model)
            return bool(await asyncio.wait_for(handle.oip_ready.remote(), timeout_s))
        except PayloadError:
            raise
        except Exception:  # noqa: BLE001 - no replica yet, or one failing its start: not ready
            return False


def public_metadata(doc: dict) -> dict:
    """The OIP model metadata document (tensor name, datatype, shape; descriptions as properties)."""
    inputs = [TensorDecl(**t) for t in doc["inputs"]]
    outputs = [TensorDecl(**t) for t in doc["outputs"]]
    return metadata.model_metadata(doc["name"], inputs, outputs, doc.get("properties"))


def _json(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status)


class Refusal(PayloadError):
    """The model's replica refused the request with Retry-After (its admission, serve/replica/admission.py)."""

    def __init__(self, message: str, status: int, retry_after_s: float | None):
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


def _error(exc: PayloadError) -> JSONResponse:
    headers = {"retry-after": str(REPLICA_LOST_RETRY_AFTER_S)} if isinstance(exc, ReplicaLost) else None
    if isinstance(exc, Refusal) and exc.retry_after_s is not None:
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def _shed(exc: Shed) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@serve.deployment(max_ongoing_requests=1024)
class OipRouter:
    def __init__(self, models: list[str], max_body_bytes: int = rest.DEFAULT_MAX_BODY_BYTES,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S, metadata_ttl_s: float = DEFAULT_METADATA_TTL_S,
                 max_json_bytes: int = rest.DEFAULT_MAX_JSON_BYTES):
        if not models:
            raise ValueError("the OIP router needs the names of the model applications it serves (args: models)")
        self.directory = ModelDirectory(models, metadata_ttl_s)
        self.max_body_bytes = int(max_body_bytes)
        self.max_json_bytes = int(max_json_bytes)
        self.ready_timeout_s = float(ready_timeout_s)
        # each model's admission as its replicas' answers show it: what they would refuse is refused here
        self.shedder = RouterShedder(self.directory.models, counter=shed_counter())
        log.info("autobatch: OIP router: bodies up to %d bytes (max_body_bytes), JSON up to %d bytes and %d levels; "
                 "calls of %d bytes or %d samples and more go to replicas through the object store",
                 self.max_body_bytes, self.max_json_bytes, rest.MAX_JSON_DEPTH, BY_REFERENCE_MIN_BYTES,
                 BY_REFERENCE_MIN_SAMPLES)

    async def _read_body(self, request: Request) -> bytes:
        """The body, or PayloadError 413 before it is read whole (Content-Length, or counted as it streams)."""
        return await rest.read_limited(request.stream(), request.headers.get("content-length"), self.max_body_bytes)

    # ----- the protocol, wire-independent
    async def infer(self, request: InferRequest) -> InferResponse:
        model = self.directory.check_known(request.model_name)
        metadata.check_version(model, request.model_version)
        inputs, outputs = await self.directory.declared(model)
        validate(request, inputs, outputs)
        limit = (await self.directory.metadata(model)).get("max_request_samples")
        if limit is not None and request.samples > limit:  # before forwarding: the replica would refuse it too
            raise PayloadError(f"this request carries {request.samples} samples, over {model}'s limit of {limit} per "
                               f"request ({REQUEST_BATCHES} x its max batch of {limit // REQUEST_BATCHES}); split it "
                               f"into requests of at most {limit} samples", status=413)
        self.shedder.check(model, request.samples)  # the count is known now: refused before the forward
        shedder = self.shedder[model]
        handle = await self.directory.handle(model)
        with shedder.forwarding(request.samples):
            result = await call_model(model, forward(handle, "oip_infer", request.payload_bytes,
                                                     request.samples).remote(request))
        shedder.observe(result.admission)
        if isinstance(result, InferFailure):
            raise Refusal(result.message, result.status, result.retry_after_s)
        result.outputs = select_outputs(request, result.outputs)
        result.id = request.id
        return result

    async def server_ready(self) -> bool:
        states = await asyncio.gather(*(self.directory.ready(m, self.ready_timeout_s) for m in self.directory.models))
        return all(states)

    # ----- REST
    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):  # the OpenAI-compatible API, for the LLM apps
            from serve.api import openai_api

            return await openai_api.route(self.directory, request, self.max_body_bytes)
        if not path.startswith("/v2"):
            return await self._simple_route(request, path)
        try:
            route = metadata.match_route(request.method, path)
            return await self._rest(route, request)
        except PayloadError as exc:
            return _error(exc)
        except Shed as exc:
            return _shed(exc)

    async def _rest(self, route: metadata.Route, request: Request) -> Response:
        if route.kind == "live":
            return _json(200, {"live": True})
        if route.kind == "ready":
            ready = await self.server_ready()
            return _json(200 if ready else 503, {"ready": ready})
        if route.kind == "server_metadata":
            return _json(200, metadata.server_metadata())
        model = self.directory.check_known(route.model)
        metadata.check_version(model, route.version)
        if route.kind == "model_ready":
            ready = await self.directory.ready(model, self.ready_timeout_s)
            return _json(200 if ready else 503, {"name": model, "ready": ready})
        if route.kind == "model_metadata":
            return _json(200, public_metadata(await self.directory.metadata(model)))
        self.shedder.check_before_body(model, content_length(request.headers))  # 503 before reading it
        body = await self._read_body(request)  # 413 before reading it whole
        body_bytes = len(body)
        try:
            parsed = rest.parse_infer_request(model, body, request.headers, route.version or "", self.max_body_bytes,
                                              self.max_json_bytes)
            del body  # the tensors hold what they need of it
            self.shedder[model].observe_body(body_bytes, parsed.samples)
            response = await self.infer(parsed)
            content, headers = rest.encode_infer_response(response, parsed)
        finally:  # its buffers go back to the OS, answered or refused
            costs.released(body_bytes)
        return Response(content=content, status_code=200, headers=headers)

    async def _simple_route(self, request: Request, path: str) -> Response:
        """/<model>[/...]: the simple routes, forwarded unchanged to the model's replica."""
        parts = path.strip("/").split("/", 1)
        if not parts[0]:
            return _json(200, {"models": self.directory.models,
                               "usage": "POST /<model> with the payload (GET /<model> says what), or the Open "
                                        "Inference Protocol under /v2 and gRPC",
                               "shedding": self.shedder.describe()})
        try:
            handle = await self.directory.handle(parts[0])
        except PayloadError as exc:
            return _json(exc.status, {"error": exc.message})
        subpath = "/" + (parts[1] if len(parts) > 1 else "")
        shedder = self.shedder[parts[0]]
        # GET /<model>/tuning and a profile capture are never shed: they are how an overload is looked at
        samples = 1 if request.method == "POST" and subpath != "/profile" else 0
        body = b""
        try:
            if samples:
                self.shedder.check(parts[0], samples)  # before the body is read
            body = await self._read_body(request)
            if "json" in (request.headers.get("content-type") or "") and body:
                # depth only: a simple route's model bounds its own payload's size (413 naming its limit)
                rest.check_json(body, self.max_body_bytes, what="the request's JSON")
            with shedder.forwarding(samples):
                status, headers, content, *room = await call_model(
                    parts[0], forward(handle, "http", len(body)).remote(request.method, subpath, dict(request.headers),
                                                                       body))
        except PayloadError as exc:
            return _error(exc)
        except Shed as exc:
            return _shed(exc)
        finally:
            costs.released(len(body))
        shedder.observe(room[0] if room else None)
        return Response(content=content, status_code=status, headers=headers)

    # ----- gRPC: inference.GRPCInferenceService (method names are the RPC names)
    @staticmethod
    def _fail(grpc_context, exc: PayloadError, empty):
        grpc_context.set_code(grpc_codec.grpc_code(exc.status))
        grpc_context.set_details(exc.message)
        return empty

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context=None) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context=None) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=await self.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context=None) -> pb.ModelReadyResponse:  # noqa: N802
        try:
            model = self.directory.check_known(request.name)
            metadata.check_version(model, request.version)
            return pb.ModelReadyResponse(ready=await self.directory.ready(model, self.ready_timeout_s))
        except PayloadError as exc:
            return self._fail(grpc_context, exc, pb.ModelReadyResponse())

    async def ServerMetadata(self, request, grpc_context=None) -> pb.ServerMetadataResponse:  # noqa: N802
        return grpc_codec.server_metadata_proto(metadata.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context=None) -> pb.ModelMetadataResponse:  # noqa: N802
        try:
            model = self.directory.check_known(request.name)
            metadata.check_version(model, request.version)
            return grpc_codec.model_metadata_proto(public_metadata(await self.directory.metadata(model)))
        except PayloadError as exc:
            return self._fail(grpc_context, exc, pb.ModelMetadataResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context=None) -> pb.ModelInferResponse:  # noqa: N802
        try:
            parsed = grpc_codec.request_from_proto(request, self.max_body_bytes)
            return grpc_codec.response_to_proto(await self.infer(parsed))
        except PayloadError as exc:
            return self._fail(grpc_context, exc, pb.ModelInferResponse())
        except Shed as exc:  # UNAVAILABLE, the code a gRPC client retries
            return self._fail(grpc_context, PayloadError(exc.message, status=exc.status), pb.ModelInferResponse())


def build_router(args: dict):
    """`serve.oip.router:build_router` in serve_config.yaml: args {models: [...], max_body_bytes,
    max_json_bytes, num_replicas, num_cpus}."""
    args = dict(args or {})
    models = args.pop("models", None)
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    num_replicas = int(args.pop("num_replicas", 1))
    num_cpus = float(args.pop("num_cpus", 0.1))
    known = {"max_body_bytes", "max_json_bytes", "ready_timeout_s", "metadata_ttl_s"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown OIP router arg(s) {unknown}; use models, num_replicas, num_cpus, {', '.join(sorted(known))}")
    max_body_bytes = int(args.get("max_body_bytes", rest.DEFAULT_MAX_BODY_BYTES))
    actor_options = {"num_cpus": num_cpus, "runtime_env": {"env_vars": router_env(max_body_bytes)}}
    return OipRouter.options(num_replicas=num_replicas, ray_actor_options=actor_options).bind(models=models, **args)


def router_env(max_body_bytes: int) -> dict[str, str]:
    """The router replica's own gRPC server (Ray Serve's, between its processes) takes messages of
    a whole body: under the HAProxy ingress, HAProxy hands a request to Ray's fallback proxy when it
    finds the router busy or not yet registered, and that proxy forwards it over gRPC, which at
    Ray's 4 MiB refused every larger one. Calls the router makes go by reference instead (forward)."""
    return {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(max_body_bytes + ROUTER_GRPC_MARGIN_BYTES)}
