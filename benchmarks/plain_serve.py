"""The baselines for the serving benchmark: the same ModelSpec (decode, predict, encode) served by plain
Ray Serve, as a user would write it without autobatch.

- PlainBatched: `@serve.batch` with its defaults (max_batch_size=10, batch_wait_timeout_s=0.01) and the
  deployment's default max_ongoing_requests=5 (which caps every batch at 5).
- Unbatched: one forward pass per request, max_ongoing_requests=5.

Only the batching differs from the autobatch deployment: both decode in a worker thread before
batching and run the forward pass in a single worker thread (so the event loop keeps accepting
requests), answer bad payloads with the spec's 4xx, and count the batches they form (GET /stats).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

RAY_BATCH_DEFAULTS = {"max_batch_size": 10, "batch_wait_timeout_s": 0.01}  # @serve.batch's defaults
RAY_MAX_ONGOING_DEFAULT = 5  # @serve.deployment's default max_ongoing_requests


class _SpecServer:
    """What both baselines share: load the spec on the replica's device, decode, count batches."""

    def __init__(self, model: str, options: dict | None = None, device: str = "auto"):
        import ray

        from deployments.registry import create_spec

        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.spec = create_spec(model, **(options or {}))
        self.device = "cuda:0" if device == "cuda" else "cpu"
        self.spec.load(self.device, self.spec.default_dtype("cuda" if device == "cuda" else "cpu"))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plain-forward")
        self.batch_sizes: Counter = Counter()

    def stats(self) -> dict:
        import torch

        return {"batches": sum(self.batch_sizes.values()),
                "samples_served": sum(k * v for k, v in self.batch_sizes.items()),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "device": self.device, "torch_threads": torch.get_num_threads()}

    async def decode(self, request: Request):
        from wire import PayloadError

        body = await request.body()
        try:
            return await asyncio.to_thread(self.spec.decode, body, request.headers.get("content-type")), None
        except PayloadError as exc:
            return None, JSONResponse({"error": exc.message}, status_code=exc.status)

    async def forward(self, samples: list) -> list:
        self.batch_sizes[len(samples)] += 1
        outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.spec.predict, samples)
        return [json.dumps(self.spec.encode(o)).encode() for o in outputs]

    async def handle(self, request: Request, infer):
        if request.method == "GET":
            path = request.url.path.rstrip("/")
            if path.endswith("/stats"):
                return JSONResponse(self.stats())
            return JSONResponse({"model": self.spec.name, "device": self.device})
        sample, error = await self.decode(request)
        if error is not None:
            return error
        return Response(content=await infer(sample), media_type="application/json")


@serve.deployment(max_ongoing_requests=RAY_MAX_ONGOING_DEFAULT)
class PlainBatched(_SpecServer):
    async def __call__(self, request: Request):
        return await self.handle(request, self.infer)

    @serve.batch(**RAY_BATCH_DEFAULTS)
    async def infer(self, samples: list) -> list:
        return await self.forward(samples)


@serve.deployment(max_ongoing_requests=RAY_MAX_ONGOING_DEFAULT)
class Unbatched(_SpecServer):
    async def __call__(self, request: Request):
        return await self.handle(request, self.infer)

    async def infer(self, sample) -> bytes:
        return (await self.forward([sample]))[0]
