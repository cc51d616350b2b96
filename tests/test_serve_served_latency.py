"""Served vs tuned batch times, arrivals, and the wait re-derived from them (optimizer/wait.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
from serve_helpers import make_tuning

from optimizer.probe import ProbeResult
from optimizer.wait import (ArrivalLog, BatchObservation, ServedLatency, TunedLatency, WaitController,
                            WaitControllerConfig, WaitState, batch_wait_timeout_s, wait_from_arrivals)


def tuned():
    # batch 1: 100 ms, 2: 120 ms, 4: 160 ms, 8: 240 ms (an affine GPU-like curve)
    return TunedLatency([(1, 0.100), (2, 0.120), (4, 0.160), (8, 0.240)])


def test_tuned_latency_interpolates_between_measured_sizes_and_scales_beyond():
    t = tuned()
    assert t(1) == pytest.approx(0.100) and t(4) == pytest.approx(0.160)
    assert t(3) == pytest.approx(0.140) and t(6) == pytest.approx(0.200)
    assert t(16) == pytest.approx(0.480)  # past the largest measured size: proportional per sample (pessimistic)


def test_tuned_latency_reads_the_tunings_ok_probes_only():
    probes = [ProbeResult(1, "ok", latency_s=0.1), ProbeResult(4, "ok", latency_s=0.2),
              ProbeResult(64, "oom", latency_s=None), ProbeResult(32, "over_latency", latency_s=9.0)]
    t = TunedLatency.from_probes(probes)
    assert t(4) == pytest.approx(0.2) and t(8) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no latency"):
        TunedLatency.from_probes([ProbeResult(1, "oom", latency_s=None)])


def test_the_ratio_is_a_median_over_a_window_and_waits_for_enough_batches():
    served = ServedLatency(tuned(), WaitControllerConfig(latency_window_batches=5, check_every_batches=3))
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


def test_seconds_long_batches_are_enough_after_three():
    """The 8B Llama on an H200: 1-5 s batches. 20 of them are minutes of a wrong wait."""
    served = ServedLatency(tuned(), WaitControllerConfig(check_every_batches=20, slow_check_batches=3, slow_check_s=2.0))
    served.record(1, 2.0)
    served.record(1, 2.0)
    assert served.ratio is None
    served.record(1, 2.0)
    assert served.ratio == pytest.approx(20.0)
    fast = ServedLatency(tuned())
    for _ in range(19):
        fast.record(1, 0.1)
    assert fast.ratio is None  # 1.9 s in 19 batches: not slow, so the 20 rule holds
    fast.record(1, 0.1)
    assert fast.ratio == pytest.approx(1.0)


def test_the_arrival_log_keeps_spread_and_time_held_of_batches_short_of_full():
    log = ArrivalLog(window=3)
    log.record([10.000, 10.004, 10.010], started_s=10.050, max_batch_size=8, wait_s=0.020)
    log.record([11.0, 11.001], started_s=11.0, max_batch_size=2, wait_s=0.020)  # full: ended its wait early
    log.record([12.0], started_s=12.005, max_batch_size=8, wait_s=0.020)  # ran before its window closed: held 0
    first, second = log.batches()
    assert first.spread_s == pytest.approx(0.010) and first.held_s == pytest.approx(0.030) and first.wait_s == 0.020
    assert second.spread_s == 0.0 and second.held_s == 0.0 and log.recorded == 2


def test_arrivals_are_read_from_the_last_10_s_but_at_least_3_batches():
    log = ArrivalLog(window=20)
    for t in range(5):  # a burst's batches, then a lone client's, seconds apart
        log.record([t, t + 0.1], started_s=t + 0.2, max_batch_size=8, wait_s=0.3)
    for t in (20, 25):
        log.record([t], started_s=t + 0.001, max_batch_size=8, wait_s=0.3)
    assert [b.spread_s for b in log.batches(max_age_s=10)] == pytest.approx([0.1, 0.0, 0.0])  # fewer than 3 recent: newest 3
    log.record([28], started_s=28.001, max_batch_size=8, wait_s=0.3)
    assert [b.spread_s for b in log.batches(max_age_s=10)] == [0.0, 0.0, 0.0]
    assert len(log.batches()) == 8
    log.clear()
    assert log.batches(max_age_s=10) == []


def test_a_lone_clients_batches_wait_the_floor_not_the_rule():
    lone = [BatchObservation(0.0, 0.0, 1.8)] * 5  # batches of one, each run as soon as its window closed
    wait_s, why = wait_from_arrivals(1.8, lone)
    assert wait_s == pytest.approx(0.001) and "at least 1 ms" in why


def test_a_burst_that_lands_early_in_the_window_waits_a_margin_over_its_spread():
    burst = [BatchObservation(0.020, 0.0, 1.2)] * 9 + [BatchObservation(0.030, 0.0, 1.2)]  # 8 closed-loop clients answered together
    wait_s, _ = wait_from_arrivals(1.2, burst)
    assert wait_s == pytest.approx(3 * 0.030)  # the 90th percentile spread, x3


def test_arrivals_that_fill_the_window_or_batches_held_by_a_busy_device_keep_the_rules_wait():
    filling = [BatchObservation(0.009, 0.0, 0.010)] * 10  # steady arrivals until the window closes: more would come
    assert wait_from_arrivals(0.040, filling)[0] == 0.040
    split = [BatchObservation(0.0, 0.9, 0.001)] * 6 + [BatchObservation(0.0, 0.0, 0.001)] * 4  # closed at 1 ms, then waited 0.9 s for the device
    wait_s, why = wait_from_arrivals(1.2, split)
    assert wait_s == 1.2 and "busy device" in why
    # 4 clients out of step: batches of one closed at 61 ms, run 200 ms later. The batcher merged
    # what sat, so the wait stays the rule's rather than growing to the 261 ms they sat
    convoy = [BatchObservation(0.0, 0.200, 0.061)] * 10
    assert wait_from_arrivals(0.061, convoy)[0] == pytest.approx(0.061)
    assert wait_from_arrivals(0.001, convoy)[0] == pytest.approx(0.001)  # nor past a ceiling the served times cut
    assert wait_from_arrivals(0.0, filling)[0] == 0.0  # the rule says waiting gains nothing: no arrivals change that
    assert wait_from_arrivals(0.5, [])[0] == 0.5


def llama_tuning(tuned_wait_s=0.2513):
    """The CPU Llama's tuning: batch 1 364 ms and 9 1.06 s, for its worst-case request."""
    return make_tuning(probes=(ProbeResult(1, "ok", latency_s=0.364), ProbeResult(9, "ok", latency_s=1.06)),
                     serve_latency_s=1.06, latency_budget_s=10.0, batch1_throughput=1 / 0.364,
                     serve_throughput=9 / 1.06, batch_wait_timeout_s=tuned_wait_s)


def serve_batch(wait, size, start, took_s, spread_s=0.0, held_s=0.0, max_batch=9):
    """One batch of `size` requests whose arrivals spread over `spread_s`, run `held_s` after its window."""
    arrivals = [start + spread_s * i / max(1, size - 1) for i in range(size)]
    return wait.record(arrivals, start + wait.current_s + held_s, took_s, max_batch, wait.current_s)


def test_the_served_wait_scales_the_rule_then_cuts_it_to_what_arrivals_use():
    wait = WaitController(llama_tuning())
    moved = [serve_batch(wait, 4, i, 0.1, spread_s=0.001) for i in range(19)]
    assert not any(moved) and wait.wait_s is None  # 19 fast batches are not enough (1.9 s: not slow ones either)
    assert serve_batch(wait, 4, 19, 0.1, spread_s=0.001)
    ratio = 0.1 / TunedLatency.from_probes(llama_tuning().probes)(4)
    assert wait.ratio == pytest.approx(ratio)
    ceiling = batch_wait_timeout_s(1.06 * ratio, 10.0, 0.364 * ratio, 1 / 0.364 / ratio, 9 / 1.06 / ratio)
    assert wait.wait_s == pytest.approx(min(ceiling, 3 * 0.001))
    assert "arrived within 1.0 ms" in wait.reason
    for i in range(25):  # the same traffic again: no move (checked 3 batches after the move, then every 20)
        assert not serve_batch(wait, 4, 100 + i, 0.1, spread_s=0.001)


def test_slow_batches_move_the_wait_after_three():
    """The 8B Llama at one client: the tuning's 1.8 s wait, 1.2 s batches of one."""
    wait = WaitController(replace(llama_tuning(1.8), probes=(ProbeResult(1, "ok", latency_s=3.6),
                                                             ProbeResult(64, "ok", latency_s=6.0)),
                                  serve_latency_s=6.0, batch1_throughput=1 / 3.6, serve_throughput=64 / 6.0))
    assert not serve_batch(wait, 1, 0, 1.2, max_batch=64)
    assert not serve_batch(wait, 1, 10, 1.2, max_batch=64)
    assert serve_batch(wait, 1, 20, 1.2, max_batch=64)  # three batches, 3.6 s: enough
    assert wait.wait_s == pytest.approx(0.001) and wait.current_s == wait.wait_s
    # batches formed under the old wait and run after the move are not read against the new one
    assert not serve_batch(wait, 1, 22.5, 1.2, max_batch=64) and wait.arrivals.batches() == []  # arrived before 23.0
    # load arrives: batches sit behind the running one, so the device, not the wait, sets their size,
    # and the wait goes back to the rule's (at the served times) instead of staying cut to 1 ms
    moved = [serve_batch(wait, 2, 40 + i, 1.3, spread_s=0.0005, held_s=1.0, max_batch=64) for i in range(4)]
    assert any(moved) and wait.wait_s > 0.5 and "busy device" in wait.reason
    assert wait.reason.endswith(f"-> {wait.wait_s * 1e3:.1f} ms") and f"the rule's {wait.wait_s * 1e3:.1f} ms" in wait.reason
    grown_s = wait.wait_s
    for i in range(6):  # then the batches fill up: a full batch says nothing about the wait, which stays
        assert not serve_batch(wait, 64, 60 + 10 * i, 2.0, spread_s=0.2, max_batch=64)
    assert wait.wait_s == grown_s


def test_the_controller_judges_a_new_wait_after_three_batches_then_goes_back_to_its_schedule():
    wait = WaitController(llama_tuning())
    assert wait.state is WaitState.TUNED and wait.learnt is None
    for i in range(20):
        serve_batch(wait, 4, i, 0.1, spread_s=0.001)
    assert wait.state is WaitState.CHECKING_NEW_WAIT and wait.learnt.wait_s == wait.current_s
    for i in range(2):  # fewer than min_arrival_batches formed under the new wait: not judged yet
        assert not serve_batch(wait, 4, 100 + i, 0.1, spread_s=0.001)
        assert wait.state is WaitState.CHECKING_NEW_WAIT
    assert not serve_batch(wait, 4, 102, 0.1, spread_s=0.001)  # the third: judged right, kept
    assert wait.state is WaitState.LEARNT


def test_a_config_changes_the_schedule_and_the_reading_of_arrivals():
    quick = WaitControllerConfig(check_every_batches=5, margin=2.0)
    wait = WaitController(llama_tuning(), quick)
    assert not any(serve_batch(wait, 4, i, 0.1, spread_s=0.010) for i in range(4))
    assert serve_batch(wait, 4, 4, 0.1, spread_s=0.010)  # 5 batches are enough under this config
    assert wait.wait_s == pytest.approx(2.0 * 0.010) and "2x that" in wait.reason


def test_a_batch_that_skipped_the_wait_counts_its_time_but_not_its_arrivals():
    """A tensor request is not held for the wait (it brings its own batch): its batch's time scales the
    rule like any other, but when it arrived says nothing about the wait."""
    wait = WaitController(llama_tuning())
    for i in range(20):
        wait.record([], started_s=float(i), elapsed_s=0.2, max_batch_size=9, wait_s=wait.current_s, batch_size=4)
    assert wait.latency.recorded == 20 and wait.ratio == pytest.approx(0.2 / TunedLatency.from_probes(llama_tuning().probes)(4))
    assert wait.arrivals.batches() == [] and wait.arrivals.recorded == 0
