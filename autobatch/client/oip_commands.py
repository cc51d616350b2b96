"""`autobatch client --protocol v2` and `autobatch bench --protocol v2`: the Open Inference
Protocol side of the two commands (command.py and bench.py hand over here).

client: every INPUT of the command goes in ONE request (N samples), over HTTP or gRPC; the answer
is printed one line per sample. bench: each request carries --samples-per-request samples, made
once before the run (the load measures the server, not our encoder); samples/s counts samples.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from urllib.parse import urlsplit

from .http_client import route_path
from .load import BenchError
from .oip_client import V2Client, V2Error, per_sample, samples_request

DEFAULT_GRPC_URL = os.environ.get("AUTOBATCH_GRPC_URL", "127.0.0.1:9000")


def _read_inputs(items: list[str]) -> list:
    """Files as their bytes; anything that is no file is a prompt (text)."""
    return [open(item, "rb").read() if os.path.isfile(item) else item for item in items]


def target_url(args) -> str:
    return args.grpc_url if args.transport == "grpc" else args.url


def cmd_client_v2(args) -> int:
    if not args.inputs:
        print("autobatch client: error: give at least one INPUT (image files, or prompts for an LLM)", file=sys.stderr)
        return 2
    model = args.route.strip("/")

    async def go():
        async with V2Client(target_url(args), args.transport, timeout_s=args.timeout) as client:
            meta = await client.model_metadata(model)
            request = samples_request(model, meta, _read_inputs(args.inputs), max_tokens=args.max_new_tokens)
            return await client.infer(request)

    try:
        response = asyncio.run(go())
    except V2Error as exc:
        print(f"autobatch client: error {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"autobatch client: error: {type(exc).__name__}: {exc}; is the serve app running with the v2 "
              f"router (--url / --grpc-url)?", file=sys.stderr)
        return 2
    for item, row in zip(args.inputs, per_sample(response)):
        print(json.dumps({"input": item, "answer": row}) if args.json else f"{item}: {json.dumps(row)}")
    return 0


class V2Sender:
    """What `autobatch bench --protocol v2` sends: one prepared request per payload, cycled.
    Each send returns (status, ok, tokens, samples) for bench's Record."""

    def __init__(self, url: str, transport: str, model: str, payloads: list, samples_per_request: int,
                 max_tokens: int | None, timeout_s: float, connections: int):
        if samples_per_request < 1:
            raise ValueError(f"--samples-per-request must be at least 1, got {samples_per_request}")
        self.url, self.transport, self.model = url, transport, model
        self.payloads, self.samples = payloads, samples_per_request
        self.max_tokens, self.timeout_s, self.connections = max_tokens, timeout_s, connections
        self.client: V2Client | None = None
        self.prepared: list = []

    async def open(self) -> None:
        self.client = V2Client(self.url, self.transport, timeout_s=self.timeout_s, connections=self.connections)
        meta = await self.client.model_metadata(self.model)
        for start in range(len(self.payloads)):
            samples = [self.payloads[(start + i) % len(self.payloads)] for i in range(self.samples)]
            request = samples_request(self.model, meta, samples, max_tokens=self.max_tokens)
            self.prepared.append(self.client.prepare(request))

    async def send(self, index: int) -> tuple[str, bool, int | None, int]:
        try:
            response = await self.client.send(self.model, self.prepared[index % len(self.prepared)])
        except V2Error as exc:
            return str(exc.status), False, None, 0
        samples = response.outputs[0].shape[0] if response.outputs and response.outputs[0].shape else self.samples
        return "200", True, None, int(samples)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def check_loopback(url: str, allow_remote: bool) -> None:
    import ipaddress

    host = urlsplit(url if "://" in url else f"//{url}").hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"{url} is not a loopback address; load goes to 127.0.0.1/localhost unless you pass "
                         f"--allow-remote (only against servers you run)")


def v2_sender(args, payloads: list[tuple[bytes, str]]):
    """The Open Inference Protocol sender for --protocol v2: the payloads' bytes as samples (images;
    for an LLM, the prompt text out of the simple route's JSON)."""
    url = (args.grpc_url or DEFAULT_GRPC_URL) if args.transport == "grpc" else args.url
    try:
        check_loopback(url, args.allow_remote)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    samples = []
    for body, content_type in payloads:
        if content_type == "application/json":
            try:
                samples.append(json.loads(body)["prompt"])
                continue
            except (ValueError, KeyError, TypeError):
                pass
        samples.append(body)
    if args.samples_per_request < 1:
        raise BenchError(f"--samples-per-request must be at least 1, got {args.samples_per_request}")
    connections = args.concurrency if args.concurrency else args.max_in_flight if args.rate else 8
    return V2Sender(url, args.transport, route_path(args.route).strip("/"), samples, args.samples_per_request,
                    args.max_new_tokens, args.timeout, connections)
