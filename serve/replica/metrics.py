"""Prometheus metrics that only autobatch knows, recorded inside replicas through `ray.serve.metrics`.

Every name is listed once, in METRICS below; dashboards and tests should take names from here
(`MetricDef.exported_name` gives a name as Prometheus shows it). Ray exports them on each node's
metrics port with a `ray_` prefix; counters get a `_total` suffix, histograms `_bucket`, `_sum`
and `_count`. Every series carries the tags `model` and `device` (the device fingerprint label,
e.g. "cuda:NVIDIA H100 80GB HBM3" or "cpu:<cpu model>"), plus Ray Serve's own `deployment`,
`replica` and `application`.

A replica forms its batches itself (serve/replica/batcher.py), not through Ray Serve's @serve.batch, so
Ray's batch metrics (ray_serve_actual_batch_size, ray_serve_batch_wait_time_ms, ...) are not
exported; their places are autobatch_device_batch_size, autobatch_batch_wait_seconds,
autobatch_batch_inference_seconds and autobatch_samples_waiting.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optimizer.tuning import Tuning

from .admission import SHED_REASONS

log = logging.getLogger("ray.serve")

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
BASE_TAGS = ("model", "device")

# Ray (2.60) stops exporting a gauge about 20 s after its last set(): a tuned size set once at start-up
# would vanish from Prometheus. ReplicaMetrics re-sets every gauge it holds this often.
GAUGE_REFRESH_S = 5.0

INFERENCE_SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]  # Ray's own batch-size buckets


@dataclass(frozen=True)
class MetricDef:
    name: str  # as recorded; Prometheus shows "ray_" + name (+ "_total" for counters)
    kind: str
    description: str
    extra_tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = tuple(INFERENCE_SECONDS_BOUNDARIES)  # a histogram's buckets

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return BASE_TAGS + self.extra_tags

    @property
    def exported_name(self) -> str:
        """The metric family name in Prometheus (what a PromQL query names, less _bucket/_sum/_count)."""
        return "ray_" + self.name + ("_total" if self.kind == COUNTER else "")


# The one list of autobatch metric names. Keep names stable: dashboards and alerts depend on them.
METRICS: tuple[MetricDef, ...] = (
    # --- the tuning in use ---
    MetricDef("autobatch_tuned_max_safe_batch", GAUGE,
              "Largest batch the tuning found safe in memory (and within the latency budget)."),
    MetricDef("autobatch_tuned_batch_size", GAUGE,
              "Batch size the tuning selected to serve (throughput knee within the latency budget)."),
    MetricDef("autobatch_max_batch_size", GAUGE,
              "max_batch_size in effect on the batcher now: the tuned size unless pinned by reconfigure, "
              "lowered after an out-of-memory while serving, or re-decided from served batch times "
              "(optimizer/served.py)."),
    MetricDef("autobatch_served_vs_tuned_latency", GAUGE,
              "Served batches' time over the tuning's time for their size (median of recent batches, "
              "updated every 32 batches); 0 until enough batches ran. Above 1.1 it may lower the batch "
              "(optimizer/served.py) and move the wait."),
    MetricDef("autobatch_batch_wait_timeout_seconds", GAUGE,
              "batch_wait_timeout_s in effect on the batcher now: the tuned wait, re-derived while serving "
              "from batch times and request arrivals (optimizer/wait.py), or pinned by user_config."),
    MetricDef("autobatch_memory_budget_bytes", GAUGE, "Memory budget the tuning worked within."),
    MetricDef("autobatch_latency_budget_seconds", GAUGE, "Per-batch latency budget the tuning worked within."),
    MetricDef("autobatch_tuning_seconds", GAUGE,
              "Seconds this replica last spent obtaining its tuning: the search on a cache miss, "
              "the lookup on a hit."),
    MetricDef("autobatch_tuning_probes", COUNTER,
              "Probe runs (batch sizes measured) by this replica's tunings; a cache hit adds none."),
    MetricDef("autobatch_cache_hits", COUNTER, "Tunings served from the tuning cache."),
    MetricDef("autobatch_cache_misses", COUNTER, "Tunings that had to measure (no cache entry, or a retune)."),
    MetricDef("autobatch_oom_events", COUNTER,
              "Out-of-memory events. phase=search|serving; kind=real (an OOM happened and was caught) or "
              "predicted (the search's memory model skipped a size predicted over budget).",
              ("phase", "kind")),
    # --- serving ---
    MetricDef("autobatch_samples_served", COUNTER,
              "Samples answered successfully; rate() of it is the throughput."),
    MetricDef("autobatch_request_errors", COUNTER,
              "Requests answered with an error, by HTTP status.", ("status",)),
    MetricDef("autobatch_requests_shed", COUNTER,
              "Requests a replica did not compute to keep its latency bound: reason=overload (its expected wait "
              "was over 2x the latency budget: 503), deadline (it could not meet the client's Request-Timeout-Ms: "
              "503), expired (the deadline passed while it queued: 504), memory (the replica's memory share: 503/413).",
              ("reason",)),
    MetricDef("autobatch_batch_item_retries", COUNTER,
              "Batches that raised (not an OOM) and were retried item by item so batch-mates still answer."),
    MetricDef("autobatch_batch_inference_seconds", HISTOGRAM,
              "Seconds of one forward pass (predict + encode) of one batch, in the worker thread."),
    MetricDef("autobatch_device_batch_size", HISTOGRAM,
              "Samples per batch the device ran. The batcher (serve/replica/batcher.py) forms them when the device can "
              "take one, from every request waiting, up to the max batch.",
              boundaries=tuple(BATCH_SIZE_BOUNDARIES)),
    MetricDef("autobatch_batch_wait_seconds", HISTOGRAM,
              "Seconds the oldest request of each device batch waited, from its arrival at the batcher to the "
              "batch formed: the batch wait at an idle device, the queueing behind a busy one."),
    MetricDef("autobatch_samples_waiting", GAUGE,
              "Samples in the replica's batcher waiting for the device, set as each batch forms."),
    MetricDef("autobatch_device_memory_bytes", GAUGE,
              "Device memory this replica holds now (CUDA: allocator reserved + context; CPU: resident set)."),
    # --- the LLM's continuous batching (serve/replica/llm.py; the Llama with options.scheduler continuous) ---
    MetricDef("autobatch_llm_time_to_first_token_seconds", HISTOGRAM,
              "Seconds from a request's arrival at the scheduler to its first generated token."),
    MetricDef("autobatch_llm_time_per_output_token_seconds", HISTOGRAM,
              "Seconds per generated token after the first, per request (its decode time / (tokens - 1))."),
    MetricDef("autobatch_llm_generated_tokens", COUNTER, "Tokens generated; rate() of it is tokens/s."),
    MetricDef("autobatch_llm_prompt_tokens", COUNTER, "Prompt tokens admitted to the scheduler."),
    MetricDef("autobatch_llm_running_sequences", GAUGE, "Sequences in the running batch (prefilling or decoding)."),
    MetricDef("autobatch_llm_waiting_sequences", GAUGE, "Sequences admitted and waiting for KV blocks or a slot."),
    MetricDef("autobatch_llm_kv_blocks_used", GAUGE, "KV cache blocks in use now."),
    MetricDef("autobatch_llm_kv_blocks_total", GAUGE,
              "KV cache blocks the tuning gave the scheduler (its sequences at the worst prompt + new tokens)."),
)

METRICS_BY_NAME = {m.name: m for m in METRICS}


class ReplicaMetrics:
    """The metrics of one replica, tagged with its model and device. Failing to record a metric
    never fails a request: errors are logged once and ignored."""

    def __init__(self, model: str, device_label: str):
        from ray.serve import metrics as serve_metrics

        self.tags = {"model": model, "device": device_label}
        self._m = {}
        self._warned = False
        self._gauges: dict[tuple, tuple[str, float, dict]] = {}  # last value of every gauge series
        self._gauges_lock = threading.Lock()
        threading.Thread(target=self._refresh_gauges, name="autobatch-gauges", daemon=True).start()
        for d in METRICS:
            if d.kind == GAUGE:
                metric = serve_metrics.Gauge(d.name, description=d.description, tag_keys=d.tag_keys)
            elif d.kind == COUNTER:
                metric = serve_metrics.Counter(d.name, description=d.description, tag_keys=d.tag_keys)
            else:
                metric = serve_metrics.Histogram(d.name, description=d.description, tag_keys=d.tag_keys,
                                                 boundaries=list(d.boundaries))
            metric.set_default_tags(dict(self.tags))
            self._m[d.name] = metric
        # Counters appear in Prometheus only once recorded: record a zero for the series a dashboard
        # always shows, so a healthy replica exports e.g. a serving-OOM count of 0, not nothing.
        for name, tags in (("autobatch_tuning_probes", {}), ("autobatch_cache_hits", {}),
                           ("autobatch_cache_misses", {}), ("autobatch_samples_served", {}),
                           ("autobatch_batch_item_retries", {}),
                           *(("autobatch_requests_shed", {"reason": r}) for r in SHED_REASONS),
                           ("autobatch_oom_events", {"phase": "search", "kind": "real"}),
                           ("autobatch_oom_events", {"phase": "search", "kind": "predicted"}),
                           ("autobatch_oom_events", {"phase": "serving", "kind": "real"})):
            self._zero(name, tags)

    def _fail(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("autobatch: recording a metric failed (%s); metrics may be incomplete", exc)

    def _zero(self, name: str, tags: dict) -> None:
        try:  # Counter.inc refuses 0; the base class's _record takes it and exports the series at 0.
            from ray.util.metrics import Metric

            Metric._record(self._m[name], 0.0, tags={**self.tags, **tags})
        except Exception as exc:  # noqa: BLE001 - private API; a missing zero only hides a series
            log.debug("autobatch: could not export %s at 0: %s", name, exc)

    def set(self, name: str, value: float, **tags: str) -> None:
        tags = {**self.tags, **tags}
        with self._gauges_lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = (name, float(value), tags)
        try:
            self._m[name].set(float(value), tags=tags)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._gauges_lock:
                gauges = list(self._gauges.values())
            for name, value, tags in gauges:
                try:
                    self._m[name].set(value, tags=tags)
                except Exception as exc:  # noqa: BLE001
                    self._fail(exc)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value <= 0:
            return
        try:
            self._m[name].inc(float(value), tags={**self.tags, **tags})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def observe(self, name: str, value: float, **tags: str) -> None:
        try:
            self._m[name].observe(float(value), tags={**self.tags, **tags})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    # --- what the deployment reports ---
    def tuning(self, tuning: Tuning, wall_s: float) -> None:
        self.set("autobatch_tuned_max_safe_batch", tuning.max_safe_batch)
        self.set("autobatch_tuned_batch_size", tuning.batch_size)
        self.set("autobatch_memory_budget_bytes", tuning.memory_budget_bytes)
        self.set("autobatch_latency_budget_seconds", tuning.latency_budget_s)
        self.set("autobatch_tuning_seconds", wall_s)
        if tuning.from_cache:
            self.inc("autobatch_cache_hits")
            return
        self.inc("autobatch_cache_misses")
        self.inc("autobatch_tuning_probes", tuning.probe_count)
        self.inc("autobatch_oom_events", tuning.oom_events, phase="search", kind="real")
        self.inc("autobatch_oom_events", tuning.predicted_skips, phase="search", kind="predicted")

    def batch_settings(self, max_batch_size: int, wait_s: float, served_vs_tuned: float | None = None) -> None:
        self.set("autobatch_max_batch_size", max_batch_size)
        self.set("autobatch_batch_wait_timeout_seconds", wait_s)
        self.set("autobatch_served_vs_tuned_latency", served_vs_tuned or 0.0)
