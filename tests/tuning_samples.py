"""A real Tuning for tests that store, print or plot one: tune_on on the simulated device (a few
milliseconds, no model), so its fields are what the optimizer really produces."""
from __future__ import annotations

from dataclasses import replace

from optimizer.simulated import SimulatedDevice
from optimizer.search import Prober
from optimizer.tune import TuningSettings, tune_on
from optimizer.tuning import Tuning

MiB = 2**20


class SimulatedModel:
    """The TunableModel members autobatch() reads without a real model: a name, a signature,
    library versions, a dtype and a weights text (the simulated device runs the batches)."""

    name = "sim-model"
    library_packages: tuple[str, ...] = ()

    def __init__(self, default_latency_budget_s: float = 0.5):
        self.default_latency_budget_s = default_latency_budget_s

    def signature(self):
        return {"model": "sim-model"}

    def default_dtype(self, kind):
        return "float32"

    def weights_description(self):
        return "simulated"


def simulated_tuning(model: str = "resnet50", **changes) -> Tuning:
    """ResNet-like on a simulated 16 GiB card: bounded by the 0.2 s latency budget near batch 196."""
    device = SimulatedDevice(lambda b: 1000 * MiB + 4 * MiB * b, lambda b: 0.004 + 0.001 * b, capacity_bytes=16000 * MiB)
    prober = Prober(device.run, device, memory_budget_bytes=2000 * MiB, latency_budget_s=0.2,
                    base_bytes=device.base_bytes, warmup=1, repeats=1)
    tuning = tune_on(prober, TuningSettings(max_batch=256), model=model, weights="synthetic", dtype="float32",
                     say=lambda line: None)
    return replace(tuning, **changes)
