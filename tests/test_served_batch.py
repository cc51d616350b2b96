"""The batch re-decided when served batches run slower than the tuning measured (optimizer/served.py),
the controller that checks it (optimizer/wait.py), and how the replica's settings take it
(serve/replica/settings.py): never above the tuned batch, never over a pin, back once the budget fits again."""
from __future__ import annotations

import pytest
from serve_helpers import make_tuning

from optimizer.probe import ProbeResult
from optimizer.served import ServedBatch, served_batch
from optimizer.wait import WaitController, WaitControllerConfig
from serve.replica.settings import Pins, effective_settings

# batch 1: 20 ms ... batch 32: 80 ms; the tuning served 32 within a 100 ms budget
PROBES = tuple(ProbeResult(b, "ok", latency_s=s, throughput=b / s)
               for b, s in ((1, 0.020), (4, 0.026), (8, 0.034), (16, 0.050), (32, 0.080)))
TUNING = make_tuning(batch_size=32, max_safe_batch=32, latency_budget_s=0.100, serve_latency_s=0.080,
                     serve_throughput=400.0, probes=PROBES)


def test_a_ratio_that_keeps_the_tuned_batch_within_budget_changes_nothing():
    assert served_batch(TUNING, None) is None
    assert served_batch(TUNING, 1.05) is None  # the probes' own spread
    assert served_batch(TUNING, 1.2) is None  # 96 ms: still within the 100 ms budget


def test_slower_served_batches_lower_the_batch_by_the_tunings_own_rule():
    decided = served_batch(TUNING, 1.5)  # batch 32 would take 120 ms; 16 takes 75 ms
    assert decided == ServedBatch(16, 32, 1.5, decided.reason)
    assert "batch 32 would take 120 ms, over the 100 ms budget" in decided.reason
    assert "tuned batch 32, now 16" in decided.reason
    assert served_batch(TUNING, 6.0).size == 1  # only batch 1 fits (120 ms is over: unbatched)


def test_a_lowered_batch_goes_back_only_once_the_tuned_one_fits_well_within_the_budget():
    assert served_batch(TUNING, 1.2, lowered=True).size == 16  # 96 ms is within, but not within 90%
    assert served_batch(TUNING, 1.1, lowered=True) is None  # 88 ms: back to 32
    assert served_batch(TUNING, 1.0, lowered=True) is None


def test_the_controller_re_decides_the_batch_once_enough_batches_ran_and_says_so():
    wait = WaitController(TUNING, WaitControllerConfig(check_every_batches=5, latency_window_batches=5))
    t = 0.0
    changed = []
    for _ in range(5):  # full batches of 32 taking 1.5x the tuning's 80 ms
        changed.append(wait.record([t] * 32, t, 0.120, 32, 0.0, batch_size=32))
        t += 0.2
    assert changed[-1] is True and not any(changed[:-1])
    assert wait.served_batch.size == 16 and wait.ratio == pytest.approx(1.5)
    for _ in range(5):  # batches of 16 as fast as tuned again: the batch goes back to the tuning's
        wait.record([t] * 16, t, 0.050, 16, 0.0, batch_size=16)
        t += 0.2
    assert wait.ratio == pytest.approx(1.0) and wait.served_batch is None


def test_the_settings_take_the_served_batch_under_a_pin_and_above_an_oom_cap():
    lowered = ServedBatch(16, 32, 1.5, "served batches take 1.50x the tuning's time")
    s = effective_settings(TUNING, Pins(), None, 64, None, lowered)
    assert s.size == 16 and "batch re-decided from served batches: served batches take 1.50x" in s.reasons[0]
    assert effective_settings(TUNING, Pins(batch_size=24), None, 64, None, lowered).size == 24  # a pin wins
    assert effective_settings(TUNING, Pins(), 8, 64, None, lowered).size == 8  # an OOM's cap still holds
    assert effective_settings(TUNING, Pins(), None, 64, None, None).size == 32


def test_once_the_batch_is_lowered_the_wait_rule_uses_the_lowered_batchs_time():
    from optimizer.wait import batch_wait_timeout_s

    wait = WaitController(TUNING, WaitControllerConfig(check_every_batches=5, latency_window_batches=5))
    t = 0.0
    for _ in range(5):  # full batches of 32 taking 1.5x the tuning's 80 ms: 120 ms, over the 100 ms budget
        wait.record([t] * 32, t, 0.120, 32, 0.0, batch_size=32)
        t += 0.2
    assert wait.served_batch.size == 16
    fraction = wait.config.budget_fraction
    batch1_s = 0.020 * 1.5
    at_tuned_batch = batch_wait_timeout_s(0.080 * 1.5, 0.100, batch1_s, 1 / batch1_s, 400.0 / 1.5, fraction)
    at_lowered_batch = batch_wait_timeout_s(0.050 * 1.5, 0.100, batch1_s, 1 / batch1_s, 16 / 0.050 / 1.5, fraction)
    assert at_tuned_batch == 0.0 < at_lowered_batch  # the tuned batch's time leaves no wait; 16's 75 ms leaves some
    ceiling_s, why = wait._ceiling()
    assert ceiling_s == pytest.approx(at_lowered_batch)
    assert "served batches take 1.50x" in why
