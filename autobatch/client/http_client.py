"""A small HTTP client for the autobatch serve app's simple routes, from Python (sync and async);
`autobatch client` (autobatch/client/command.py) is the same from a shell.

    from autobatch.client.http_client import Client
    with Client() as c:                                   # default: the local app, http://127.0.0.1:8000
        c.predict("resnet50", "cat.jpg")                  # a path: the file's bytes, type sniffed
        c.predict("llama_int4", "Once upon a time", max_new_tokens=16)   # not a path: a prompt
        c.tuning("resnet50")                              # GET /resnet50/tuning

    async with AsyncClient() as c:
        answers = await c.predict_many("resnet50", ["a.jpg", "b.png"])   # sent together: they batch

    autobatch client resnet50 cat.jpg dog.png [--url URL]
    autobatch client llama_int4 "Once upon a time" --max-new-tokens 16
    autobatch client resnet50 --tuning

No Ray import here: the client only speaks HTTP (httpx).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from typing import Any, Iterable
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = os.environ.get("AUTOBATCH_URL", "http://127.0.0.1:8000")
DEFAULT_TIMEOUT_S = 300.0  # a batch of LLM generations on a CPU can take tens of seconds


class ClientError(Exception):
    """The app answered with an error status (4xx/5xx); `message` is its {"error": ...} text."""

    def __init__(self, status: int, message: str, route: str = ""):
        super().__init__(f"{route}: HTTP {status}: {message}" if route else f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.route = route


class Unreachable(ClientError):
    """No HTTP answer at all (connection refused, timeout)."""

    def __init__(self, url: str, exc: BaseException):
        super().__init__(0, f"could not reach {url} ({type(exc).__name__}: {exc}); is the serve app running "
                            f"(`serve run serve_config.yaml`)? Give another address with --url")
        self.url = url

    def __str__(self) -> str:
        return self.message


def is_loopback(url: str) -> bool:
    """Whether `url` (http://host:port/... or a bare host:port, as gRPC takes) names this machine."""
    host = (urlsplit(url).hostname if "//" in url else urlsplit("//" + url).hostname) or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_refusal(url: str, allow_remote: bool, what: str = "--url") -> str | None:
    """Why a command-line client does not send to `url`, or None. The serve app has no authentication
    and the simple routes and OIP speak plain HTTP/gRPC, so images and prompts would cross the network
    in clear to whoever answers there: that takes an explicit --allow-remote."""
    if allow_remote or is_loopback(url):
        return None
    return (f"{what} {url} is not a loopback address; inputs go to 127.0.0.1/localhost unless you pass "
            f"--allow-remote (they cross the network unencrypted and unauthenticated)")


def route_path(route: str) -> str:
    """'resnet50', '/resnet50' or '/resnet50/' -> '/resnet50'."""
    route = (route or "").strip().strip("/")
    if not route:
        raise ValueError("empty route; give the model's route, e.g. resnet50")
    return "/" + route


def sniff_content_type(data: bytes) -> str:
    """The content type of a payload from its first bytes (the server checks it again)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"GIF8",):
        return "image/gif"
    if data.lstrip()[:1] in (b"{", b"["):
        return "application/json"
    return "application/octet-stream"


def make_payload(item: Any, *, content_type: str | None = None, max_new_tokens: int | None = None) -> tuple[bytes, str]:
    """What to POST for one input: (body, content type).

    bytes -> as is; a dict -> JSON; a path to an existing file -> its bytes; any other string -> a
    prompt, sent as {"prompt": ..., "max_new_tokens": ...} (the LLM route's request)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        body = bytes(item)
    elif isinstance(item, dict):
        body = json.dumps(item).encode()
        content_type = content_type or "application/json"
    elif isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
        with open(item, "rb") as f:
            body = f.read()
    elif isinstance(item, str):
        prompt = {"prompt": item}
        if max_new_tokens is not None:
            prompt["max_new_tokens"] = int(max_new_tokens)
        body = json.dumps(prompt).encode()
        content_type = content_type or "application/json"
    else:
        raise TypeError(f"cannot send {type(item).__name__}; give bytes, a file path, a prompt string or a dict")
    return body, content_type or sniff_content_type(body)


def _answer(response: httpx.Response, route: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        message = body.get("error") if isinstance(body, dict) and body.get("error") else response.text[:500]
        raise ClientError(response.status_code, message or response.reason_phrase, route)
    if body is None:
        raise ClientError(response.status_code, f"the answer is not JSON: {response.text[:200]!r}", route)
    return body


class Client:
    """Synchronous client. Raises ClientError (HTTP status + the app's message) or Unreachable."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT_S, **httpx_options):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, **httpx_options)

    def _send(self, method: str, route: str, path: str = "", **kwargs) -> dict:
        route = route_path(route)
        try:
            response = self._http.request(method, route + path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, exc) from None
        return _answer(response, route)

    def predict(self, route: str, item: Any, *, content_type: str | None = None,
                max_new_tokens: int | None = None, headers: dict | None = None) -> dict:
        body, ctype = make_payload(item, content_type=content_type, max_new_tokens=max_new_tokens)
        return self._send("POST", route, content=body, headers={"content-type": ctype, **(headers or {})})

    def predict_many(self, route: str, items: Iterable[Any], **kwargs) -> list:
        """One after another; each entry is the answer or the ClientError it raised."""
        out = []
        for item in items:
            try:
                out.append(self.predict(route, item, **kwargs))
            except ClientError as exc:
                out.append(exc)
        return out

    def tuning(self, route: str) -> dict:
        return self._send("GET", route, "/tuning")

    def describe(self, route: str) -> dict:
        return self._send("GET", route, "/")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same calls, async; predict_many sends all inputs at once, so the replica can batch them."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT_S, **httpx_options):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, **httpx_options)

    async def _send(self, method: str, route: str, path: str = "", **kwargs) -> dict:
        route = route_path(route)
        try:
            response = await self._http.request(method, route + path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, exc) from None
        return _answer(response, route)

    async def predict(self, route: str, item: Any, *, content_type: str | None = None,
                      max_new_tokens: int | None = None, headers: dict | None = None) -> dict:
        body, ctype = make_payload(item, content_type=content_type, max_new_tokens=max_new_tokens)
        return await self._send("POST", route, content=body, headers={"content-type": ctype, **(headers or {})})

    async def predict_many(self, route: str, items: Iterable[Any], **kwargs) -> list:
        """Concurrently; each entry (in input order) is the answer or the ClientError it raised."""

        async def one(item):
            try:
                return await self.predict(route, item, **kwargs)
            except ClientError as exc:
                return exc

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def tuning(self, route: str) -> dict:
        return await self._send("GET", route, "/tuning")

    async def describe(self, route: str) -> dict:
        return await self._send("GET", route, "/")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
