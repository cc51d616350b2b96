"""The decision: `tune_on` measures and decides, `autobatch` finds or stores what it decided.

`tune_on(prober)`: search the max safe batch, sharpen the throughput knee, select the batch to
serve and its wait, logging every number it decided on -> a `Tuning`. Pure: it runs the probes it
is handed and nothing else (no cache, no lock, no model loading), so tests and benchmarks call it
on a simulated device or a loaded model.
`autobatch(model)`: cache lookup -> (miss) take the device's tuning lock, load the model, measure
the base, `tune_on` -> save -> the `Tuning` (what `autobatch tune --json` and the serve app's
GET /<route>/tuning show).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Callable

from filelock import FileLock

from .cache import TuningCache, cache_key
from .fast_probe import tune_with_fast_probes
from .flight import SingleFlight, trusted_answer
from .devices import (DeviceFingerprint, DeviceUnavailable, MemoryMeter, fingerprint, make_meter, package_version,
                      resolve_device_kind)
from .model import ExampleBatches, TunableModel, default_latency_budget_s
from .probe import OOM, OVER_MEMORY, PREDICTED, ProbeResult
from .search import Prober, find_max_safe_batch
from .share_cap import Exclusive
from .select import MAX_KNEE_PROBES, next_knee_probe, select_serve_batch
from .wait import batch_wait_timeout_s
from .tuning import CACHED, MEASURED, DeviceInfo, MemoryFit, Tuning

log = logging.getLogger("autobatch")

DEFAULT_MEMORY_FRACTION = {"cuda": 0.90, "cpu": 0.50, "sim": 1.0}


class SettingsError(ValueError):
    """A tuning setting that cannot work; the message says what to change."""


# A TuningSettings field that changes the answer as given: it enters the cache key under its name.
# (dtype, the memory budget and the latency budget enter it too, resolved for the device: Resolved.)
IN_KEY = {"cache_key": True}


@dataclass
class TuningSettings:
    device: str = "auto"  # auto | cpu | cuda
    device_index: int = 0
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (the spec may fix its own, e.g. NF4)
    memory_budget_bytes: int | None = None  # absolute budget; wins over memory_fraction
    memory_fraction: float | None = None  # of the device's total memory
    latency_budget_s: float | None = None  # per batch; None: the model's default
    max_batch: int = field(default=1024, metadata=IN_KEY)
    margin: float = field(default=0.10, metadata=IN_KEY)  # the predictive guard's headroom while growing
    warmup: int = 1
    repeats: int = 3
    knee_fraction: float = field(default=0.95, metadata=IN_KEY)
    fast_probes: bool = True  # probe through the model's probe_batch where it has one (optimizer/fast_probe.py)

    def key_fields(self) -> dict:
        """The settings marked IN_KEY, by name: the cache key's share of them as given."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("cache_key")}

    def validate(self) -> None:
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise SettingsError(f"memory budget must be positive, got {self.memory_budget_bytes} bytes; give e.g. --memory-budget-mb 2048")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise SettingsError(f"memory fraction must be in (0, 1], got {self.memory_fraction}; give e.g. --memory-fraction 0.8")
        if self.latency_budget_s is not None and self.latency_budget_s <= 0:
            raise SettingsError(f"latency budget must be positive, got {self.latency_budget_s} s; give e.g. --latency-budget-ms 200")
        if self.max_batch < 1:
            raise SettingsError(f"max batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.margin < 1:
            raise SettingsError(f"margin must be in [0, 1), got {self.margin}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise SettingsError(f"unknown dtype {self.dtype!r}; use auto, float32, float16 or bfloat16")


@dataclass
class Resolved:
    """Settings made concrete for one spec on one device: everything the cache key needs."""

    kind: str
    fingerprint: DeviceFingerprint
    dtype: str
    memory_budget_bytes: int
    latency_budget_s: float
    settings: TuningSettings

    def key_fields(self, spec: TunableModel) -> dict:
        return {
            "autobatch": package_version("autobatch"),
            "device": self.fingerprint.cache_fields(),
            "libraries": {name: package_version(name) for name in spec.library_packages},
            "model": spec.signature(),
            "dtype": self.dtype,
            "memory_budget_bytes": self.memory_budget_bytes,
            "latency_budget_s": round(self.latency_budget_s, 6),
            **self.settings.key_fields(),
        }


def resolve(spec: TunableModel, settings: TuningSettings, device_fingerprint: DeviceFingerprint | None = None) -> Resolved:
    settings.validate()
    if device_fingerprint is None:
        kind = resolve_device_kind(settings.device)
        device_fingerprint = fingerprint(kind, settings.device_index)
    kind = device_fingerprint.kind
    dtype = spec.default_dtype(kind) if settings.dtype == "auto" else settings.dtype
    if settings.memory_budget_bytes is not None:
        budget = int(settings.memory_budget_bytes)
    else:
        fraction = settings.memory_fraction if settings.memory_fraction is not None else DEFAULT_MEMORY_FRACTION[kind]
        budget = int(fraction * device_fingerprint.total_memory_bytes)
    if budget > device_fingerprint.total_memory_bytes:
        raise SettingsError(
            f"memory budget {budget / 2**20:.0f} MiB exceeds the device's {device_fingerprint.total_memory_bytes / 2**20:.0f} MiB; lower it"
        )
    latency = settings.latency_budget_s if settings.latency_budget_s is not None else default_latency_budget_s(spec, kind, spec.default_latency_budget_s)
    return Resolved(kind, device_fingerprint, dtype, budget, float(latency), settings)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def describe_probe(p: ProbeResult) -> str:
    if p.outcome == PREDICTED:
        return f"  batch {p.batch_size:>5}  not run: predicted {_gib(p.predicted_bytes)}, over the guarded budget"
    pred = f" (predicted {_gib(p.predicted_bytes)})" if p.predicted_bytes else ""
    if p.latency_s is None:
        return f"  batch {p.batch_size:>5}  {p.outcome.upper()}{pred}"
    return (f"  batch {p.batch_size:>5}  peak {_gib(p.peak_bytes)}{pred}  latency {p.latency_s * 1e3:8.1f} ms  "
            f"{p.throughput:9.1f} samples/s  {p.outcome}")


def tuning_lock(fp: DeviceFingerprint) -> FileLock:
    """One tuning at a time per physical device on this host, so probes never disturb each other."""
    folder = os.path.join(tempfile.gettempdir(), "autobatch-locks")
    os.makedirs(folder, exist_ok=True)
    name = (fp.uuid or f"{fp.kind}-{fp.index}").replace("/", "_")
    return FileLock(os.path.join(folder, f"{name}.lock"))


def tune_on(
    prober: Prober,
    settings: TuningSettings | None = None,
    *,
    model: str = "model",
    weights: str = "unknown",
    dtype: str = "unknown",
    say: Callable[[str], None] | None = None,
    started_at_s: float | None = None,
) -> Tuning:
    """The max safe batch and the batch to serve, measured through `prober`, as a `Tuning`.

    The prober holds the budgets, the base memory, the warm-up and the repeats; `settings` adds
    max_batch, margin and knee_fraction. `model`, `weights` and `dtype` only label the result.
    `started_at_s` (time.perf_counter()) is when the tuning's clock started: `autobatch` starts it
    before loading the model, so `tuning_s` is what a replica waited for.
    """
    settings = settings or TuningSettings()
    say = say or log.info
    started = time.perf_counter() if started_at_s is None else started_at_s
    fp = prober.meter.fingerprint
    latency_budget_s = prober.latency_budget_s
    latency_text = "none" if latency_budget_s is None else f"{latency_budget_s * 1e3:.0f} ms per batch"
    say(f"autobatch: {model} on {fp.label} ({_gib(fp.total_memory_bytes)}), {dtype}; "
        f"memory budget {_gib(prober.memory_budget_bytes)} (base with model loaded {_gib(prober.base_bytes)}), "
        f"latency budget {latency_text}, max batch {settings.max_batch}, guard margin {settings.margin:.0%}")
    search = find_max_safe_batch(prober, max_batch=settings.max_batch, margin=settings.margin, model_name=model)
    search_probes = sum(p.ran for p in prober.probes)
    for note in search.notes:
        say(f"autobatch: {note}")

    for _ in range(MAX_KNEE_PROBES):  # sharpen the knee between the sizes the search measured
        size = next_knee_probe(prober.probes, search.max_safe_batch, latency_budget_s, settings.knee_fraction)
        if size is None:
            break
        prober.run(size)
    failed = [p.batch_size for p in prober.probes
              if p.outcome in (OOM, OVER_MEMORY) and 1 < p.batch_size <= search.max_safe_batch]
    if failed:  # a knee probe under the max went over memory (it jitters size by size): the max goes under it
        below = max(p.batch_size for p in prober.probes if p.ok and p.batch_size < min(failed))
        search.notes.append(f"batch {min(failed)} failed after the search chose {search.max_safe_batch}: "
                            f"max safe batch {below}, the largest measured good size under it")
        say(f"autobatch: {search.notes[-1]}")
        search.max_safe_batch, search.stopped_by = below, "memory"
    chosen = select_serve_batch(prober.probes, search.max_safe_batch, latency_budget_s, settings.knee_fraction)
    first = prober.by_size(1)
    wait_s = batch_wait_timeout_s(chosen.latency_s, latency_budget_s, first.latency_s or 0.0,
                                  first.throughput or 0.0, chosen.throughput)
    tuning_s = time.perf_counter() - started
    fit = search.memory_fit
    gain = max(0.0, 1 - (first.throughput or 0) / chosen.throughput) if chosen.throughput else 0
    decision = (f"max safe batch {search.max_safe_batch} (bounded by {search.stopped_by}); serving batch "
                f"{chosen.batch_size}: {chosen.reason}; batch wait {wait_s * 1e3:.1f} ms "
                f"(batch 1's {(first.latency_s or 0) * 1e3:.1f} ms compute x the {gain:.0%} "
                f"that batching saves, at most half the budget left after {chosen.latency_s * 1e3:.1f} ms of compute)")
    say(f"autobatch: {decision}")
    if fit is not None:
        say(f"autobatch: memory fit {_gib(fit.intercept)} + {fit.slope / 2**20:.2f} MiB per sample")
    tuning = Tuning(
        model=model,
        weights=weights,
        device=DeviceInfo.of(fp),
        dtype=dtype,
        memory_budget_bytes=prober.memory_budget_bytes,
        latency_budget_s=latency_budget_s,
        max_batch=settings.max_batch,
        max_safe_batch=search.max_safe_batch,
        batch_size=chosen.batch_size,
        batch_wait_timeout_s=wait_s,
        serve_latency_s=chosen.latency_s,
        serve_throughput=chosen.throughput,
        batch1_throughput=first.throughput if first and first.throughput else None,
        stopped_by=search.stopped_by,
        decision=decision,
        notes=tuple(search.notes),
        base_bytes=prober.base_bytes,
        memory_fit=MemoryFit(fit.intercept, fit.slope) if fit else None,
        probes=tuple(prober.probes),
        search_probe_count=search_probes,
        oom_events=search.oom_events,
        predicted_skips=search.predicted_skips,
        tuning_s=tuning_s,
        tuned_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    say(f"autobatch: {tuning.probe_count} probes ({search_probes} in the search), "
        f"{search.oom_events} OOMs, {search.predicted_skips} predicted skips, {tuning_s:.1f} s")
    return tuning


def autobatch(
    spec: TunableModel,
    settings: TuningSettings | None = None,
    *,
    cache: TuningCache | None = None,
    force: bool = False,
    meter: MemoryMeter | None = None,
    run_batch: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
    loaded: bool = False,
    single_flight: SingleFlight | None = None,
    exclusive: "Exclusive | bool" = True,
) -> Tuning:
    """Find the max safe batch and the batch to serve for `spec` here, or take them from the cache.

    `meter`/`run_batch` replace the real device and model (the simulated device in tests);
    `loaded` says the caller already loaded the spec on the meter's device (a serve replica).
    `single_flight(key)`: one tuning per cache key among many processes (optimizer/flight.py; a
    serve replica passes the cluster's coordinator): on a miss this waits for the key's flight and
    takes the answer another process measured meanwhile, or measures and publishes its own.
    `exclusive` (share_cap.exclusive_tuning): whether the probes take the device's tuning lock (the
    model loads before it either way, so one replica measures while the others load).
    """
    settings = settings or TuningSettings()
    say = say or log.info
    resolved = resolve(spec, settings, meter.fingerprint if meter is not None else None)
    key_fields = resolved.key_fields(spec)
    key = cache_key(key_fields)
    fp = resolved.fingerprint
    if cache is not None and not force:
        hit = cache.get_trusted(key_fields)
        if hit is not None:
            say(f"autobatch: {spec.name} on {fp.label}: cache hit ({key}): max safe batch "
                f"{hit.max_safe_batch}, serving batch {hit.batch_size}")
            return hit.with_source(CACHED, key)

    # A forced re-tune measures here whatever others measured: it takes no part in a flight.
    with (single_flight(key) if single_flight is not None and not force else nullcontext()) as flight:
        answer = flight.answer if flight is not None else None
        if answer is not None:
            taken = trusted_answer(answer, key_fields)
            if isinstance(taken, Tuning):
                say(f"autobatch: {spec.name} on {fp.label}: cache hit ({key}) after waiting for the tuning of "
                    f"this key elsewhere in the cluster: serving batch {taken.batch_size}")
                if cache is not None:
                    cache.put(key_fields, taken)  # the next start here finds it without asking
                return taken.with_source(CACHED, key)
            say(f"autobatch: the answer another process published for {key} cannot be trusted ({taken}); tuning here")
        started = time.perf_counter()
        if meter is None:
            meter = make_meter(resolved.kind, settings.device_index)
        fast = run_batch is None and settings.fast_probes and spec.probe_batch is not None
        if run_batch is None:
            if not loaded:  # outside the device's lock: one replica measures while the others load
                say(f"autobatch: loading {spec.name} ({spec.weights_description()}) on {meter.torch_device} as {resolved.dtype}")
                spec.load(meter.torch_device, resolved.dtype)
            run_batch = ExampleBatches(spec)
        if not exclusive:
            say(f"autobatch: {spec.name} on {fp.label}: tuning without the device's lock "
                f"({getattr(exclusive, 'reason', 'exclusive=False')})")
        with tuning_lock(fp) if exclusive else nullcontext():
            if cache is not None and not force:  # another replica may have just tuned it
                hit = cache.get_trusted(key_fields)
                if hit is not None:
                    say(f"autobatch: {spec.name} on {fp.label}: cache hit ({key}) after waiting for another "
                        f"tuning of it: serving batch {hit.batch_size}")
                    return hit.with_source(CACHED, key)
            meter.cleanup()
            base_bytes = meter.current_bytes()

            def make_prober(run, warmup=None, repeats=None) -> Prober:
                return Prober(run, meter, memory_budget_bytes=resolved.memory_budget_bytes,
                              latency_budget_s=resolved.latency_budget_s, base_bytes=base_bytes,
                              warmup=settings.warmup if warmup is None else warmup,
                              repeats=settings.repeats if repeats is None else repeats,
                              on_probe=lambda p: say(describe_probe(p)))

            def decide(prober: Prober) -> Tuning:
                return tune_on(prober, settings, model=spec.name, weights=spec.weights_description(),
                               dtype=resolved.dtype, say=say, started_at_s=started)

            if fast:
                tuning = tune_with_fast_probes(spec, make_prober, decide, say, started)
            else:
                tuning = decide(make_prober(run_batch))

        if cache is not None:
            cache.put(key_fields, tuning)
        if flight is not None:
            flight.publish(tuning.stored())
    return tuning.with_source(MEASURED, key)


__all__ = ["autobatch", "tune_on", "TuningSettings", "SettingsError", "DeviceUnavailable", "resolve", "Tuning"]
