"""Search + selection on the simulated device: property-based over memory curves, budgets and
latency curves. The simulated device raises an OOM past its capacity, like a real card."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from optimizer.simulated import SimulatedDevice
from optimizer.search import BatchOneDoesNotFit, Prober, find_max_safe_batch, fit_affine, jitter_bytes, memory_fit_of
from optimizer.probe import ProbeResult
from optimizer.select import MAX_KNEE_PROBES, next_knee_probe, select_serve_batch
from optimizer.wait import batch_wait_timeout_s
from optimizer.tune import TuningSettings, autobatch, tune_on
from optimizer.trust import check_tuning
from optimizer.tuning import Tuning

MiB = 2**20
MAX_BATCH = 4096


def search(device, memory_budget, latency_budget=None, max_batch=MAX_BATCH, margin=0.10, knee=True):
    """knee: the whole decision (tune_on: search, knee probes, selection) -> a Tuning; else the
    max-safe-batch search alone -> its SearchResult. Both carry max_safe_batch, probes, stopped_by,
    notes and oom_events."""
    prober = Prober(device.run, device, memory_budget_bytes=memory_budget, latency_budget_s=latency_budget,
                    base_bytes=device.base_bytes, warmup=1, repeats=2)
    if knee:
        tuning = tune_on(prober, TuningSettings(max_batch=max_batch, margin=margin), say=lambda line: None)
        prober.search_ran = tuning.search_probe_count  # the knee's probes come after these
        return tuning, prober
    result = find_max_safe_batch(prober, max_batch=max_batch, margin=margin)
    prober.search_ran = sum(p.ran for p in prober.probes)
    return result, prober


def true_max(memory, latency, memory_budget, latency_budget, capacity, max_batch=MAX_BATCH, slack=0.0):
    """Brute force: the largest size within every bound (memory curves here are monotone).
    A size exactly at the latency budget may read a hair either side of it through the simulated
    clock's float sums: `slack` widens (+) or narrows (-) the latency bound by that relative amount."""
    limit = min(memory_budget, capacity)
    ok = lambda b: memory(b) <= limit and (latency_budget is None or latency(b) <= latency_budget * (1 + slack))
    if not ok(1):
        return 0
    lo, hi = 1, max_batch + 1
    while hi - lo > 1:  # monotone: binary search is exact
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


affine_case = st.fixed_dictionaries({
    "base": st.integers(50 * MiB, 4000 * MiB),
    "per_sample": st.integers(64 * 1024, 200 * MiB),
    "budget_over_base": st.floats(0.01, 50.0),  # budget = base * (1 + this)
    "capacity_over_budget": st.floats(0.0, 0.5),
})


@settings(max_examples=300, deadline=None)
@given(affine_case)
def test_affine_memory_finds_at_least_95_percent_without_oom_in_few_probes(case):
    base, per_sample = case["base"], case["per_sample"]
    budget = int(base * (1 + case["budget_over_base"]))
    assume(base + per_sample <= budget)
    memory = lambda b: base + per_sample * b
    capacity = int(budget * (1 + case["capacity_over_budget"]))
    device = SimulatedDevice(memory, lambda b: 0.001 + 0.0001 * b, capacity)
    result, prober = search(device, budget, knee=False)
    expected = true_max(memory, None, budget, None, capacity)
    assert memory(result.max_safe_batch) <= budget
    assert result.max_safe_batch <= expected
    assert result.max_safe_batch >= 0.95 * expected
    assert device.oom_count == 0 and result.oom_events == 0
    assert sum(p.ran for p in result.probes) <= 5, [(p.batch_size, p.outcome) for p in result.probes]


@settings(max_examples=200, deadline=None)
@given(
    base=st.integers(100 * MiB, 2000 * MiB),
    per_sample=st.integers(1 * MiB, 50 * MiB),
    quadratic=st.floats(0.0, 0.02),  # MiB per b^2: attention-like growth
    budget_over_base=st.floats(0.1, 20.0),
    fixed_latency_s=st.floats(0.0005, 0.05),
    per_sample_latency_s=st.floats(1e-5, 5e-3),
    latency_budget_s=st.one_of(st.none(), st.floats(0.01, 2.0)),
)
def test_nonlinear_memory_and_latency_curves_stay_within_budgets(base, per_sample, quadratic, budget_over_base,
                                                                  fixed_latency_s, per_sample_latency_s, latency_budget_s):
    budget = int(base * (1 + budget_over_base))
    memory = lambda b: base + per_sample * b + quadratic * MiB * b * b
    # GPU-like latency: flat while the device is not yet full, then linear in the batch.
    latency = lambda b: max(fixed_latency_s, per_sample_latency_s * b)
    assume(memory(1) <= budget and (latency_budget_s is None or latency(1) <= latency_budget_s * (1 - 1e-6)))
    device = SimulatedDevice(memory, latency, budget)
    result, prober = search(device, budget, latency_budget_s)
    chosen = result.max_safe_batch
    assert memory(chosen) <= budget
    assert latency_budget_s is None or latency(chosen) <= latency_budget_s * (1 + 1e-9)
    assert true_max(memory, latency, budget, latency_budget_s, budget, slack=1e-9) >= chosen
    assert chosen >= 0.95 * true_max(memory, latency, budget, latency_budget_s, budget, slack=-1e-9)
    selection = select_serve_batch(prober.probes, chosen, latency_budget_s)
    assert 1 <= selection.batch_size <= chosen
    measured = [p for p in prober.probes if p.ok and p.batch_size <= chosen]
    assert selection.throughput >= 0.95 * max(p.throughput for p in measured) - 1e-9


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.integers(100 * MiB, 2000 * MiB),
    per_sample=st.integers(1 * MiB, 50 * MiB),
    noise=st.floats(0.0, 0.05),
    budget_over_base=st.floats(0.2, 20.0),
    seed=st.integers(0, 2**31),
)
def test_noisy_memory_never_returns_a_size_measured_over_budget(base, per_sample, noise, budget_over_base, seed):
    """Peaks vary from run to run (allocator fragmentation, workspaces): the answer is a size whose
    measured peaks stayed within the budget, and still close to the noise-free maximum."""
    rng = random.Random(seed)
    budget = int(base * (1 + budget_over_base))
    clean = lambda b: base + per_sample * b
    memory = lambda b: clean(b) * (1 + rng.uniform(0, noise))
    assume(clean(1) * (1 + noise) <= budget)
    device = SimulatedDevice(memory, lambda b: 0.01 * b, capacity_bytes=budget * 2, base_bytes=base)
    result, _ = search(device, budget)
    probe = next(p for p in result.probes if p.batch_size == result.max_safe_batch and p.ran)
    assert probe.ok and probe.peak_bytes <= budget
    # The largest size that fits even at the worst noise: what a careful human would call safe.
    always_fits = true_max(lambda b: clean(b) * (1 + noise), None, budget, None, budget * 2)
    if not result.notes:
        assert result.max_safe_batch >= min(0.95 * always_fits, always_fits - 1)  # one step of noise at tiny sizes
    else:
        # Noise over a sample's memory makes sizes unordered: the search keeps the jitter it saw (up to
        # twice the noise, measured against neighbours that are noisy too) under the budget.
        careful = true_max(lambda b: clean(b) * (1 + noise) + 2 * noise * budget, None, budget, None, budget * 2)
        assert result.max_safe_batch >= min(0.95 * careful, careful - 1)


@settings(max_examples=100, deadline=None)
@given(
    base=st.integers(100 * MiB, 2000 * MiB),
    per_sample=st.integers(1 * MiB, 50 * MiB),
    capacity_fraction=st.floats(0.3, 0.95),
)
def test_a_budget_larger_than_the_device_meets_real_ooms_and_survives(base, per_sample, capacity_fraction):
    """The budget says 'all of it', the card has less (another tenant, fragmentation): real OOMs
    happen, are counted, bound the search, and never escape it."""
    budget = base + per_sample * 2000
    capacity = int(budget * capacity_fraction)
    memory = lambda b: base + per_sample * b + (per_sample * b * b / 200)  # bends upward: the fit is optimistic
    assume(memory(2) <= capacity)
    device = SimulatedDevice(memory, lambda b: 0.001 * b, capacity)
    result, _ = search(device, budget)
    assert memory(result.max_safe_batch) <= capacity
    assert result.oom_events == device.oom_count
    assert result.max_safe_batch >= 0.9 * true_max(memory, None, budget, None, capacity)


def test_a_real_oom_is_counted_and_treated_as_an_upper_bound():
    memory = lambda b: 1000 * MiB + 10 * MiB * b
    device = SimulatedDevice(memory, lambda b: 0.01, capacity_bytes=1000 * MiB + 10 * MiB * 300)
    result, _ = search(device, memory_budget=10_000 * MiB, knee=False)  # budget says 900, card holds 300
    assert result.oom_events >= 1 and result.stopped_by in ("oom", "memory")
    assert 285 <= result.max_safe_batch <= 300


def test_batch_one_that_does_not_fit_is_a_clear_error():
    device = SimulatedDevice(lambda b: 900 * MiB + 200 * MiB * b, lambda b: 0.01, capacity_bytes=8000 * MiB)
    prober = Prober(device.run, device, memory_budget_bytes=1000 * MiB, latency_budget_s=None, base_bytes=900 * MiB)
    with pytest.raises(BatchOneDoesNotFit) as err:
        find_max_safe_batch(prober, model_name="resnet50")
    text = str(err.value)
    assert "resnet50" in text and "1000 MiB" in text and "1100 MiB" in text


def test_latency_over_budget_at_batch_one_serves_unbatched_and_says_so():
    device = SimulatedDevice(lambda b: 100 * MiB + MiB * b, lambda b: 0.2 * b, capacity_bytes=8000 * MiB)
    result, _ = search(device, 4000 * MiB, latency_budget=0.1)
    assert result.max_safe_batch == 1 and result.stopped_by == "latency"
    assert "latency budget" in result.notes[0]


def test_knee_selection_prefers_the_smallest_size_near_the_best_throughput():
    # CPU-like: throughput peaks at 8 and falls off beyond; memory is no limit.
    latency = lambda b: 0.01 * b / min(b, 8) * (1 + max(0, b - 8) / 64)
    device = SimulatedDevice(lambda b: 100 * MiB + MiB * b, latency, capacity_bytes=64000 * MiB)
    result, prober = search(device, 32000 * MiB, latency_budget=1.0, max_batch=256)
    selection = select_serve_batch(prober.probes, result.max_safe_batch, 1.0)
    assert result.max_safe_batch >= 150  # the budgets allow far more than is worth serving...
    assert 6 <= selection.batch_size <= 11  # ...but the knee is at 8
    assert "smallest within 95%" in selection.reason or "best measured" in selection.reason


def test_wait_is_derived_from_the_budget_left_after_compute():
    # GPU-like: batch 1 takes 5 ms at 200/s, batch 64 serves 3200/s: wait most of batch 1's compute
    assert batch_wait_timeout_s(0.020, 0.500, 0.005, 200.0, 3200.0) == pytest.approx(0.005 * (1 - 200 / 3200))
    # CPU-like: throughput flat in the batch: waiting buys nothing
    assert batch_wait_timeout_s(0.160, 0.500, 0.080, 12.5, 12.5) == 0.0
    assert batch_wait_timeout_s(0.160, 0.500, 0.080, 12.0, 12.5) == pytest.approx(0.080 * 0.04)
    # never more than half of what the budget leaves after the batch's compute
    assert batch_wait_timeout_s(0.090, 0.100, 0.050, 20.0, 100.0) == pytest.approx(0.005)
    assert batch_wait_timeout_s(0.100, 0.100, 0.050, 20.0, 100.0) == 0.0


def test_affine_fit_recovers_a_line_and_inverts_it():
    fit = fit_affine([(1, 110.0), (2, 120.0), (8, 180.0)])
    assert fit.slope == pytest.approx(10.0) and fit.intercept == pytest.approx(100.0)
    assert fit.max_batch_within(1000.0) == 90


def test_autobatch_on_the_simulated_device_reports_every_probe(tmp_path):
    from optimizer.cache import TuningCache

    from tuning_samples import SimulatedModel as FakeSpec

    device = SimulatedDevice(lambda b: 1000 * MiB + 4 * MiB * b, lambda b: 0.004 + 0.001 * b, capacity_bytes=16000 * MiB)
    lines = []
    cache = TuningCache(tmp_path / "cache.json")
    settings = TuningSettings(memory_budget_bytes=2000 * MiB, latency_budget_s=0.2005)
    result = autobatch(FakeSpec(), settings, cache=cache, meter=device, run_batch=device.run, say=lines.append)
    assert isinstance(result, Tuning)
    assert result.cache == "miss"
    assert result.max_safe_batch == 196  # latency: 0.004 + 0.001 b <= 0.2
    assert 1 <= result.batch_size <= result.max_safe_batch
    assert result.probes and all(isinstance(p, ProbeResult) for p in result.probes)
    assert all({"batch_size", "peak_bytes", "latency_s", "throughput", "outcome"} <= set(p.to_dict()) for p in result.probes)
    assert any("max safe batch 196" in line for line in lines)
    again = autobatch(FakeSpec(), settings, cache=cache, meter=device, run_batch=device.run, say=lines.append)
    assert again.cache == "hit" and again.batch_size == result.batch_size


def test_flat_memory_at_small_sizes_never_leaps_unguarded_to_max_batch():
    """Seen on an H200: batches 1 and 2 read the same peak (the allocator rounds to 2 MiB blocks and
    more), so there is no slope yet; the search must keep doubling, not jump to max_batch."""
    block = 64 * MiB
    memory = lambda b: 700 * MiB + block * math.ceil(6.5 * MiB * b / block)
    device = SimulatedDevice(memory, lambda b: 0.005 + 0.0003 * b, capacity_bytes=4000 * MiB)
    result, _ = search(device, 2048 * MiB, knee=False)
    expected = true_max(memory, None, 2048 * MiB, None, 4000 * MiB)
    assert max(device.runs) <= 2 * expected
    assert device.oom_count == 0
    # A 64 MiB step is ten sizes: from its probes the search cannot tell it from memory that jitters
    # size by size, and keeps one step of headroom under the budget (tests below: the ViT curve).
    stepped = true_max(lambda b: memory(b) + block, None, 2048 * MiB, None, 4000 * MiB)
    assert result.max_safe_batch >= 0.95 * stepped


# GPU-shaped memory, read off the H200 logs (docs/results/h200_*): a base of 0.6-0.9 GiB, a workspace
# from batch 1, then 4-26 MiB per sample, reserved in CUDA's 2 MiB blocks (or exactly).
gpu_case = st.fixed_dictionaries({
    "base": st.integers(600 * MiB, 900 * MiB),
    "workspace": st.integers(0, 60 * MiB),
    "per_sample": st.floats(4 * MiB, 26 * MiB),
    "block": st.sampled_from([1, 2 * MiB]),
    "headroom": st.floats(0.3 * 2**30, 4 * 2**30),  # budget - base
})


@settings(max_examples=300, deadline=None)
@given(gpu_case)
def test_gpu_shaped_memory_takes_at_most_six_search_probes_and_two_for_the_knee(case):
    base, workspace, per_sample, block = case["base"], case["workspace"], case["per_sample"], case["block"]
    memory = lambda b: base if b == 0 else base + block * math.ceil((workspace + per_sample * b) / block)
    budget = int(base + case["headroom"])
    latency = lambda b: math.hypot(0.005, 0.0003 * b)
    # the card holds 10% more than the budget (a real one far more): a size over the budget is
    # measured and bounds the search; one predicted that far under it must never reach the card's end
    device = SimulatedDevice(memory, latency, int(budget * 1.1))
    result, prober = search(device, budget)
    expected = true_max(memory, None, budget, None, budget)
    assume(expected >= 1)
    assert device.oom_count == 0
    assert sum(p.outcome == "over_memory" for p in prober.probes) <= 1
    assert expected >= result.max_safe_batch >= 0.95 * expected
    assert prober.search_ran <= 6, [(p.batch_size, p.outcome) for p in prober.probes]
    assert sum(p.ran for p in prober.probes) - prober.search_ran <= MAX_KNEE_PROBES


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(600 * MiB, 900 * MiB),
    per_sample=st.floats(4 * MiB, 26 * MiB),
    bend_at=st.integers(2, 600),
    shape=st.sampled_from(["quadratic", "step", "steeper"]),
    severity=st.floats(0.05, 2.0),
    headroom=st.floats(0.3 * 2**30, 4 * 2**30),
    latency_jump_at=st.one_of(st.none(), st.integers(2, 600)),
    latency_budget_s=st.one_of(st.none(), st.floats(0.02, 0.5)),
)
def test_curves_that_bend_past_the_measured_sizes_never_give_an_answer_over_budget(
        base, per_sample, bend_at, shape, severity, headroom, latency_jump_at, latency_budget_s):
    """Memory affine for small batches, then past `bend_at`: growing quadratically, stepping up by a
    workspace, or taking more per sample. A jump that trusts the affine part overshoots here. The
    answer is always a size measured within both budgets, never past the true maximum, and an
    overshoot is a measured bound (an OOM is counted), not a crash. >= 95% of the true maximum
    and a bounded probe count hold for bends that the measured sizes can reveal: one past the first
    probes and no steeper than the margin can absorb; a sharper one hidden between batches 1 and 8
    can make the line through them predict batch 8 by luck (git main's search has the same blind
    spot, and takes more OOMs and probes on these curves)."""
    def memory(b):
        if b == 0:
            return base
        past = max(0, b - bend_at)
        extra = {"quadratic": severity * 0.01 * per_sample * past ** 2,
                 "step": severity * 500 * MiB if b >= bend_at else 0.0,
                 "steeper": severity * per_sample * past}[shape]
        return base + 30 * MiB + per_sample * b + extra

    latency = lambda b: math.hypot(0.005, 0.0003 * b) * (3 if latency_jump_at and b > latency_jump_at else 1)
    budget = int(base + headroom)
    assume(memory(1) <= budget and (latency_budget_s is None or latency(1) <= latency_budget_s * (1 - 1e-6)))
    device = SimulatedDevice(memory, latency, budget * 2)
    result, prober = search(device, budget, latency_budget_s)
    chosen = result.max_safe_batch
    measured = prober.by_size(chosen)
    assert measured.ok and measured.peak_bytes <= budget
    assert latency_budget_s is None or measured.latency_s <= latency_budget_s
    expected = true_max(memory, latency, budget, latency_budget_s, budget * 2, slack=-1e-9)
    assert true_max(memory, latency, budget, latency_budget_s, budget * 2, slack=1e-9) >= chosen
    assert result.oom_events == device.oom_count
    if bend_at >= 16 and severity <= 0.5:
        assert chosen >= 0.95 * expected, [(p.batch_size, p.outcome) for p in prober.probes]
        assert device.oom_count <= 1
        if latency_jump_at is None:  # a latency that triples past a size is found by bisection
            assert prober.search_ran <= 12, [(p.batch_size, p.outcome) for p in prober.probes]


@settings(max_examples=200, deadline=None)
@given(fixed_s=st.floats(0.001, 0.05), per_sample_s=st.floats(1e-5, 1e-3), max_batch=st.integers(16, 2048))
def test_the_knee_of_affine_latency_is_found_exactly_in_two_probes_at_most(fixed_s, per_sample_s, max_batch):
    """Latency a + c*b: 1/throughput is a line in 1/b, so the line through the bracket's ends lands
    on the knee: the smallest size within 95% of the best measured throughput, every size counted
    (geometric bisection took four probes to get within 1.3x of it)."""
    latency = lambda b: fixed_s + per_sample_s * b
    device = SimulatedDevice(lambda b: 100 * MiB + MiB * b, latency, capacity_bytes=64000 * MiB)
    result, prober = search(device, 32000 * MiB, max_batch=max_batch)
    selection = select_serve_batch(prober.probes, result.max_safe_batch, None)
    assert sum(p.ran for p in prober.probes) - prober.search_ran <= MAX_KNEE_PROBES
    best = selection.best_throughput
    knee = next(b for b in range(1, result.max_safe_batch + 1) if b / latency(b) >= 0.95 * best * (1 - 1e-12))
    # exactly there, unless the search's own sizes already bracket it within the resolution (1.3x)
    below = max(p.batch_size for p in prober.probes if p.ok and p.batch_size < selection.batch_size)
    assert knee <= selection.batch_size <= max(knee + 1, 1.3 * below)


# ViT-B/16 at a 1 GiB budget on an H200 (docs/results/issue14/h200_search_after-vit_b_16.log): the
# search's probes and the brute force's scan, MiB by batch size. Memory is not monotone here (35 takes
# 1028, over the budget, 36 takes 1014): the workspace differs size by size. The search served 36
# (measured within the budget), over the brute force's 34 (35 fails, and the batcher forms 35 too).
VIT_1GIB_MIB = {0: 788, 1: 829, 5: 850, 19: 921.6, 28: 952, 29: 952, 30: 956, 31: 956, 32: 962, 33: 1004,
                34: 966, 35: 1028, 36: 1014, 37: 1034, 42: 1065}
VIT_1GIB_MS = {1: 6.3, 5: 3.8, 19: 5.6, 32: 7.4, 36: 7.7, 37: 9.7, 42: 9.4}


def table_curve(table: dict, slope_past_end: float):
    """Linear between the measured sizes, `slope_past_end` per size past the last one."""
    sizes = sorted(table)

    def value(b):
        if b in table:
            return table[b]
        if b > sizes[-1]:
            return table[sizes[-1]] + slope_past_end * (b - sizes[-1])
        hi = next(s for s in sizes if s > b)
        lo = max(s for s in sizes if s < b)
        return table[lo] + (table[hi] - table[lo]) * (b - lo) / (hi - lo)
    return value


def test_vit_b16_at_1_gib_is_never_served_over_the_brute_forces_largest_size():
    mib, ms = table_curve(VIT_1GIB_MIB, 6.25), table_curve(VIT_1GIB_MS, 0.2)
    device = SimulatedDevice(lambda b: mib(b) * MiB, lambda b: ms(b) / 1e3, capacity_bytes=2000 * MiB,
                             base_bytes=788 * MiB)
    tuning, prober = search(device, 1024 * MiB, latency_budget=1e6)
    scan = next(b for b in range(1, 100) if mib(b) * MiB > 1024 * MiB) - 1
    assert scan == 34
    assert tuning.max_safe_batch <= scan, [(p.batch_size, p.outcome) for p in prober.probes]
    assert tuning.max_safe_batch >= 0.9 * scan
    assert tuning.batch_size <= tuning.max_safe_batch
    assert prober.by_size(tuning.max_safe_batch).ok
    assert prober.search_ran <= 6, [(p.batch_size, p.outcome) for p in prober.probes]
    assert any("jumps between neighbouring sizes" in note for note in tuning.notes)
    # and the cache serves it: a measured size above the max is the search's own caution, not an edit
    assert check_tuning(tuning, max_batch=MAX_BATCH, latency_budget_s=1e6, memory_budget_bytes=1024 * MiB) == []


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(600 * MiB, 900 * MiB),
    per_sample=st.floats(2 * MiB, 26 * MiB),
    jitter=st.floats(0, 60 * MiB),
    headroom=st.floats(0.05 * 2**30, 2 * 2**30),
    seed=st.integers(0, 2**31),
)
def test_memory_that_jitters_size_by_size_is_never_served_over_a_smaller_size_that_fails(
        base, per_sample, jitter, headroom, seed):
    """A workspace that differs size by size, as ViT-B/16's did on an H200: base + a line + up to
    `jitter` bytes, fixed per size. The answer is a measured good size under every measured failure,
    and whenever the curve keeps within the jitter J the search measured of its memory fit f, it is
    never over the brute force's largest size (the smallest failing size - 1): if 2J <= a sample's
    memory, f(b) + J <= f(b + 1) - J puts the sizes in order; otherwise f(answer) + J <= budget bounds
    every size below it."""
    rng = random.Random(seed)
    extra = [rng.uniform(0, jitter) for _ in range(MAX_BATCH + 2)]
    memory = lambda b: base if b == 0 else base + 20 * MiB + per_sample * b + extra[b]
    budget = int(base + headroom)
    assume(memory(1) <= budget)
    device = SimulatedDevice(memory, lambda b: math.hypot(0.005, 0.0003 * b), budget * 2, base_bytes=base)
    tuning, prober = search(device, budget, latency_budget=1e6)
    chosen = tuning.max_safe_batch
    assert prober.by_size(chosen).ok and tuning.batch_size <= chosen
    failed = [p.batch_size for p in prober.probes if p.ran and not p.ok]
    assert not failed or chosen < min(failed)
    assert check_tuning(tuning, max_batch=MAX_BATCH, latency_budget_s=1e6, memory_budget_bytes=budget) == []
    scan = next((b for b in range(1, MAX_BATCH + 1) if memory(b) > budget), MAX_BATCH + 1) - 1
    searched = [p for p in prober.probes if p.ran][:prober.search_ran]  # J and the fit the search decided on
    measured_jitter, _ = jitter_bytes(searched, base_bytes=base)
    fit = memory_fit_of(searched, base)
    if fit is not None and all(abs(memory(b) - fit.predict(b)) <= measured_jitter for b in range(1, chosen + 2)):
        assert chosen <= scan, [(p.batch_size, p.outcome) for p in prober.probes]


@pytest.mark.xfail(strict=True, reason="known bug, found on a random draw (2026-12-07): memory that grows "
                   "in 2 MiB blocks makes the fit predict batch 14 over the budget by a block's rounding, "
                   "so the search stops at 13 though 14 fits by 1.2 MiB (0.93 of the true maximum)")
def test_a_block_rounded_size_just_under_the_budget_is_measured_not_predicted_over():
    test_gpu_shaped_memory_takes_at_most_six_search_probes_and_two_for_the_knee.hypothesis.inner_test(
        {"base": 629145600, "workspace": 0, "per_sample": 22907353.0, "block": 2097152, "headroom": 322122548.0})


def test_a_convex_bend_is_not_mistaken_for_jitter():
    """Found on a random draw: a point under the line through wide neighbours (memory bending upwards)
    was read as jitter and cut the max safe batch from 271 to 258 (true maximum 272)."""
    test_curves_that_bend_past_the_measured_sizes_never_give_an_answer_over_budget.hypothesis.inner_test(
        base=629145600, per_sample=9910595.0, bend_at=102, shape="quadratic", severity=0.46875,
        headroom=4078094965.0, latency_jump_at=None, latency_budget_s=None)
