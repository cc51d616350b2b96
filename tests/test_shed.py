"""The router's shedding (serve/oip/shed.py) and the admission room it reads (serve/replica/admission.py
Admission.room): pure, no Ray, no timing. The rule under test: the router refuses exactly what the
replica's own admission would refuse, from the replica's last answer and its own in-flight count."""
from __future__ import annotations

import pytest

from serve.replica.admission import Admission, Capacity, Refused
from serve.oip.shed import VIEW_TTL_S, ModelShedder, RouterShedder, Shed, content_length


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tuned_admission(batch_size=8, batch_time_s=0.5, wait_s=0.01, budget_s=0.5) -> Admission:
    admission = Admission(clock=lambda: 0.0)
    admission.set_capacity(Capacity(batch_size, batch_time_s, wait_s, budget_s))
    return admission


def test_room_is_the_overload_rule_solved_for_the_queue():
    admission = tuned_admission()  # bound = max(2*0.5 + 0.5, 2*0.5) + 0.01 = 1.51 s: 3 batches of 8
    room = admission.room("r1")
    assert room["replica"] == "r1" and room["room_samples"] == 24
    tickets = [admission.admit(samples=1) for _ in range(room["room_samples"])]  # every one of them fits
    with pytest.raises(Refused):
        admission.admit(samples=1)  # one more does not
    room = admission.room("r1")
    assert room["pending_samples"] == 24 and room["drain_s"] == pytest.approx(3 * 0.5)
    for t in tickets:
        t.release()
    assert admission.room("r1")["pending_samples"] == 0


def test_room_unknown_before_tuning():
    assert Admission().room("r1")["room_samples"] is None


def test_sheds_what_the_replica_would_refuse_and_forwards_the_rest():
    admission = tuned_admission()
    shedder = ModelShedder("m", clock=Clock())
    shedder.check(8)  # no replica heard from yet: forwarded
    shedder.observe(admission.room("r1"))
    with shedder.forwarding(16):
        shedder.check(8)  # 16 + 8 = 24 fits the room
        with shedder.forwarding(8):
            with pytest.raises(Shed) as refused:
                shedder.check(1)  # 25 does not
            assert refused.value.status == 503 and int(refused.value.headers()["retry-after"]) >= 1
            assert "at capacity" in refused.value.body()["error"]
    assert shedder.in_flight_samples == 0
    shedder.check(1000)  # nothing in flight: a replica with an empty queue takes it, so the router forwards
    assert shedder.shed_count == 1


def test_in_flight_is_released_when_the_forward_fails():
    shedder = ModelShedder("m", clock=Clock())
    with pytest.raises(RuntimeError):
        with shedder.forwarding(5):
            raise RuntimeError("replica died")
    assert shedder.in_flight_samples == 0


def test_rooms_of_several_replicas_add_up_and_stale_ones_drop_out():
    clock = Clock()
    shedder = ModelShedder("m", clock=clock)
    shedder.observe({"replica": "a", "room_samples": 24, "drain_s": 1.0})
    shedder.observe({"replica": "b", "room_samples": 24, "drain_s": 2.0})
    assert shedder.room() == (48, 2.0)
    shedder.observe({"replica": "a", "room_samples": 16, "drain_s": 0.5})  # the newest answer wins
    assert shedder.room() == (40, 2.0)
    clock.now += VIEW_TTL_S + 1
    shedder.observe({"replica": "b", "room_samples": 24, "drain_s": 2.0})
    assert shedder.room() == (24, 2.0)  # a: not heard from within the TTL
    clock.now += VIEW_TTL_S + 1
    assert shedder.room() is None
    shedder.observe(None)  # an answer without a room (an older replica) changes nothing
    shedder.observe({"replica": "c", "room_samples": None})  # nor one from an untuned replica
    assert shedder.room() is None


def test_samples_before_the_body_from_content_length():
    shedder = ModelShedder("m", clock=Clock())
    assert shedder.estimate_samples(3_600_000) == 1  # nothing parsed yet: one sample
    shedder.observe_body(32 * 1000 + 200, 32)  # ~1006 bytes a sample, JSON header included
    assert shedder.estimate_samples(32 * 1000 + 200) == 32
    assert shedder.estimate_samples(500) == 1  # never below one
    assert shedder.estimate_samples(None) == 1
    assert content_length({"content-length": "123"}) == 123
    assert content_length({"content-length": "x"}) is None and content_length({}) is None


def test_router_counts_and_logs_at_a_rate(caplog):
    clock = Clock()

    class Count:
        def __init__(self):
            self.tags = []

        def inc(self, tags):
            self.tags.append(tags)

    counter = Count()
    router = RouterShedder(["m", "n"], clock=clock, counter=counter)
    router["m"].observe({"replica": "a", "room_samples": 8, "drain_s": 1.0})
    router["m"].observe_body(10_000, 10)
    with router["m"].forwarding(8), caplog.at_level("WARNING", logger="ray.serve"):
        for _ in range(3):
            with pytest.raises(Shed):
                router.check_before_body("m", 1000)
        router.check("n", 8)  # another model's view is its own
    assert counter.tags == [{"model": "m"}] * 3
    lines = [r.getMessage() for r in caplog.records if "router shed" in r.getMessage()]
    assert len(lines) == 1 and "for m" in lines[0]  # once per SHED_LOG_INTERVAL_S, not per request
    assert router.describe()["m"]["shed"] == 3 and router.describe()["n"]["shed"] == 0


def test_requests_on_their_way_are_not_counted_as_held_by_the_replica():
    """The router's in-flight count runs ahead of the replica's pending by what is in transit; the
    answers' pending samples correct it, so the router does not shed what the replica would take."""
    shedder = ModelShedder("m", clock=Clock())
    with shedder.forwarding(96):  # three requests of 32 in flight, the replica holds two of them
        for _ in range(40):
            shedder.observe({"replica": "a", "room_samples": 112, "drain_s": 1.0, "pending_samples": 64})
        assert shedder.pending_estimate() == pytest.approx(64, abs=0.5)
        shedder.check(32)  # 64 + 32 <= 112: the replica would admit it, so it is forwarded
        with shedder.forwarding(32):
            with pytest.raises(Shed):
                shedder.check(32)  # about 96 + 32 > 112
    # another router's requests at the replica count the other way: more held than this one sent
    other = ModelShedder("m", clock=Clock())
    with other.forwarding(32):
        for _ in range(40):
            other.observe({"replica": "a", "room_samples": 112, "drain_s": 1.0, "pending_samples": 96})
        with pytest.raises(Shed):
            other.check(32)  # 32 + ~64 held for others + 32 > 112
