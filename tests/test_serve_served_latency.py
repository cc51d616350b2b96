"""Served vs tuned batch times, and the wait re-derived from them (the policy is optimizer/select.py's)."""
from __future__ import annotations

import pytest

from optimizer.select import batch_wait_timeout_s
from serve.served_latency import ServedLatency, TunedLatency


def tuned():
    # batch 1: 100 ms, 2: 120 ms, 4: 160 ms, 8: 240 ms (an affine GPU-like curve)
    return TunedLatency([(1, 0.100), (2, 0.120), (4, 0.160), (8, 0.240)])


def test_tuned_latency_interpolates_between_measured_sizes_and_scales_beyond():
    t = tuned()
    assert t(1) == pytest.approx(0.100) and t(4) == pytest.approx(0.160)
    assert t(3) == pytest.approx(0.140) and t(6) == pytest.approx(0.200)
    assert t(16) == pytest.approx(0.480)  # past the largest measured size: proportional per sample (pessimistic)


def test_tuned_latency_reads_the_tunings_ok_probes_only():
    tuning = {"probes": [{"batch_size": 1, "latency_s": 0.1, "outcome": "ok"},
                         {"batch_size": 4, "latency_s": 0.2, "outcome": "ok"},
                         {"batch_size": 64, "latency_s": None, "outcome": "oom"},
                         {"batch_size": 32, "latency_s": 9.0, "outcome": "over_latency"}]}
    t = TunedLatency.from_tuning(tuning)
    assert t(4) == pytest.approx(0.2) and t(8) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no latency"):
        TunedLatency.from_tuning({"probes": [{"batch_size": 1, "latency_s": None, "outcome": "oom"}]})


def test_the_ratio_is_a_median_over_a_window_and_waits_for_enough_batches():
    served = ServedLatency(tuned(), window=5, min_batches=3)
    served.record(1, 0.020)
    served.record(2, 0.024)
    assert served.ratio is None  # two batches are not enough to move the wait
    served.record(4, 5.0)  # one stall (a size's first run) must not move it
    assert served.ratio == pytest.approx(0.2)
    for _ in range(5):
        served.record(8, 0.480)  # the window forgets the old batches
    assert served.ratio == pytest.approx(2.0) and served.recorded == 8


def test_requests_cheaper_than_the_tuned_worst_case_shorten_the_wait():
    """The CPU Llama case: tuned at its worst case (batch 1 364 ms, 69% gain -> 251 ms wait); real
    requests take a fifth of that, so the same rule gives a fifth of the wait."""
    latency_budget_s, b1, b9, tput1, tput9 = 10.0, 0.364, 1.06, 1 / 0.364, 9 / 1.06
    tuned_wait = batch_wait_timeout_s(b9, latency_budget_s, b1, tput1, tput9)
    ratio = 0.2
    served_wait = batch_wait_timeout_s(b9 * ratio, latency_budget_s, b1 * ratio, tput1 / ratio, tput9 / ratio)
    assert tuned_wait == pytest.approx(0.364 * (1 - tput1 / tput9))
    assert served_wait == pytest.approx(tuned_wait * ratio)


def bare_replica(tuned_wait_s=0.2513, pinned_wait_ms=None):
    """The deployment class without Ray: only what _adapt_wait reads, with the CPU Llama's tuning."""
    from serve.deployment import AutobatchDeployment

    cls = AutobatchDeployment.func_or_class
    replica = object.__new__(cls)
    replica.model_name = "llama_int4"
    replica.tuning = {"probes": [{"batch_size": 1, "latency_s": 0.364, "outcome": "ok"},
                                 {"batch_size": 9, "latency_s": 1.06, "outcome": "ok"}],
                      "serve_latency_s": 1.06, "latency_budget_s": 10.0, "batch1_throughput": 1 / 0.364,
                      "serve_throughput": 9 / 1.06, "batch_wait_timeout_s": tuned_wait_s}
    replica._served = ServedLatency(TunedLatency.from_tuning(replica.tuning))
    replica._served_wait_s, replica._wait_checked_at = None, 0
    replica.applied = []
    replica._apply_batch_settings = lambda: replica.applied.append(replica._served_wait_s)
    return replica


def test_the_replica_rederives_its_wait_every_20_batches_and_only_on_a_real_move():
    replica = bare_replica()
    for _ in range(19):
        replica._served.record(1, 0.070)  # real requests: a fifth of the tuned worst case
        replica._adapt_wait()
    assert replica.applied == []  # 19 batches are not enough
    replica._served.record(1, 0.070)
    replica._adapt_wait()
    ratio = 0.070 / 0.364
    assert replica._served.ratio == pytest.approx(ratio)
    tuned_rule_s = batch_wait_timeout_s(1.06, 10.0, 0.364, 1 / 0.364, 9 / 1.06)  # 246 ms
    assert replica.applied == [pytest.approx(tuned_rule_s * ratio)]  # the same rule at served times: ~47 ms
    for _ in range(20):
        replica._served.record(1, 0.072)  # a 3% drift does not move the wait again
        replica._adapt_wait()
    assert len(replica.applied) == 1
