"""One replica's work apart from Ray: tuning, the batch settings, warm-up, and running batches.

serve/cluster/deployment.py is the Ray glue around it: it reads what only Ray knows (the GPU ids, the
deployment's user_config and max_ongoing_requests). How requests become batches is serve/replica/batcher.py.

A replica's life:
  start         pick the device (a GPU share when Ray gave this replica a GPU, else the CPU), load
                the model, take the tuning from the cache or tune (under the optimizer's per-device
                lock, within this replica's share of the memory), hand the batch size and wait to
                the batcher (settings.py decides them), then run once each batch size it may form and has not
                run yet (warmup.py), so that no request waits out a size's first run.
  a batch       every request is one entry of the batcher (batcher.py), which forms the device's
                batch when it can take one: all that waits, up to the max batch. It runs in
                the one worker thread (batch_runner.py: an error fails only its request, an
                out-of-memory splits the batch and lowers the max batch); where the spec's stages
                overlap, its prepare runs in a second thread while the batch before it computes (two
                device batches in flight). Its time and its requests' arrivals go to the wait
                controller (optimizer/wait.py), which may move the wait.
  reconfigure   a new user_config: re-tune when a tuning key changed (cache first) or a new `retune`
                value came (measured again), then the batch settings again.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from deployments.registry import create_spec
from optimizer.cache_store import open_cache
from optimizer.devices import make_meter, resolve_device_kind
from optimizer.tune import autobatch, resolve
from optimizer.share_cap import cap_allocator, exclusive_tuning, share_cap_applies
from optimizer.tuning import Tuning
from optimizer.wait import WaitController

from .admission import Admission, capacity_from, expired_message, run_unexpired
from .autoscaling import AutoscalingTargets, autoscaling_metrics, continuous_targets, replica_report, targets_now
from .batch_runner import BatchRunner, DeviceLocks, Outcome
from .batcher import Batch, Batcher, Entry
from .logs import CONSOLE, ShedLog, setup_replica_logging
from .llm import LlmServing, continuous_sequences, llm_outcome, paused
from .metrics import ReplicaMetrics
from .settings import BatchSettings, ReplicaConfig, effective_settings
from .single_flight import cluster_single_flight
from .stats import ServingReport, ServingStats
from .timeline import StartupTimeline, import_libraries
from .warm_schedule import WarmUpSchedule, run_example_batch
from .warmup import SizeWarmer

from .. import IMPORTED_AT_S

_IMPORTS_ENDED_AT_S = time.time()  # serve's modules imported: the start-up timeline's imports phase ends

log = logging.getLogger("ray.serve")

TUNING_GROUP_ENV = "AUTOBATCH_TUNING_GROUP"


class Replica:
    """`builder` is the configuration from the app builder alone; `config` the one in force (the
    builder's overlaid by the user_config, serve/replica/settings.py). `max_ongoing()` reads the
    deployment's max_ongoing_requests now (a batch can never be larger); `autoscaling()` its Ray
    autoscaling config (None: a fixed replica count)."""

    def __init__(self, builder: ReplicaConfig, config: ReplicaConfig,
                 max_ongoing: Callable[[], int | None], cpus: float | None = None,
                 autoscaling: Callable[[], object] = lambda: None):
        setup_replica_logging()  # autobatch's lines into this replica's log file, flushed; warnings to the console
        self.builder, self.config = builder, config
        self.model_name = builder.model
        self._shed_log = ShedLog(builder.model, log, detail="refused when it could not be answered within 2 latency "
                                 "budgets + one batch (serve/replica/admission.py); GET <route>/tuning serving.admission")
        self.startup = StartupTimeline(builder.model, IMPORTED_AT_S, _IMPORTS_ENDED_AT_S)
        self.startup.phase("constructed")
        self.cache = open_cache(builder.cache_path)
        self._max_ongoing = max_ongoing
        self._autoscaling = autoscaling
        self._autoscaling_logged: AutoscalingTargets | None = None
        self.gpu_ids: list = []
        # the one thread every forward, tuning and warm-up runs in (serve/api/profiling.py captures in it too)
        self.forward_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autobatch-forward")
        # the next batch's prepare, beside this one's forward, for a spec whose stages overlap
        self._prepare_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autobatch-prepare")
        # Requests' decoding before batching (PIL on the CPU pipeline, PNG/WebP, the JPEG header check on
        # a GPU's): as many threads as the replica has CPUs (num_cpus, rounded up), not asyncio's default
        # of cores + 4, which on a shared host takes other replicas' cores.
        self.decode_threads = max(1, math.ceil(cpus)) if cpus else min(32, (os.cpu_count() or 1) + 4)
        self.decode_executor = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="autobatch-decode")
        self.locks = DeviceLocks()  # a batch's stages, or a tuning or warm-up holding the device alone
        # every request waits here for the device; its slots (2 where stages overlap) are set at start
        self.batcher = Batcher(self.run_batch)
        self._started_at = time.time()
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"  # names its admission room to a router
        self.stats = ServingStats()
        self.admission = Admission(served=self.batcher.served)  # what this replica takes in: serve/replica/admission.py
        self.tuning: Tuning | None = None
        self._tunings, self._tuning_wall_s = 0, 0.0
        self._wait: WaitController | None = None  # the wait as served batches show it; new with each tuning
        self._oom_cap: int | None = None  # the max batch an out-of-memory while serving taught
        self.settings: BatchSettings | None = None
        self.report: ServingReport | None = None  # what GET /tuning shows of the settings as last applied
        self._warmer = SizeWarmer(lambda n: run_example_batch(self.spec, self.meter, n),
                                  budget_s=builder.warm_sizes_budget_s, on_error=lambda: self.meter.cleanup())
        label = lambda: f"{self.model_name} on {self.device_label}"  # noqa: E731
        self.warm_up = WarmUpSchedule(self._warmer, self.locks, self.forward_executor, label, lambda n: self.spec.set_serving_batch(n))
        self._flights = None  # the cluster's single-flight hook, set at start
        self._allocator_cap: float | None = None  # the fraction of the card this replica's allocator may hold
        # A new replica takes the cache even when the config carries a retune value: retune means
        # "measure again now" to the replicas running when it changes, not to every later start.
        self._last_retune = config.retune
        self.spec = create_spec(builder.model, builder.weights, **(builder.options or {}))
        self.startup.phase("spec")
        self.llm = None  # serve/replica/llm.py LlmServing, where the spec schedules continuously (the Llama)

    async def start(self, gpu_ids: list) -> None:
        self.gpu_ids = list(gpu_ids)
        if self.builder.device == "auto":
            kind = "cuda" if gpu_ids else "cpu"
        else:
            kind = resolve_device_kind(self.builder.device)  # raises with a clear message when cuda is absent
        loop = asyncio.get_running_loop()
        imported = await loop.run_in_executor(self.forward_executor, import_libraries, self.spec.library_packages)
        self.startup.phase("libraries", imported)
        self.meter = await loop.run_in_executor(self.forward_executor, make_meter, kind, 0)
        self.startup.phase("device", kind)
        group = self.builder.tuning_group or os.environ.get(TUNING_GROUP_ENV)
        if group:  # nodes the fingerprint cannot tell apart, told apart: their own cache key, their own flight
            fp = self.meter.fingerprint
            self.meter.fingerprint = replace(fp, extra={**fp.extra, "tuning_group": str(group)})
        self._flights = cluster_single_flight() if self.builder.single_flight else None
        self.device_label = self.meter.fingerprint.label
        self.metrics = ReplicaMetrics(self.model_name, self.device_label)
        self._runner = BatchRunner(self.spec, self.meter, self.forward_executor, self.metrics, model_name=self.model_name,
                                   before_predict=lambda items: self.config.faults.before_predict(items),
                                   on_oom=self._on_serving_oom, locks=self.locks,
                                   prepare_executor=self._prepare_executor)
        resolved = resolve(self.spec, self.config.tuning_settings(kind))
        log.info("autobatch: loading %s (%s) on %s as %s (Ray GPU ids: %s)", self.model_name,
                 self.spec.weights_description(), self.meter.torch_device, resolved.dtype, gpu_ids or "none")
        await loop.run_in_executor(self.forward_executor, self.spec.load, self.meter.torch_device, resolved.dtype)
        self.startup.phase("model_load")
        # Two device batches in flight where the stages overlap (the second prepares while the first
        # computes), else one: a batch is formed, and its deadlines checked, when it can run.
        self.batcher.set_slots(2 if self._runner.overlaps else 1)
        log.info("autobatch: %s: %s", self.model_name,
                 "batches overlap: the next one is prepared (copied, decoded) while this one computes"
                 if self._runner.overlaps else "one batch at a time (predict whole)")
        await self._tune(force=False)
        self.startup.phase("tuning", f"cache {self.tuning.cache}")
        await self._start_llm()
        self._apply_batch_settings()
        await self.warm_up.before_traffic(self.settings.size, self.spec.fixed_sample_shape)
        self.startup.phase("warm_up")

    # ----- tuning and settings -----
    async def _tune(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        settings = self.config.tuning_settings(self.meter.fingerprint.kind)
        kind = self.meter.fingerprint.kind
        capped = share_cap_applies(self.builder.share_cap, kind, self.builder.gpu_share)
        exclusive = exclusive_tuning(kind, self.builder.share_cap, self.builder.gpu_share,
                                     self.builder.gpu_share if self.builder.share_cap == "serve" else None)
        async with self.locks.exclusive():  # no batch runs while the model is measured
            if capped and self.builder.share_cap == "tune":
                await loop.run_in_executor(self.forward_executor, self._cap_allocator, settings)
            elif not exclusive:  # tuning beside the card's other replicas: none may take past its Ray share
                await loop.run_in_executor(self.forward_executor, self._cap_allocator, settings, self.builder.gpu_share)
            started = time.perf_counter()
            tuning: Tuning = await loop.run_in_executor(
                self.forward_executor,
                lambda: paused(self.spec, lambda: autobatch(self.spec, settings, cache=self.cache, force=force,
                                                            meter=self.meter, loaded=True, say=log.info,
                                                            single_flight=self._flights, exclusive=exclusive)),
            )
            wall_s = time.perf_counter() - started
            if capped and self.builder.share_cap == "serve":
                await loop.run_in_executor(self.forward_executor, self._cap_allocator, settings)
        self._tunings += 1
        self._tuning_wall_s = wall_s
        self._oom_cap = None  # a fresh measurement replaces what serving OOMs taught
        self.tuning = tuning
        self._wait = WaitController(tuning)
        if not tuning.from_cache:  # measured in this process: the sizes it ran are warm
            self._warmer.mark_warm(tuning.ok_sizes())
        self.metrics.tuning(tuning, wall_s)
        self._update_memory_gauge()
        log.info("autobatch: %s on %s: %s in %.1f s (cache %s, key %s)", self.model_name, self.device_label,
                 tuning.decision, wall_s, tuning.cache, tuning.key, extra=CONSOLE)

    def _cap_allocator(self, settings, share_of_card: float | None = None) -> None:
        """This replica's share of the card, enforced on its own allocator (optimizer/share_cap.py):
        its memory budget, or `share_of_card` of the whole card (while tuning beside others)."""
        import torch

        fp = self.meter.fingerprint
        budget = (int(share_of_card * fp.total_memory_bytes) if share_of_card
                  else resolve(self.spec, settings, fp).memory_budget_bytes)
        self._allocator_cap = cap_allocator(torch.cuda, self.meter.index, budget,
                                            getattr(self.meter, "outside_torch_bytes", 0), fp.total_memory_bytes)

    async def _start_llm(self) -> None:
        """The continuous scheduler sized from this tuning (serve/replica/llm.py), for a spec that has one."""
        if getattr(self.spec, "scheduler_kind", "static") != "continuous":
            return
        spec, tuning = self.spec, self.tuning
        sequences, why = continuous_sequences(tuning)
        if spec.scheduler is not None and spec.scheduler.plan.max_sequences == sequences:
            return
        async with self.locks.exclusive():
            await asyncio.get_running_loop().run_in_executor(
                self.forward_executor, lambda: spec.start_scheduler(sequences, tuning.latency_budget_s, say=log.info,
                                                             sequences_why=why))
        self.llm = LlmServing(spec, self.metrics, self.count_shed)

    def _apply_batch_settings(self) -> None:
        limit = self._max_ongoing()
        s = effective_settings(self.tuning, self.config.pins, self._oom_cap, limit,
                               self._wait.learnt if self._wait else None, self._wait.served_batch if self._wait else None)
        if self.llm is not None:  # the scheduler batches per step: each request goes on alone, at once
            s = BatchSettings(1, 0.0, (*s.reasons, "continuous batching: each request goes to the scheduler "
                                                    "at once; it forms the batch at every step"))
        self.batcher.set_max_batch_size(s.size)
        self.batcher.set_batch_wait_timeout_s(s.wait_s)
        self.settings = s
        self.report = ServingReport(s.size, s.wait_s, self.config.pins.batch_size, self._oom_cap, limit, s.reasons,
                                    self._runner.overlaps, float(self.tuning.batch_wait_timeout_s),
                                    self.config.faults.describe())
        self.metrics.batch_settings(s.size, s.wait_s, self._wait.ratio if self._wait else None)
        if self.llm is None:  # the continuous scheduler admits by KV blocks instead (serve/replica/llm.py)
            self.admission.set_capacity(capacity_from(self.tuning, s.size, s.wait_s))
        targets = self.autoscaling_targets()
        if targets != self._autoscaling_logged:
            self._autoscaling_logged = targets
            log.info("autobatch: %s: autoscaling %s", self.model_name, targets.reason)

    async def reconfigure(self, user_config: dict | None) -> None:
        config = self.builder.with_user_config(user_config)
        changed = config.tuning_changes(self.config)
        new_retune = bool(config.retune) and config.retune != self._last_retune
        self._last_retune = config.retune
        if config.pins.batch_size != self.config.pins.batch_size:
            self._oom_cap = None  # an operator's new pin replaces what serving OOMs taught
        previous, self.config = self.config, config
        if new_retune or changed:
            log.info("autobatch: reconfigure %s: %s", self.model_name,
                     "retune requested" if new_retune else f"tuning settings changed ({', '.join(changed)})",
                     extra=CONSOLE)
            try:
                await self._tune(force=new_retune)
                await self._start_llm()
            except Exception:
                self.config = previous  # keep serving with the tuning and settings that worked
                raise
        self._apply_batch_settings()
        await self.warm_up.before_traffic(self.settings.size, self.spec.fixed_sample_shape)

    # ----- serving -----
    async def submit(self, entry: Entry) -> list[Outcome]:
        """One request: its samples wait for the device as one entry (batcher.py) and its outcomes come
        back in order, or, scheduled continuously, each goes to the scheduler and is answered when its
        own tokens are done."""
        if self.llm is not None:
            outcomes = list(await asyncio.gather(*(llm_outcome(self.llm, sample, entry) for sample in entry.samples)))
            served = sum(o.ok for o in outcomes)
            self.stats.samples_served += served
            self.metrics.inc("autobatch_samples_served", served)
            return outcomes
        return await self.batcher.submit(entry)

    async def run_batch(self, batch: Batch) -> list[Outcome]:
        """One batch the batcher formed: run it, count it, and let the wait learn from it."""
        n = len(batch)
        formed_s = time.perf_counter()
        self.metrics.observe("autobatch_device_batch_size", n)
        self.metrics.observe("autobatch_batch_wait_seconds", formed_s - batch.slices[0].entry.arrived_s)
        self.metrics.set("autobatch_samples_waiting", self.batcher.waiting_samples)
        self._warmer.mark_warm([n])
        self.stats.batch_formed(n)
        ran: dict = {}

        async def run_live(live: list) -> list:
            """Per slice, its samples' outcomes."""
            live_batch = Batch(live)
            result = await self._runner.run_timed(live_batch)
            if result.period_s is not None:
                self.batcher.served.record(len(live_batch), result.period_s)  # what each batch adds at steady state
                ran.update(started_s=result.started_s, latency_s=result.latency_s)
            out, at = [], 0
            for s in live:
                out.append(result.outcomes[at:at + s.n])
                at += s.n
            return out

        per_slice = await run_unexpired(batch.slices, run_live, formed_s, lambda s: [self._expired(s.entry)] * s.n)
        outcomes = [o for group in per_slice for o in group]
        served = sum(o.ok for o in outcomes)
        # Only batches that ran whole say how long a batch takes; an injected fault's retries do not.
        if self._wait is not None and ran and served == n and not any(s.poisoned for s in batch):
            # A request that brings its own batch did not wait: how it arrived says nothing about the wait.
            if self._wait.record(batch.arrivals(), ran["started_s"],
                                 ran["latency_s"], self.settings.size, self.settings.wait_s, batch_size=n):
                lowered = self._wait.served_batch
                log.info("autobatch: %s: from served batches (%.2fx the tuning's time): batch %s, wait %s", self.model_name,
                         self._wait.ratio or 1.0, lowered.reason if lowered else f"the tuning's {self.tuning.batch_size}",
                         self._wait.reason or "the tuning's", extra=CONSOLE)
                self._apply_batch_settings()  # a user_config pin still wins there
            elif self._wait.batches % 32 == 0:
                self.metrics.set("autobatch_served_vs_tuned_latency", self._wait.ratio or 0.0)
        self.stats.samples_served += served
        self.metrics.inc("autobatch_samples_served", served)
        if served and not self.startup.done("first_request"):
            self.startup.phase("first_request")
        self._update_memory_gauge()
        return outcomes

    def _expired(self, entry: Entry) -> Outcome:
        """A request whose client deadline passed while it queued: answered without computing it."""
        self.count_shed("expired")
        return Outcome.error(504, expired_message(time.perf_counter() - entry.arrived_s))

    def count_shed(self, reason: str) -> None:
        self.stats.shed[reason] += 1
        self.metrics.inc("autobatch_requests_shed", reason=reason)
        self._shed_log.note(reason)  # one line per interval, not one per shed

    def _on_serving_oom(self, batch_size: int, message: str) -> None:
        """Called by the runner after a real OOM: serve smaller batches from now on."""
        self.stats.serving_ooms += 1
        cap = max(1, batch_size // 2)
        current = self.settings.size
        log.warning("autobatch: out of memory serving a batch of %d (%s); splitting it%s", batch_size, message,
                    f" and lowering the max batch size {current} -> {cap}" if cap < current else "")
        if cap < current:
            self._oom_cap = cap
            self._apply_batch_settings()

    # ----- what Ray's autoscaler hears (serve/replica/autoscaling.py) -----
    def autoscaling_targets(self) -> AutoscalingTargets | None:
        if self.llm is not None and self.settings is not None:  # admits by KV blocks (serve/replica/llm.py): no bound_s
            return continuous_targets(self.llm.scheduler.plan.max_sequences, self.spec.kv_queue_factor)
        return targets_now(self.settings, self.batcher, self.admission)

    def autoscaling_stats(self) -> dict:  # the continuous scheduler's requests bypass the batch admission
        pending = self.llm.scheduler.snapshot()["in_flight"] if self.llm is not None else self.admission.pending_samples
        return autoscaling_metrics(self.autoscaling_targets(), pending)

    def count_error(self, status: int) -> None:
        self.stats.errors[str(status)] += 1
        self.metrics.inc("autobatch_request_errors", status=str(status))

    def _update_memory_gauge(self) -> None:
        try:
            self.metrics.set("autobatch_device_memory_bytes", self.meter.current_bytes())
        except Exception:  # noqa: BLE001 - a meter read must never fail a request
            pass

    def check_health(self) -> None:
        if self.spec.model is None or self.tuning is None:
            raise RuntimeError("model not loaded or not tuned")

    # ----- what GET / and GET /tuning show -----
    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "weights": self.spec.weights_description(),
            "device": self.device_label,
            "usage": f"{self.spec.usage} POST it to this route; GET <route>/tuning for the tuning in use.",
            "inputs": [t.metadata() for t in self.spec.inputs()],
            "outputs": [t.metadata() for t in self.spec.outputs()],
            "max_batch_size": self.report.max_batch_size,
        }

    def tuning_report(self) -> dict:
        wait = self._wait
        return {
            **self.tuning.to_dict(),
            "replica": {"pid": os.getpid(), "device": self.device_label, "tunings": self._tunings,
                        "tuning_wall_s": self._tuning_wall_s, "started_at": self._started_at,
                        "tuning_group": self.meter.fingerprint.extra.get("tuning_group"),
                        "single_flight": self._flights is not None, "allocator_cap_fraction": self._allocator_cap,
                        "decode_threads": self.decode_threads, "gpu_ids": self.gpu_ids},
            # the ratio as of now; the wait moves only when the controller checks (optimizer/wait.py)
            "serving": {**self.report.to_dict(),
                        "served_vs_tuned_latency": wait.ratio if wait else None,
                        "served_batches_compared": wait.batches if wait else 0,
                        "device_queue": self.batcher.describe(),
                        "admission": self.admission.describe(),
                        "autoscaling": replica_report(self.autoscaling_targets(), self._autoscaling(),
                                                      self._max_ongoing())},
            "scheduler": self.llm.describe() if self.llm is not None else {"kind": "static"},
            "warm_sizes": self.warm_up.report, "cuda_graphs": self.warm_up.graphs_report(),
            "startup": self.startup.to_dict(),
            "stats": self.stats.to_dict(self._runner.item_retries, self._runner.overlapped_batches),
        }
