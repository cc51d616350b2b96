"""serve/replica/admission.py's rules, Ray-free: the expected wait, the bound, a client's deadline, the
memory share, and dropping what expired while it queued."""
from __future__ import annotations

import asyncio

import pytest

from serve.replica.admission import (DEADLINE_HEADER, Admission, Capacity, Refused, capacity_from, parse_deadline_ms,
                                     run_unexpired)
from serve_helpers import make_tuning


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def admission(**cap) -> Admission:
    a = Admission(clock=Clock())
    a.set_capacity(Capacity(**{"batch_size": 4, "batch_time_s": 0.5, "wait_s": 0.01, "latency_budget_s": 1.0, **cap}))
    return a


def test_admits_up_to_the_bound_then_refuses_with_retry_after():
    a = admission()  # bound: 2 x 1.0 s + 0.5 s + wait; a batch of 4 takes 0.5 s -> 5 batches (20 samples) fit, 21 do not
    tickets = [a.admit() for _ in range(20)]
    assert a.pending_samples == 20
    with pytest.raises(Refused) as refused:
        a.admit()
    assert refused.value.status == 503 and refused.value.reason == "overload"
    assert "retry later" in refused.value.message
    assert refused.value.headers() == {"retry-after": "3"}  # 5 batches ahead drain in 2.5 s, rounded up
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert a.pending_samples == 19
    a.admit()


def test_a_batch_slower_than_the_budget_bounds_the_queue_at_two_batches():
    """2 budgets + one batch would be 7 s, less than two 5 s batches: the bound keeps one batch
    computing and the next one filling (10 s + wait), so the device never waits for admission, and
    no more, so a served request waits at most the batch ahead of it."""
    a = admission(batch_time_s=5.0)  # a pinned size over the budget
    for _ in range(8):
        a.admit()
    with pytest.raises(Refused) as refused:
        a.admit()
    assert "at least 2 batches" in refused.value.message
    assert Capacity(4, 5.0, 0.01, 1.0).bound_s(5.0) == pytest.approx(10.01)
    assert Capacity(4, 0.5, 0.01, 1.0).bound_s(0.5) == pytest.approx(2.51)  # 2 x 1 s + 0.5 s + wait


def test_an_idle_replica_admits_what_fits_no_bound():
    a = admission(batch_size=1, batch_time_s=50.0)
    a.admit(samples=8)


def test_deadline_refused_before_it_takes_a_slot_and_carried_on_the_ticket():
    a = admission()
    with pytest.raises(Refused) as refused:
        a.admit(deadline_s=0.2)  # one batch alone takes 0.5 s
    assert refused.value.reason == "deadline" and refused.value.status == 503
    assert DEADLINE_HEADER in refused.value.message
    assert a.pending_samples == 0
    ticket = a.admit(deadline_s=0.6)
    assert ticket.deadline_at == pytest.approx(100.6)


def test_served_batches_slower_than_tuned_tighten_the_bound():
    a = admission()
    for _ in range(20):
        a.record_batch(4, 1.0)
    a.record_batch(2, 9.0)  # a partial batch says nothing about a full one
    assert a.batch_time_s() == pytest.approx(1.0, rel=0.01)
    for _ in range(12):
        a.admit()
    with pytest.raises(Refused):
        a.admit()  # 4 batches of 1 s + wait > 2 x 1 s + 1 s + wait


def test_the_bound_reads_the_tail_of_served_batches_not_their_mean():
    """A bound on served latency's tail needs a tail batch time: 4 slow batches in the last 20 set it,
    and they age out of the window."""
    a = admission()  # batch 4, tuned 0.5 s, budget 1 s
    for elapsed in [0.5] * 16 + [1.0] * 4:
        a.record_batch(4, elapsed)
    assert a.batch_time_s() == pytest.approx(1.0)  # the mean, 0.6 s, would admit a batch more
    for _ in range(12):
        a.admit()
    with pytest.raises(Refused):
        a.admit()  # 4 batches of 1 s + wait > 2 x 1 s + 1 s + wait; at 0.6 s, 16 samples would pass
    for _ in range(20):
        a.record_batch(4, 0.5)
    assert a.batch_time_s() == pytest.approx(0.5)


def test_memory_share_refuses_what_cannot_fit_now_or_ever():
    a = admission(batch_size=8, headroom_bytes=1000.0, per_sample_bytes=100.0)
    with pytest.raises(Refused) as never:
        a.admit(samples=1, body_bytes=2000)
    assert never.value.status == 413 and never.value.reason == "memory"
    tickets = [a.admit(body_bytes=50) for _ in range(5)]  # 5 x 100 + 5 x 50 = 750
    with pytest.raises(Refused) as now:
        a.admit(body_bytes=200)  # 6 x 100 + 250 + 200 = 1050 > 1000
    assert now.value.status == 503 and "retry-after" in now.value.headers()
    for t in tickets:
        t.release()
    a.admit(body_bytes=200)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_bad_deadline_header_says_what_to_send(value):
    with pytest.raises(ValueError, match=DEADLINE_HEADER):
        parse_deadline_ms(value)


def test_deadline_header_in_seconds():
    assert parse_deadline_ms("250") == 0.25 and parse_deadline_ms(None) is None


def test_expired_items_are_answered_without_taking_part_in_the_batch():
    class It:
        def __init__(self, name, deadline_at):
            self.name, self.deadline_at = name, deadline_at

    items = [It("a", None), It("b", 5.0), It("c", 20.0), It("d", 9.0)]
    ran = []

    async def run(batch):
        ran.append([i.name for i in batch])
        return [f"ok-{i.name}" for i in batch]

    out = asyncio.run(run_unexpired(items, run, now=10.0, expired=lambda i: f"expired-{i.name}"))
    assert out == ["ok-a", "expired-b", "ok-c", "expired-d"]
    assert ran == [["a", "c"]]


def test_capacity_from_a_tuning_uses_the_measured_time_at_the_served_size():
    from optimizer.probe import ProbeResult
    from optimizer.tuning import MemoryFit

    probes = (ProbeResult(1, "ok", 100, 0.1, 10.0), ProbeResult(4, "ok", 400, 0.3, 13.0), ProbeResult(8, "ok", 800, 0.6, 13.0))
    t = make_tuning(probes=probes, memory_fit=MemoryFit(0.0, 100.0), base_bytes=50, memory_budget_bytes=2000,
                    max_safe_batch=8, latency_budget_s=1.0)
    cap = capacity_from(t, 4, 0.02)
    assert cap.batch_time_s == pytest.approx(0.3) and cap.wait_s == 0.02
    assert cap.headroom_bytes == 1950 and cap.per_sample_bytes == 100
    assert cap.bound_s(0.3) == pytest.approx(2.32)
    assert capacity_from(make_tuning(), 8, 0.01).headroom_bytes is None  # no memory fit: not bounded by memory


def test_without_a_known_batch_time_one_batch_computes_and_one_fills():
    a = admission(batch_time_s=0.0)
    for _ in range(8):
        a.admit()
    with pytest.raises(Refused):
        a.admit()
    a.record_batch(4, 0.1)  # served batches tell: now the time bound decides
    a.admit()


def test_probes_over_the_latency_budget_still_time_a_pinned_size():
    from optimizer.probe import ProbeResult

    probes = (ProbeResult(1, "over_latency", 100, 0.6, 1.6), ProbeResult(2, "over_latency", 200, 1.1, 1.8))
    assert capacity_from(make_tuning(probes=probes, serve_latency_s=0.0), 2, 0.02).batch_time_s == pytest.approx(1.1)
