"""What the optimizer needs from a model, and the batch runner its probes time.

`TunableModel` names exactly the members `autobatch()` uses, so the optimizer depends on this
Protocol and never on `deployments` (whose ModelSpec satisfies it): a model from anywhere can be
tuned, and the layering test can hold the optimizer to it.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@runtime_checkable
class TunableModel(Protocol):
    name: str
    # Packages whose versions change memory or speed: part of the tuning cache key.
    library_packages: Sequence[str]
    # Per batch, when the settings name none.
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


class ExampleBatches:
    """`run_batch(n)` for probes: predict on the model's example batch of n.

    One example batch is held at a time and kept while the same size is probed again, so its memory
    is part of what a probe measures (as a served batch's inputs are) and is not rebuilt per run.
    `fast`: run the model's `probe_batch` instead, and return its predicted seconds (times
    `latency_scale`, which the check against a real predict corrects) for the probe to record.
    """

    def __init__(self, model: TunableModel, fast: bool = False, latency_scale: float = 1.0):
        self._model = model
        self._held: dict[int, list] = {}
        self.fast, self.latency_scale = fast, latency_scale

    def __call__(self, n: int) -> float | None:
        if n not in self._held:
            self._held.clear()
            self._held[n] = self._model.example_batch(n)
        if self.fast:
            return self.latency_scale * float(self._model.probe_batch(self._held[n]))
        self._model.predict(self._held[n])
        return None

    def clear(self) -> None:
        self._held.clear()


__all__ = ["TunableModel", "ExampleBatches"]
