"""Tuning through fast probes checked by real batches (optimizer/fast_probe.py), on the simulated
device: a model whose real batch (a whole generation) takes `real_s(b)` and whose fast probe
predicts it wrongly, by a factor overall and erratically size by size, as the 8B Llama's did on an
H100 (3.6-9.0 s predicted for batches 3-74, out of order: docs/results/issue14/h100_llama_fast.log).
Whatever the predictions, what is stored must be what was measured: the batch served is one whose
real batch met both budgets, never less than the largest real batch that met them, and the cache's
trust check accepts it."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from optimizer.simulated import SimulatedDevice
from optimizer.trust import check_tuning
from optimizer.tune import TuningSettings, autobatch

MiB = 2**20


class SimulatedGenerator:
    """A TunableModel on the simulated device: `predict` runs a real batch (the simulated clock moves
    by `real_s(b)`), `probe_batch` reaches the same peak and returns its (wrong) prediction."""

    name = "simulated_llm"
    library_packages = ()
    default_latency_budget_s = 10.0

    def __init__(self, device: SimulatedDevice, predicted_s):
        self.device, self.predicted_s = device, predicted_s
        self.real_batches: list[int] = []

    def signature(self) -> dict:
        return {"model": self.name}

    def default_dtype(self, kind: str) -> str:
        return "float16"

    def weights_description(self) -> str:
        return "simulated"

    def load(self, device: str, dtype: str):
        return None

    def example_batch(self, n: int) -> list:
        return [0] * n

    def predict(self, samples: list) -> list:
        self.real_batches.append(len(samples))
        self.device.run(len(samples))
        return samples

    def probe_batch(self, samples: list) -> float:
        self.device.run(len(samples))  # the peak; the clock is not read for a fast probe
        return self.predicted_s(len(samples))

    def overlaps(self) -> bool:
        return False


def tune(real_s, predicted_s, latency_budget_s=5.0, memory_budget=16 * 2**30):
    device = SimulatedDevice(lambda b: 2**30 + 50 * MiB * b, real_s, capacity_bytes=32 * 2**30, base_bytes=2**30)
    spec = SimulatedGenerator(device, predicted_s)
    lines: list[str] = []
    tuning = autobatch(spec, TuningSettings(memory_budget_bytes=memory_budget, latency_budget_s=latency_budget_s,
                                            max_batch=512, warmup=1, repeats=1),
                       meter=device, loaded=True, say=lines.append)
    return tuning, spec, lines


@settings(max_examples=150, deadline=None)
@given(fixed_s=st.floats(0.5, 3.0), per_sample_s=st.floats(0.005, 0.2), overall=st.floats(0.3, 2.0),
       erratic=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_what_is_stored_is_what_a_real_batch_measured(fixed_s, per_sample_s, overall, erratic, seed):
    rng = random.Random(seed)
    factors = [overall * (1 + erratic * rng.uniform(-0.5, 1.0)) for _ in range(600)]
    real_s = lambda b: fixed_s + per_sample_s * b
    budget_s = 5.0
    tuning, spec, lines = tune(real_s, lambda b: real_s(b) * factors[b], budget_s)
    assert check_tuning(tuning, max_batch=512, latency_budget_s=budget_s, memory_budget_bytes=16 * 2**30) == []
    met = [b for b in set(spec.real_batches) if real_s(b) <= budget_s]
    too_slow = [b for b in set(spec.real_batches) if real_s(b) > budget_s]
    if real_s(1) > budget_s:
        assert tuning.batch_size == 1
        return
    # served at a size whose real batch was measured within the budget, at what it measured
    assert tuning.batch_size in met, (tuning.batch_size, sorted(set(spec.real_batches)), lines)
    assert abs(tuning.serve_latency_s - real_s(tuning.batch_size)) <= 1e-9 * real_s(tuning.batch_size)
    if any("searching again with real batches" in line for line in lines):
        return  # the whole search ran on real batches: its knee, not the fast path's largest measured
    # never less than the largest real batch that met the budgets, below every one that did not
    assert tuning.batch_size == max(b for b in met if not too_slow or b < min(too_slow))
    assert tuning.batch_size <= tuning.max_safe_batch


def test_a_correction_never_serves_less_than_a_real_batch_that_met_the_budget():
    """Predictions 80% of the real time at large batches and right at small ones: the first answer's
    real batch meets the budget but is off by far more than the tolerance; rescaling every prediction
    by that ratio makes the small batches look too slow. The measured batch is served."""
    real_s = lambda b: 1.0 + 0.02 * b
    predicted_s = lambda b: real_s(b) * (1.0 if b < 50 else 0.8)
    tuning, spec, lines = tune(real_s, predicted_s, latency_budget_s=5.0)
    first = spec.real_batches[0]
    assert real_s(first) <= 5.0  # the first check met the budget...
    assert any("rescaled" in line for line in lines)  # ...and was off by more than the tolerance
    assert tuning.batch_size >= first, lines
    assert abs(tuning.serve_latency_s - real_s(tuning.batch_size)) <= 1e-9


def test_an_answer_that_contradicts_its_real_batch_is_measured_again_not_stored():
    """Predictions a fifth of the real time past batch 20: the first answer's real batch is 5x over
    its prediction and the budget, the rescaled predictions put even batch 1 over the budget (the
    H100's "batch 1 on an 80 GB card"), and batch 1's real batch then takes a fifth of what they say.
    The real batches at 1 and the first answer bracket the budget: the size where the line through
    them reaches it is measured and served."""
    real_s = lambda b: 1.0 + 0.05 * b
    predicted_s = lambda b: real_s(b) * (1.0 if b < 20 else 0.2)
    tuning, spec, lines = tune(real_s, predicted_s, latency_budget_s=5.0)
    assert any("measuring a real batch of" in line for line in lines), lines
    assert tuning.batch_size == 80  # 1 + 0.05 x 80 = 5.0 s: the largest within the budget
    assert tuning.batch_size in spec.real_batches
    assert check_tuning(tuning, max_batch=512, latency_budget_s=5.0, memory_budget_bytes=16 * 2**30) == []
