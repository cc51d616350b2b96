"""An OpenAI-compatible API for the LLM apps: what the `openai` SDK, LangChain's OpenAI
wrapper and `curl -N` expect.

  GET  /v1/models             the router's models that generate text
  POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
  POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ... as above}

`stream: true` answers with server-sent events (`data: {chunk}` ... `data: [DONE]`), streamed from the
replica through the router (a DeploymentHandle with stream=True into a StreamingResponse); a client
that goes away cancels the handle call, which cancels its sequence in the scheduler. Bad input gets
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with a 4xx; a full KV cache a
503 with Retry-After.

Two halves: `route()` runs in the router (serve/oip/router.py hands it every /v1 path: it reads only
`model` and `stream`), `OpenAIServing` in the model's replica (the request's meaning, its limits
and the generation, on the replica's scheduler: continuous, or the static batches).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.llama_int4 import Prompt
from deployments.llama_scheduler import Sampling
from wire import PayloadError

from ..replica.batcher import Entry
from ..replica.llm import KvCacheFull

log = logging.getLogger("ray.serve")

PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user"}
FIELDS = {"completions": COMMON_FIELDS | {"prompt"},
          "chat": COMMON_FIELDS | {"messages", "max_completion_tokens"}}
ROLES = ("system", "user", "assistant", "developer")
MAX_STOP = 4


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, exc: PayloadError, param: str | None = None) -> "OpenAIError":
        if isinstance(exc, KvCacheFull):
            return cls(503, exc.message, None, "kv_cache_full", "server_error", {"retry-after": str(exc.retry_after_s)})
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return cls(exc.status, exc.message, param, None, kind)


def _loads(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OpenAIError(400, f"the body is not JSON ({type(exc).__name__}); send a JSON object as OpenAI's API "
                               f"reference describes") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


# ============================================================================ the router's half
async def route(directory, request: Request, max_body_bytes: int) -> Response:
    """One /v1 request at the router: list the models, or forward a completion to the model named."""
    from .calls import ReplicaLost, call_model

    path = "/" + request.url.path.strip("/")
    try:
        if path == "/v1/models":
            if request.method not in ("GET", "HEAD"):
                raise OpenAIError(405, f"{request.method} /v1/models is not served; use GET")
            return JSONResponse({"object": "list", "data": await _models(directory)})
        kind = PATHS.get(path)
        if kind is None:
            raise OpenAIError(404, f"no such path {path!r}; this server has GET /v1/models, POST /v1/completions and "
                                   f"POST /v1/chat/completions", code="unknown_url")
        if request.method != "POST":
            raise OpenAIError(405, f"{request.method} {path} is not served; use POST")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise OpenAIError(413, f"the body is {declared} bytes, over the limit of {max_body_bytes}; send a shorter prompt")
        body = await request.body()
        data = _loads(body)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, 'missing "model"; GET /v1/models lists them', param="model")
        try:
            handle = await directory.handle(model)
        except PayloadError as exc:
            raise OpenAIError(404 if exc.status == 404 else exc.status, exc.message, "model",
                              "model_not_found" if exc.status == 404 else None) from None
        if data.get("stream") is True:
            return await _stream(model, handle, kind, body)
        status, headers, content = await call_model(model, handle.openai.remote(kind, model, body))
        return Response(content, status_code=status, headers=headers, media_type="application/json")
    except OpenAIError as exc:
        return exc.response()
    except ReplicaLost as exc:
        return OpenAIError(503, exc.message, kind="server_error", headers={"retry-after": "2"}).response()


async def _models(directory) -> list[dict]:
    out = []
    for model in directory.models:
        try:
            handle = await directory.handle(model)
            card = await handle.openai_model.remote()
        except Exception:  # noqa: BLE001 - not deployed, or a model that does not generate text
            continue
        if card:
            out.append({"id": model, "object": "model", "created": int(card.get("created", 0)), "owned_by": "autobatch",
                        **{k: v for k, v in card.items() if k != "created"}})
    return out


async def _stream(model: str, handle, kind: str, body: bytes) -> Response:
    """The replica's events into a StreamingResponse; its first item says whether the request was taken."""
    gen = handle.options(stream=True).openai_stream.remote(kind, model, body)
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        return OpenAIError(500, "the model's stream ended before it answered", kind="server_error").response()
    if isinstance(first, tuple):  # (status, headers, body): refused before any token
        gen.cancel()
        status, headers, content = first
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    async def events() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in gen:
                yield chunk
        finally:  # the client left (or the stream ended): stop the replica's generator and its sequence
            gen.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# ============================================================================ the replica's half
class OpenAIServing:
    """`replica` is the model's serve.replica.replica.Replica (the static path: `Replica.submit`, one request at a time)."""

    def __init__(self, replica):
        self._replica = replica
        self.created = int(time.time())

    def card(self) -> dict | None:
        spec = self._replica.spec
        if not hasattr(spec, "chat_ids"):
            return None
        return {"created": self.created, "max_model_len": spec.max_prompt_tokens + spec.max_new_tokens,
                "max_tokens": spec.max_new_tokens, "weights": spec.weights_description(),
                "scheduler": getattr(spec, "scheduler_kind", "static")}

    # --- the request's meaning
    def parse(self, kind: str, body: bytes) -> tuple[Prompt, Sampling, list[str], dict]:
        spec = self._replica.spec
        if not hasattr(spec, "chat_ids"):
            raise OpenAIError(404, f"{self._replica.model_name} does not generate text; the OpenAI API serves the LLM apps",
                              "model", "model_not_found")
        data = _loads(body)
        unknown = sorted(set(data) - FIELDS[kind])
        if unknown:
            raise OpenAIError(400, f"unrecognized request argument(s) {', '.join(unknown[:5])}; this server takes "
                                   f"{', '.join(sorted(FIELDS[kind]))}", unknown[0])
        if data.get("n", 1) != 1:
            raise OpenAIError(400, '"n" must be 1: one choice per request', "n")
        name = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
        new_tokens = data.get(name, 16 if kind == "completions" else spec.default_new_tokens)
        if new_tokens is None:
            new_tokens = spec.default_new_tokens
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= spec.max_new_tokens:
            raise OpenAIError(400, f'"{name}" must be a whole number from 1 to {spec.max_new_tokens} (this deployment\'s '
                                   f"max_new_tokens), got {new_tokens!r}", name)
        sampling = Sampling(self._number(data, "temperature", 1.0, 0.0, 2.0), self._number(data, "top_p", 1.0, 0.0, 1.0),
                            self._seed(data))
        if sampling.top_p <= 0:
            raise OpenAIError(400, '"top_p" must be above 0 (1 keeps every token)', "top_p")
        stop = self._stop(data.get("stop"))
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise OpenAIError(400, '"stream_options" must be an object such as {"include_usage": true}', "stream_options")
        try:
            if kind == "completions":
                prompt = data.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise OpenAIError(400, '"prompt" must be a string (or a list of one string)', "prompt")
                parsed = spec._prompt(prompt, new_tokens, '{"model", "prompt": "<text>", "max_tokens"}',
                                      ("prompt", name))
            else:
                parsed = spec.checked_ids(spec.chat_ids(self._messages(data.get("messages"))), new_tokens, ("messages", name))
        except PayloadError as exc:
            status = 400 if exc.status == 422 else exc.status
            raise OpenAIError(status, exc.message, "messages" if kind == "chat" else "prompt") from None
        return parsed, sampling, stop, {"include_usage": bool(options.get("include_usage"))}

    @staticmethod
    def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
        value = data.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise OpenAIError(400, f'"{key}" must be a number from {low:g} to {high:g}, got {value!r}', key)
        return float(value)

    @staticmethod
    def _seed(data: dict) -> int | None:
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise OpenAIError(400, f'"seed" must be a whole number, got {seed!r}', "seed")
        return seed

    @staticmethod
    def _stop(stop) -> list[str]:
        if stop is None:
            return []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise OpenAIError(400, f'"stop" must be a non-empty string or a list of at most {MAX_STOP} of them', "stop")
        return stop

    @staticmethod
    def _messages(messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, '"messages" must be a non-empty list of {"role", "content"}', "messages")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise OpenAIError(400, f"messages[{i}] must be an object with a role of {', '.join(ROLES)}", f"messages[{i}]")
            content = message.get("content")
            if isinstance(content, list):  # content parts: the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise OpenAIError(400, f"messages[{i}].content parts must be text ({{\"type\": \"text\", \"text\": ...}}); "
                                           f"this model reads text only", f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise OpenAIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
        return out

    # --- generation on either scheduler
    async def _deltas(self, prompt: Prompt, sampling: Sampling, stop: list[str]):
        """(text, completion_tokens, finish_reason or None) as the scheduler produces them."""
        llm = self._replica.llm
        if llm is not None:
            async for delta in llm.stream(prompt.input_ids, prompt.max_new_tokens, sampling, stop):
                yield delta.text, delta.completion_tokens, delta.finish_reason
            return
        if not sampling.greedy:
            raise OpenAIError(400, "this deployment runs the static scheduler, which generates greedily; send "
                                   '"temperature": 0, or serve it with options {scheduler: continuous}', "temperature")
        outcome = (await self._replica.submit(Entry([prompt])))[0]
        if not outcome.ok:
            message = json.loads(outcome.body).get("error", "generation failed")
            raise OpenAIError(outcome.status, message, kind="server_error" if outcome.status >= 500 else "invalid_request_error")
        result = json.loads(outcome.body)
        text, reason = result["text"], result["finish_reason"]
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        yield text, result["completion_tokens"], reason

    def _shape(self, kind: str, model: str, rid: str, created: int, text: str, reason, usage=None, first=False) -> dict:
        if kind == "completions":
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        elif usage is not None and text is None:  # the whole chat answer
            choice = {"index": 0, "message": {"role": "assistant", "content": reason[0]}, "finish_reason": reason[1],
                      "logprobs": None}
            out = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice]}
        else:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def _usage(prompt: Prompt, completion_tokens: int) -> dict:
        return {"prompt_tokens": len(prompt.input_ids), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt.input_ids) + completion_tokens}

    async def answer(self, kind: str, model: str, body: bytes) -> tuple[int, dict, bytes]:
        """A whole completion: (status, headers, JSON body)."""
        try:
            prompt, sampling, stop, _ = self.parse(kind, body)
            parts, tokens, reason = [], 0, None
            async for text, tokens, reason in self._deltas(prompt, sampling, stop):
                parts.append(text)
        except PayloadError as exc:
            return self._error(OpenAIError.of(exc))
        except OpenAIError as exc:
            return self._error(exc)
        rid = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        usage = self._usage(prompt, tokens)
        if kind == "completions":
            doc = self._shape(kind, model, rid, int(time.time()), "".join(parts), reason, usage)
        else:
            doc = self._shape(kind, model, rid, int(time.time()), None, ("".join(parts), reason), usage)
        return 200, {}, json.dumps(doc).encode()

    def _error(self, exc: OpenAIError) -> tuple[int, dict, bytes]:
        self._replica.count_error(exc.status)
        return exc.status, exc.headers, json.dumps(exc.body()).encode()

    async def stream(self, kind: str, model: str, body: bytes) -> AsyncIterator:
        """Server-sent events; the first item is a (status, headers, body) tuple instead when the request is refused."""
        try:
            prompt, sampling, stop, options = self.parse(kind, body)
            deltas = self._deltas(prompt, sampling, stop)
            first = await deltas.__anext__()  # admission and the first token, before any 200 is sent
        except PayloadError as exc:
            yield self._error(OpenAIError.of(exc))
            return
        except OpenAIError as exc:
            yield self._error(exc)
            return
        rid = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def event(doc: dict) -> bytes:
            return b"data: " + json.dumps(doc).encode() + b"\n\n"

        tokens, reason = first[1], first[2]
        try:
            yield event(self._shape(kind, model, rid, created, first[0], reason, first=True))
            if reason is None:
                async for text, tokens, reason in deltas:
                    yield event(self._shape(kind, model, rid, created, text, reason))
        except (PayloadError, OpenAIError, RuntimeError) as exc:  # after the 200: an error event, as OpenAI sends
            message = exc.message if isinstance(exc, (PayloadError, OpenAIError)) else str(exc)
            yield event({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        finally:
            await deltas.aclose()  # cancelled or done: the sequence leaves the scheduler
        if options["include_usage"]:
            usage = {"id": rid, "object": "text_completion" if kind == "completions" else "chat.completion.chunk",
                     "created": created, "model": model, "choices": [], "usage": self._usage(prompt, tokens)}
            yield event(usage)
        yield b"data: [DONE]\n\n"
