"""The batched Ray Serve deployment that serves every model family (any ModelSpec): Ray glue only.

It reads what only Ray knows (the GPU ids it was given, the deployment's user_config and
max_ongoing_requests) and hands them to the replica. What a replica does lives in plain modules:
  serve/replica/replica.py     tuning, warm-up, running batches, what GET /tuning shows
  serve/replica/batcher.py     how requests become device batches: the size, the wait, the slots, the queue
  serve/replica/settings.py    ReplicaSettings (what this class is bound with), the user_config layer, the
                               batch size and wait in force
  serve/api/routes.py          the HTTP routes (directly, or through the OIP router's `http`)
  serve/api/tensor_routes.py   the Open Inference Protocol requests the OIP router forwards, many samples each
  serve/api/openai_api.py      the OpenAI API's replica half (OpenAIServing)
  serve/replica/: batch_runner.py, warmup.py, stats.py, metrics.py, faults.py; the wait: optimizer/wait.py

user_config keys (reconfigure): latency_budget_ms, memory_fraction, max_batch (re-tune, cache first),
batch_size / batch_wait_timeout_ms (pin; null or absent: the tuned value), retune (a new truthy
value re-tunes the running replicas, skipping the cache; replicas started later take the cache),
faults (test hooks, accepted only with AUTOBATCH_TEST_FAULTS=1, see serve/replica/faults.py).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

from wire.request import InferFailure, InferRequest, InferResponse  # noqa: E402

from ..replica.replica import Replica  # noqa: E402
from ..api.routes import HttpRoutes  # noqa: E402
from ..replica.settings import (TUNING_KEYS, USER_CONFIG_KEYS, ReplicaConfig, ReplicaSettings,  # noqa: E402,F401
                                memory_fraction_for, parse_user_config)
from ..api.openai_api import OpenAIServing  # noqa: E402
from ..api.tensor_routes import TensorRoutes  # noqa: E402


def _initial_user_config():
    try:
        return serve.get_replica_context()._deployment_config.user_config
    except Exception:  # noqa: BLE001 - private field; without it the first reconfigure tunes again
        return None


def _gpu_ids() -> list:
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return []


def _assigned_cpus() -> float | None:
    """The CPUs Ray gave this replica (num_cpus), None outside a Ray worker."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)) or None
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return None


def _cpu_share() -> float | None:
    """This replica's CPUs as a share of its node's (serve/replica/budgets.py: its default memory share)."""
    import ray

    try:
        context = ray.get_runtime_context()
        assigned = float(context.get_assigned_resources().get("CPU", 0.0))
        node = next(n for n in ray.nodes() if n.get("NodeID") == context.get_node_id())
        node_cpus = float(node["Resources"].get("CPU", 0.0))
        return assigned / node_cpus if assigned > 0 and node_cpus > 0 else None
    except Exception:  # noqa: BLE001 - outside a Ray worker: no share known, the optimizer's default
        return None


@serve.deployment
class AutobatchDeployment:
    async def __init__(self, settings: ReplicaSettings, gpu_share: float = 1.0):
        builder = ReplicaConfig.placed(settings, gpu_share=float(gpu_share), cpu_share=_cpu_share())
        # The initial user_config (Ray calls reconfigure with it right after __init__): applied now,
        # so a replica tunes once, with the settings it will serve under.
        config = builder.with_user_config(_initial_user_config())
        self.replica = Replica(builder, config, max_ongoing=self._max_ongoing_requests,
                               cpus=_assigned_cpus(), autoscaling=self._autoscaling_config)
        await self.replica.start(_gpu_ids())
        self._routes = HttpRoutes(self.replica)
        self._tensors = TensorRoutes(self.replica)
        self._openai = OpenAIServing(self.replica)

    def _max_ongoing_requests(self) -> int | None:
        try:
            return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
        except Exception:  # noqa: BLE001 - private field; the builder's value is the same unless changed since
            return self.replica.builder.max_ongoing_requests

    def _autoscaling_config(self):
        try:
            return serve.get_replica_context()._deployment_config.autoscaling_config
        except Exception:  # noqa: BLE001 - private field; only GET /tuning's report lacks it
            return None

    def record_autoscaling_stats(self) -> dict:
        """Ray's custom autoscaling metrics hook: this replica's derived target and the samples it holds,
        for serve/replica/autoscaling.py's policy in the controller."""
        return self.replica.autoscaling_stats()

    async def reconfigure(self, user_config: dict) -> None:
        await self.replica.reconfigure(user_config)

    def check_health(self) -> None:
        self.replica.check_health()

    async def __call__(self, request: Request):
        return await self._routes.handle(request)

    # ----- what the OIP router (serve/oip/router.py) calls by handle, the models behind it
    async def oip_metadata(self) -> dict:
        return self._tensors.metadata()

    async def oip_ready(self) -> bool:
        return self._tensors.ready()

    async def oip_infer(self, request: InferRequest) -> InferResponse | InferFailure:
        return await self._tensors.infer(request)

    async def http(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes, dict]:
        """The simple routes (POST /, GET /tuning) reached through the router: its answer as values,
        and the replica's admission room for the router's shedding (serve/oip/shed.py)."""

        async def read_body() -> bytes:
            return body

        response = await self._routes.answer(method, "/" + path.strip("/"), headers, read_body)
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}  # Retry-After among them
        return response.status_code, headers, response.body, self.replica.admission.room(self.replica.replica_id)

    # ----- what the router's OpenAI API (serve/api/openai_api.py) calls, for the LLM apps
    async def openai_model(self) -> dict | None:
        return self._openai.card()

    async def openai(self, kind: str, model: str, body: bytes) -> tuple[int, dict, bytes]:
        return await self._openai.answer(kind, model, body)

    async def openai_stream(self, kind: str, model: str, body: bytes):
        """Server-sent events, streamed through the router (handle.options(stream=True))."""
        async for event in self._openai.stream(kind, model, body):
            yield event
