"""The batched Ray Serve deployment that serves every model family (any ModelSpec).

A replica's life:
  __init__      build the spec, pick the device (a GPU share when Ray gave this replica a GPU, else
                the CPU), load the model, take the tuning from the cache or tune (under the
                optimizer's per-device lock, within this replica's share of the memory), then hand
                the batch size and wait to @serve.batch, then run each batch size it may form and has
                not run yet once (warmup.py), so no request waits out a size's first run.
  __call__      POST: decode in a thread (a bad payload is answered 4xx here and never reaches a
                batch) -> @serve.batch -> one forward pass per batch in a worker thread, so the event
                loop keeps queueing the next batch. GET /tuning: the tuning in use and what the
                batches did.
  a batch       raises -> retried item by item, so only the item that fails fails; out of memory ->
                split in halves and retried, the replica's max batch lowered to what fit, counted
                (batch_runner.py). Its time is compared with the tuning's for its size, and its
                requests' arrival times are kept; every 20 batches (3 when they take seconds) the
                wait is re-derived: the tuning's rule at the times batches take as served, cut to
                what the arrivals use of it (batch_wait.py), unless user_config pins it.
  reconfigure   user_config: latency_budget_ms, memory_fraction, max_batch (re-tune, cache first),
                batch_size / batch_wait_timeout_ms (pin; null or absent: the tuned value),
                retune (a new truthy value re-tunes the running replicas, skipping the cache;
                replicas started later take the cache), faults (test hooks, see faults.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from deployments.base import PayloadError  # noqa: E402
from deployments.registry import create_spec  # noqa: E402
from optimizer.cache import TuningCache  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.tune import DEFAULT_MEMORY_FRACTION, TuningSettings, autobatch, resolve  # noqa: E402

from .batch_runner import BatchRunner, Item, Outcome  # noqa: E402
from .faults import Faults  # noqa: E402
from .metrics import ReplicaMetrics  # noqa: E402
from .batch_wait import ServedWait  # noqa: E402
from .warmup import SizeWarmer  # noqa: E402

log = logging.getLogger("ray.serve")

# Keys a deployment's user_config may carry (see reconfigure).
TUNING_KEYS = ("latency_budget_ms", "memory_fraction", "max_batch")
USER_CONFIG_KEYS = TUNING_KEYS + ("batch_size", "batch_wait_timeout_ms", "retune", "faults")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_user_config(user_config: dict | None) -> dict:
    """Validate a user_config; the message of any error says what to change."""
    if user_config is None:
        return {}
    if not isinstance(user_config, dict):
        raise ValueError(f"user_config must be a mapping with keys among {', '.join(USER_CONFIG_KEYS)}; got {user_config!r}")
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown user_config key(s) {unknown}; use: {', '.join(USER_CONFIG_KEYS)}")
    cfg = dict(user_config)

    def positive(key, kind=float, upper=None):
        value = cfg.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value):
            raise ValueError(f"user_config {key} must be a positive {'whole number' if kind is int else 'number'}, got {value!r}")
        if upper is not None and value > upper:
            raise ValueError(f"user_config {key} must be at most {upper}, got {value!r}")
        cfg[key] = kind(value)

    positive("latency_budget_ms")
    positive("memory_fraction", upper=1.0)
    positive("max_batch", int)
    positive("batch_size", int)
    positive("batch_wait_timeout_ms")
    Faults.from_config(cfg.get("faults"))  # validates
    return cfg


def memory_fraction_for(kind: str, fraction: float | None, gpu_share: float) -> float | None:
    """The memory fraction (of the whole device) a replica tunes within. A replica holding a share
    of a GPU (num_gpus < 1) gets by default the usual fraction of its share, so replicas packed on
    one card each tune within their own part of it; None: the optimizer's default for the device."""
    if kind != "cuda" or gpu_share >= 1:
        return fraction
    if fraction is None:
        return DEFAULT_MEMORY_FRACTION["cuda"] * gpu_share
    if fraction > gpu_share:
        log.warning("autobatch: memory_fraction %.2f is more than this replica's GPU share %.2f; "
                    "its neighbours on the card may run out of memory", fraction, gpu_share)
    return fraction


@serve.deployment
class AutobatchDeployment:
    async def __init__(
        self,
        model: str,
        weights: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        memory_fraction: float | None = None,
        latency_budget_ms: float | None = None,
        max_batch: int = 256,
        cache_path: str | None = None,
        repeats: int = 3,
        warmup: int = 1,
        warm_sizes_budget_s: float = 120.0,
        gpu_share: float = 1.0,
        max_ongoing_requests: int | None = None,
        options: dict | None = None,
    ):
        self.model_name = model
        self._defaults = {"latency_budget_ms": latency_budget_ms, "memory_fraction": memory_fraction,
                          "max_batch": int(max_batch)}
        self._dtype = dtype
        self._repeats, self._warmup = int(repeats), int(warmup)
        self._gpu_share = float(gpu_share)
        self._max_ongoing_fallback = max_ongoing_requests
        self.cache = TuningCache(cache_path) if cache_path else TuningCache()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autobatch-forward")
        self._model_lock = asyncio.Lock()
        self._started_at = time.time()
        self._stats = {"batches": 0, "samples_served": 0, "batch_sizes": Counter(), "largest_batch": 0,
                       "serving_ooms": 0, "errors": Counter()}
        self._oom_cap: int | None = None
        self._tunings = 0
        self.tuning: dict | None = None
        self._warmer = SizeWarmer(self._run_example_batch, budget_s=warm_sizes_budget_s,
                                  on_error=lambda: self.meter.cleanup())
        self._warm_report: dict | None = None
        self._served_wait: ServedWait | None = None  # the wait as served batches show it (batch_wait.py)

        # The initial user_config (Ray calls reconfigure with it right after __init__): applied now,
        # so a replica tunes once, with the settings it will serve under.
        initial = parse_user_config(self._initial_user_config())
        self._live = self._effective(initial)

        self.spec = create_spec(model, weights, **(options or {}))
        gpu_ids = self._gpu_ids()
        if device == "auto":
            kind = "cuda" if gpu_ids else "cpu"
        else:
            kind = resolve_device_kind(device)  # raises with a clear message when cuda is absent
        loop = asyncio.get_running_loop()
        self.meter = await loop.run_in_executor(self._executor, make_meter, kind, 0)
        self.device_label = self.meter.fingerprint.label
        self.metrics = ReplicaMetrics(model, self.device_label)
        self._runner = BatchRunner(self.spec, self.meter, self._executor, self.metrics, model_name=model,
                                   before_predict=lambda items: self._live["faults"].before_predict(items),
                                   on_oom=self._on_serving_oom)
        resolved = resolve(self.spec, self._settings())
        log.info("autobatch: loading %s (%s) on %s as %s (Ray GPU ids: %s)", model,
                 self.spec.weights_description(), self.meter.torch_device, resolved.dtype, gpu_ids or "none")
        await loop.run_in_executor(self._executor, self.spec.load, self.meter.torch_device, resolved.dtype)
        # A new replica takes the cache even when the config carries a retune value: retune means
        # "measure again now" to the replicas running when it changes, not to every later start.
        await self._tune(force=False)
        self._last_retune = initial.get("retune")
        self._apply_batch_settings()
        await self._warm_sizes()

    # ----- configuration -----
    @staticmethod
    def _initial_user_config():
        try:
            return serve.get_replica_context()._deployment_config.user_config
        except Exception:  # noqa: BLE001 - private field; without it the first reconfigure tunes again
            return None

    @staticmethod
    def _gpu_ids() -> list:
        import ray

        try:
            return list(ray.get_gpu_ids())
        except Exception:  # noqa: BLE001 - outside a Ray worker
            return []

    def _max_ongoing_requests(self) -> int | None:
        try:
            return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
        except Exception:  # noqa: BLE001
            return self._max_ongoing_fallback

    def _effective(self, cfg: dict) -> dict:
        live = {key: cfg.get(key, self._defaults[key]) for key in TUNING_KEYS}
        live["max_batch"] = int(live["max_batch"])
        live["batch_size"] = cfg.get("batch_size")
        live["batch_wait_timeout_ms"] = cfg.get("batch_wait_timeout_ms")
        live["faults"] = Faults.from_config(cfg.get("faults"))
        return live

    def _settings(self) -> TuningSettings:
        kind = self.meter.fingerprint.kind
        latency = self._live["latency_budget_ms"]
        return TuningSettings(
            device=kind,
            device_index=0,
            dtype=self._dtype,
            memory_fraction=memory_fraction_for(kind, self._live["memory_fraction"], self._gpu_share),
            latency_budget_s=latency / 1e3 if latency else None,
            max_batch=self._live["max_batch"],
            warmup=self._warmup,
            repeats=self._repeats,
        )

    async def _tune(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings()
        async with self._model_lock:  # no batch runs while the model is measured
            started = time.perf_counter()
            result = await loop.run_in_executor(
                self._executor,
                lambda: autobatch(self.spec, settings, cache=self.cache, force=force, meter=self.meter,
                                  loaded=True, say=log.info),
            )
            wall_s = time.perf_counter() - started
        self._tunings += 1
        self._tuning_wall_s = wall_s
        self._oom_cap = None  # a fresh measurement replaces what serving OOMs taught
        self.tuning = result
        self._served_wait = ServedWait(result)  # a new tuning: learn again from its batches
        if result["cache"] == "miss":  # measured in this process: the sizes it ran are warm
            self._warmer.mark_warm(p["batch_size"] for p in result["probes"] if p["outcome"] == "ok")
        self.metrics.tuning(result, wall_s)
        self._update_memory_gauge()
        log.info("autobatch: %s on %s: %s in %.1f s (cache %s, key %s)", self.model_name, self.device_label,
                 result["decision"], wall_s, result["cache"], result["key"])

    def _apply_batch_settings(self) -> None:
        """Hand the batch size and wait to @serve.batch: pinned > tuned, never above what an OOM
        taught, never above max_ongoing_requests (a batch can never be larger than that)."""
        notes = []
        size = self._live["batch_size"] or self.tuning["batch_size"]
        if self._live["batch_size"]:
            notes.append(f"pinned by user_config batch_size={size}")
        if self._oom_cap is not None and size > self._oom_cap:
            size = self._oom_cap
            notes.append(f"lowered to {size} after an out-of-memory while serving")
        limit = self._max_ongoing_requests()
        if limit and size > limit:
            notes.append(f"capped at max_ongoing_requests={limit} (a batch cannot be larger); raise it to serve {size}")
            size = limit
        wait_ms = self._live["batch_wait_timeout_ms"]
        if wait_ms:
            wait_s = wait_ms / 1e3
            notes.append(f"wait pinned by user_config batch_wait_timeout_ms={wait_ms}")
        elif self._served_wait is not None and self._served_wait.wait_s is not None:
            wait_s = self._served_wait.wait_s
            notes.append(f"wait re-derived from served batches: {self._served_wait.reason}")
        else:
            wait_s = float(self.tuning["batch_wait_timeout_s"])
        self._infer.set_max_batch_size(int(size))
        self._infer.set_batch_wait_timeout_s(float(wait_s))
        self._serving = {"max_batch_size": int(size), "batch_wait_timeout_s": float(wait_s),
                         "pinned_batch_size": self._live["batch_size"], "oom_cap": self._oom_cap,
                         "max_ongoing_requests": limit, "notes": notes,
                         "tuned_batch_wait_timeout_s": float(self.tuning["batch_wait_timeout_s"]),
                         "faults": self._live["faults"].describe()}
        self.metrics.batch_settings(size, wait_s)

    async def reconfigure(self, user_config: dict) -> None:
        cfg = parse_user_config(user_config)
        live = self._effective(cfg)
        retune = cfg.get("retune")
        changed = [k for k in TUNING_KEYS if live[k] != self._live[k]]
        new_retune = bool(retune) and retune != self._last_retune
        self._last_retune = retune
        if live["batch_size"] != self._live["batch_size"]:
            self._oom_cap = None  # an operator's new pin replaces what serving OOMs taught
        previous, self._live = self._live, live
        if new_retune or changed:
            log.info("autobatch: reconfigure %s: %s", self.model_name,
                     "retune requested" if new_retune else f"tuning settings changed ({', '.join(changed)})")
            try:
                await self._tune(force=new_retune)
            except Exception:
                self._live = previous  # keep serving with the tuning and settings that worked
                raise
        self._apply_batch_settings()
        await self._warm_sizes()

    def _run_example_batch(self, n: int) -> None:
        self.spec.predict(self.spec.example_batch(n))
        self.meter.synchronize()

    async def _warm_sizes(self) -> None:
        """Run each batch size @serve.batch may form and this process has not run yet (see warmup.py)."""
        size = self._serving["max_batch_size"]
        if not self.spec.fixed_sample_shape or self._warmer.budget_s <= 0:
            if self._warm_report is None:
                why = ("its batch shapes also follow the input (prompt lengths)" if not self.spec.fixed_sample_shape
                       else "warm_sizes_budget_s is 0")
                self._warm_report = {"skipped": why}
                log.info("autobatch: %s: batch sizes not warmed before traffic: %s", self.model_name, why)
            return
        loop = asyncio.get_running_loop()
        async with self._model_lock:
            report = await loop.run_in_executor(self._executor, self._warmer.warm, size)
        self._warm_report = report.to_dict()
        log.info("autobatch: %s on %s: %s", self.model_name, self.device_label, report.describe())

    def check_health(self) -> None:
        if self.spec.model is None or self.tuning is None:
            raise RuntimeError("model not loaded or not tuned")

    # ----- HTTP -----
    def _subpath(self, request: Request) -> str:
        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        return "/" + path.strip("/")

    def _count_error(self, status: int) -> None:
        self._stats["errors"][str(status)] += 1
        self.metrics.inc("autobatch_request_errors", status=str(status))

    def _reply_error(self, status: int, message: str) -> JSONResponse:
        self._count_error(status)
        return _error(status, message)

    async def __call__(self, request: Request):
        path = self._subpath(request)
        if request.method in ("GET", "HEAD"):
            if path == "/tuning":
                return JSONResponse(self.tuning_report())
            if path == "/":
                return JSONResponse(self.describe())
            return _error(404, f"no such path {path!r}; use POST / for predictions, GET /tuning for the tuning in use")
        if request.method != "POST":
            return _error(405, f"method {request.method} is not served; use POST / with the payload, or GET /tuning")
        if path != "/":
            return _error(404, f"no such path {path!r}; POST the payload to the route itself")
        try:
            body = await request.body()
        except Exception as exc:  # noqa: BLE001 - client went away / broken stream
            return self._reply_error(400, f"could not read the request body ({exc}); send the payload again")
        content_type = request.headers.get("content-type")
        try:
            sample = await asyncio.to_thread(self.spec.decode, body, content_type)
        except PayloadError as exc:
            return self._reply_error(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must still not become a 500 for the client's payload
            log.exception("autobatch: %s decode raised outside PayloadError", self.model_name)
            return self._reply_error(422, f"the payload could not be decoded ({type(exc).__name__}: {exc}); "
                                          f"check it is what GET / describes")
        item = Item(sample, poisoned=self._live["faults"].is_poisoned(request.headers))
        try:
            outcome: Outcome = await self._infer(item)
        except Exception as exc:  # noqa: BLE001 - only a bug in the batching itself gets here
            log.exception("autobatch: batch handler failed")
            return self._reply_error(500, f"internal error while serving ({type(exc).__name__}: {exc})")
        if not outcome.ok:
            self._count_error(outcome.status)
        return Response(content=outcome.body, status_code=outcome.status, media_type="application/json")

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "weights": self.spec.weights_description(),
            "device": self.device_label,
            "usage": "POST the payload (image bytes: JPEG, PNG or WebP; for an LLM, JSON "
                     "{\"prompt\": ..., \"max_new_tokens\": ...}) to this route; GET <route>/tuning for the tuning",
            "max_batch_size": self._serving["max_batch_size"],
        }

    def tuning_report(self) -> dict:
        stats = self._stats
        return {
            **self.tuning,
            "from_cache": self.tuning.get("cache") == "hit",
            "replica": {"pid": os.getpid(), "device": self.device_label, "tunings": self._tunings,
                        "tuning_wall_s": self._tuning_wall_s, "started_at": self._started_at},
            "serving": {**self._serving,  # the ratio as of now; the wait moves only every 20 batches (3 slow ones)
                        "served_vs_tuned_latency": self._served_wait.ratio if self._served_wait else None,
                        "served_batches_compared": self._served_wait.batches if self._served_wait else 0},
            "warm_sizes": self._warm_report,
            "stats": {
                "batches": stats["batches"],
                "samples_served": stats["samples_served"],
                "batch_sizes": {str(k): v for k, v in sorted(stats["batch_sizes"].items())},
                "largest_batch": stats["largest_batch"],
                "serving_ooms": stats["serving_ooms"],
                "batch_item_retries": self._runner.item_retries,
                "errors": dict(stats["errors"]),
            },
        }

    # ----- batching -----
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _infer(self, items: list[Item]) -> list[Outcome]:
        n = len(items)
        self._warmer.mark_warm([n])
        self._stats["batches"] += 1
        self._stats["batch_sizes"][n] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], n)
        async with self._model_lock:
            started = time.perf_counter()
            outcomes = await self._runner.run(items)
            elapsed_s = time.perf_counter() - started
        served = sum(o.ok for o in outcomes)
        if self._served_wait is not None and served == n and not any(item.poisoned for item in items):
            settings = self._serving
            if self._served_wait.record([item.arrived_s for item in items], started, elapsed_s,
                                        settings["max_batch_size"], settings["batch_wait_timeout_s"]):
                self._wait_moved()
        self._stats["samples_served"] += served
        self.metrics.inc("autobatch_samples_served", served)
        self._update_memory_gauge()
        return outcomes

    def _wait_moved(self) -> None:
        """Served batches moved the wait (batch_wait.py); a user_config pin still wins in
        _apply_batch_settings."""
        log.info("autobatch: %s: batch wait re-derived from served batches: %s", self.model_name,
                 self._served_wait.reason)
        self._apply_batch_settings()

    def _on_serving_oom(self, batch_size: int, message: str) -> None:
        """Called by the runner after a real OOM: serve smaller batches from now on."""
        self._stats["serving_ooms"] += 1
        cap = max(1, batch_size // 2)
        current = self._serving["max_batch_size"]
        log.warning("autobatch: out of memory serving a batch of %d (%s); splitting it%s", batch_size, message,
                    f" and lowering the max batch size {current} -> {cap}" if cap < current else "")
        if cap < current:
            self._oom_cap = cap
            self._apply_batch_settings()

    def _update_memory_gauge(self) -> None:
        try:
            self.metrics.set("autobatch_device_memory_bytes", self.meter.current_bytes())
        except Exception:  # noqa: BLE001 - a meter read must never fail a request
            pass
