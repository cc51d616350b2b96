"""The Llama's fast tuning probe (deployments/llama_fast_probe.py, optimizer/fast_probe.py) on the CPU
with the small synthetic config: it peaks at least where a whole generation does, predicts a whole
generation's time, and the tuning it drives is checked by one real generation. CPU timings on a
shared host are noisy; the bounds here are loose on purpose and the numbers are printed (pytest -s).
The GPU target (8B-shaped model, H200) is benchmarks/llama_fast_tuning.py's."""
from __future__ import annotations

import time

import pytest

from deployments.llama_int4 import LlamaInt4Spec
from optimizer.devices import CpuMeter
from optimizer.tune import TuningSettings, autobatch

PROMPT, NEW = 96, 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    spec = LlamaInt4Spec(max_prompt_tokens=PROMPT, max_new_tokens=NEW,
                         model_cache_dir=str(tmp_path_factory.mktemp("llama-models")))
    spec.load("cpu", "float32")
    return spec


def measure(meter, run):
    meter.cleanup()
    meter.reset_peak()
    started = time.perf_counter()
    value = run()
    return meter.peak_bytes(), time.perf_counter() - started, value


def test_the_fast_probe_peaks_where_a_whole_generation_does_and_predicts_its_time(llama):
    meter = CpuMeter()
    samples = llama.example_batch(4)
    llama.probe_batch(samples)  # first runs pay one-off set-up; neither side below should
    llama.predict(samples)
    full_peak, full_s, _ = measure(meter, lambda: llama.predict(samples))
    fast_peak, fast_s, predicted_s = measure(meter, lambda: llama.probe_batch(samples))
    print(f"\nbatch 4, {PROMPT}+{NEW} tokens: whole generation {full_s:.2f} s, peak {full_peak / 2**20:.0f} MiB; "
          f"fast probe {fast_s:.2f} s, peak {fast_peak / 2**20:.0f} MiB, predicted {predicted_s:.2f} s")
    assert fast_peak >= 0.97 * full_peak
    assert 0.5 * full_s <= predicted_s <= 2.0 * full_s


def test_a_tuning_through_fast_probes_is_checked_by_one_real_generation(llama):
    settings = dict(device="cpu", memory_budget_bytes=8 * 2**30, latency_budget_s=120.0, max_batch=2,
                    warmup=1, repeats=1)
    lines = []
    started = time.perf_counter()
    fast = autobatch(llama, TuningSettings(**settings), loaded=True, say=lines.append, meter=CpuMeter())
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    full = autobatch(llama, TuningSettings(**settings, fast_probes=False), loaded=True, say=lambda line: None,
                     meter=CpuMeter())
    full_s = time.perf_counter() - started
    print(f"\nfast probes: {fast.probe_count} probes, {fast_s:.1f} s, max safe {fast.max_safe_batch}, serving "
          f"{fast.batch_size}; whole generations: {full.probe_count} probes, {full_s:.1f} s, max safe "
          f"{full.max_safe_batch}, serving {full.batch_size}")
    assert any("checked by one real batch" in note for note in fast.notes), fast.notes
    assert any("checked by one real batch" in line for line in lines)
    assert not any("checked by one real batch" in note for note in full.notes)
    assert fast.max_safe_batch == full.max_safe_batch == 2  # both bounded by max_batch within these budgets
