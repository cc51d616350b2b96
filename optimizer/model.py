"""What the optimizer needs from a model, and the batch runner its probes time.

`TunableModel` names exactly the members `autobatch()` uses, so the optimizer depends on this
Protocol and never on `deployments` (whose ModelSpec satisfies it): a model from anywhere can be
tuned, and the layering test can hold the optimizer to it.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from .probe import BatchTiming


def default_latency_budget_s(model: Any, device_kind: str, fallback_s: float) -> float:
    """The model's latency budget on `device_kind` when the settings name none: its per-device default
    where it has one, else `fallback_s` (its `default_latency_budget_s`). Why per device: a budget that lets a GPU
    batch is below one batch-1 forward on a loaded CPU, and a budget under batch 1 serves unbatched."""
    by_device = getattr(model, "default_latency_budget_s_by_device", None) or {}
    return float(by_device.get(device_kind, fallback_s))


@runtime_checkable
class TunableModel(Protocol):
    name: str
    # Packages whose versions change memory or speed: part of the tuning cache key.
    library_packages: Sequence[str]
    # Per batch, when the settings name none. A model may also carry `default_latency_budget_s_by_device`
    # ({"cpu": 4.0}): the default on that kind of device (see default_latency_budget_s() below).
    default_latency_budget_s: float
    # Optional (None: the model has none): `probe_batch(samples)` runs only what reaches the peak
    # memory of `predict(samples)` and returns the seconds `predict(samples)` would take. The tuner
    # then probes with it and checks its answer with one real `predict` (optimizer/fast_probe.py):
    # an LLM's probe is one prefill and a few decode steps against a KV cache of the worst length,
    # not whole generations. It must never measure less memory than `predict` peaks at.
    probe_batch: Callable[[list], float] | None

    def signature(self) -> dict:
        """What identifies the model and its worst-case input (JSON-able): part of the cache key."""

    def default_dtype(self, device_kind: str) -> str:
        """The dtype to tune and serve in on a device of this kind (cpu, cuda, sim)."""

    def weights_description(self) -> str:
        """Which weights run, as a person reads it (a path, or that they are synthetic)."""

    def load(self, device: str, dtype: str) -> Any:
        """Build the model on `device` ('cpu', 'cuda:0') in `dtype`."""

    def example_batch(self, n: int) -> list:
        """n samples of the worst case the deployment admits, in the form `predict` receives when serving."""

    def predict(self, samples: list) -> list:
        """One output per sample."""

    # predict in two stages (deployments/base.py's ModelSpec has the defaults: no overlap; a model
    # without `overlaps` is run whole).
    def overlaps(self) -> bool:
        """True: a server runs `prepare` for the next batch while `forward` computes this one, so
        the tuner times that overlap (ExampleBatches), not predict alone."""

    def prepare(self, samples: list) -> Any:
        """predict's first stage: the samples put on the device as one batch."""

    def forward(self, prepared: Any) -> list:
        """predict's second stage: one output per sample of a prepared batch."""


class ExampleBatches:
    """`run_batch(n)` for probes: predict on the model's example batch of n.

    One example batch is held at a time and kept while the same size is probed again, so its memory
    is part of what a probe measures (as a served batch's inputs are) and is not rebuilt per run.
    `fast`: run the model's `probe_batch` instead, and return its predicted seconds (times
    `latency_scale`, which the check against a real predict corrects) for the probe to record.

    A model that overlaps its stages (`model.overlaps()`) is timed as a replica serves it at full
    load: each run forwards the batch prepared by the run before while the next one prepares in a
    second thread, and returns a BatchTiming (the batch's own latency, prepare then forward, and
    the period between batches). The peak memory is then that of two prepared batches and one
    forward, as in serving.
    """

    def __init__(self, model: TunableModel, fast: bool = False, latency_scale: float = 1.0):
        self._model = model
        self._held: dict[int, list] = {}
        self.fast, self.latency_scale = fast, latency_scale
        # a model without the two stages (a minimal one, as in the benchmarks) runs predict whole
        self.overlap = not fast and hasattr(model, "overlaps") and bool(self._model.overlaps())
        self._ahead: tuple[int, Any, float] | None = None  # (size, a prepared batch, its prepare's seconds)
        self._helper: ThreadPoolExecutor | None = None

    def __call__(self, n: int) -> float | BatchTiming | None:
        if n not in self._held:
            self.clear()
            self._held[n] = self._model.example_batch(n)
        if self.fast:
            return self.latency_scale * float(self._model.probe_batch(self._held[n]))
        if self.overlap:
            return self._overlapped(n)
        self._model.predict(self._held[n])
        return None

    def _timed_prepare(self, samples: list) -> tuple[Any, float]:
        started = time.perf_counter()
        prepared = self._model.prepare(samples)
        ready = getattr(prepared, "ready", None)  # a CUDA event: the prepare's device work, queued
        if ready is not None:
            ready.synchronize()
        return prepared, time.perf_counter() - started

    def _overlapped(self, n: int) -> BatchTiming:
        started = time.perf_counter()
        if self._ahead is None:  # the first run of a size fills the pipe (the probe's warm-up run)
            self._ahead = (n, *self._timed_prepare(self._held[n]))
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autobatch-tune-prepare")
        _, prepared, prepare_s = self._ahead
        self._ahead = None  # whatever fails below, no prepared batch outlives it (an OOM's clean-up frees it)
        following = self._helper.submit(self._timed_prepare, self._held[n])
        try:
            forward_started = time.perf_counter()
            self._model.forward(prepared)  # ends with the outputs on the host
            forward_s = time.perf_counter() - forward_started
        except BaseException:
            following.exception()  # let the prepare finish before the caller cleans up
            raise
        finally:
            del prepared
        self._ahead = (n, *following.result())  # raises what the prepare raised (an OOM too)
        return BatchTiming(latency_s=prepare_s + forward_s, period_s=time.perf_counter() - started)

    def clear(self) -> None:
        self._held.clear()
        self._ahead = None
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None


__all__ = ["TunableModel", "ExampleBatches"]
