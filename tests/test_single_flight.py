"""Single-flight tuning without Ray (optimizer/flight.py): processes stand as threads, each with its
own cache file (node-local caches), sharing one LeaseTable as the cluster's actor shares one.
tests/test_cluster_single_flight.py runs the same on a real two-node Ray cluster."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from test_cache_trust import SETTINGS, FakeSpec, key_fields, new_device

from optimizer.cache import TuningCache, cache_key
from optimizer.flight import LeasedFlights, LeaseTable
from optimizer.simulated import SimulatedDevice
from optimizer.tune import TuningSettings, autobatch
from optimizer.tuning import CACHED, MEASURED

MiB = 2**20


def slow_device(name="simulated", break_once=None):
    """A simulated device whose batches take real time, so the other threads ask while it tunes.
    `break_once`: an Event shared by all devices; the first batch run on any of them clears it and
    raises (whichever thread got the lease first fails)."""
    device = SimulatedDevice(lambda b: 1000 * MiB + 4 * MiB * b, lambda b: 0.004 + 0.001 * b,
                             capacity_bytes=16000 * MiB, name=name)
    guard = threading.Lock()

    def run(n):
        time.sleep(0.01)
        if break_once is not None:
            with guard:
                broke = break_once.is_set()
                break_once.clear()
            if broke:
                raise RuntimeError("the tuner's process broke")
        device.run(n)

    return device, run


def tune_in_threads(tmp_path, table, devices, **flight_options):
    def one(i):
        device, run = devices[i]
        flights = LeasedFlights(table, holder=f"replica-{i}", poll_s=0.01, **flight_options)
        return autobatch(FakeSpec(), TuningSettings(**SETTINGS), cache=TuningCache(tmp_path / f"node{i}.json"),
                         meter=device, run_batch=run, say=lambda line: None, single_flight=flights)

    with ThreadPoolExecutor(len(devices)) as pool:
        return [pool.submit(one, i) for i in range(len(devices))]


def test_one_of_four_tunes_and_the_others_take_its_answer(tmp_path):
    table = LeaseTable()
    futures = tune_in_threads(tmp_path, table, [slow_device() for _ in range(4)])
    results = [f.result() for f in futures]
    assert sorted(r.cache for r in results) == [CACHED, CACHED, CACHED, MEASURED]
    assert len({(r.batch_size, r.max_safe_batch, r.tuned_at) for r in results}) == 1  # one measurement, four copies
    key = cache_key(key_fields())
    assert table.grants == {key: 1}
    for i in range(4):  # every node's own cache now has it: its next start asks no one
        assert TuningCache(tmp_path / f"node{i}.json").get(key_fields()) is not None


def test_a_new_device_type_is_a_flight_of_its_own(tmp_path):
    table = LeaseTable()
    devices = [slow_device("type-a"), slow_device("type-a"), slow_device("type-b"), slow_device("type-b")]
    results = [f.result() for f in tune_in_threads(tmp_path, table, devices)]
    measured = sorted(r.device.name for r in results if r.cache == MEASURED)
    assert measured == ["type-a", "type-b"] and sorted(table.grants.values()) == [1, 1]


def test_a_failed_tuner_releases_the_key_and_one_waiter_takes_over(tmp_path):
    table = LeaseTable()
    break_once = threading.Event()
    break_once.set()
    futures = tune_in_threads(tmp_path, table, [slow_device(break_once=break_once) for _ in range(3)])
    failed = [f for f in futures if f.exception() is not None]
    assert len(failed) == 1 and "broke" in str(failed[0].exception())
    results = [f.result() for f in futures if f.exception() is None]
    assert sorted(r.cache for r in results) == [CACHED, MEASURED]
    assert table.grants == {cache_key(key_fields()): 2}


def test_a_holder_that_stops_renewing_loses_the_lease_after_it_expires():
    now = [0.0]
    table = LeaseTable(lease_s=60, clock=lambda: now[0])
    assert table.acquire("k", "a")["granted"]
    assert table.acquire("k", "b") == {"granted": False, "answer": None, "holder": "a"}
    now[0] = 50
    assert table.renew("k", "a")  # alive: renewed until 110
    now[0] = 100
    assert not table.acquire("k", "b")["granted"]
    now[0] = 111  # a died (no renewal): b takes over
    assert table.acquire("k", "b")["granted"] and not table.renew("k", "a")
    table.publish("k", "a", {"late": True})  # a's answer, if it ever comes, still reaches the waiters
    assert table.acquire("k", "c")["answer"] == {"late": True}
    now[0] = 111 + table.answer_keep_s + 1  # published answers are kept only for the waiters of the moment
    assert table.acquire("k", "c")["granted"]


def test_an_answer_that_fails_the_trust_checks_is_measured_again(tmp_path):
    table = LeaseTable()
    key = cache_key(key_fields())
    table.publish(key, "someone", {"model": "sim-model", "batch_size": 10**9})
    device, run = slow_device()
    result = autobatch(FakeSpec(), TuningSettings(**SETTINGS), cache=TuningCache(tmp_path / "c.json"), meter=device,
                       run_batch=run, say=lambda line: None, single_flight=LeasedFlights(table))
    assert result.cache == MEASURED and result.batch_size < 10**9


def test_no_lease_service_means_tuning_alone(tmp_path, caplog):
    class Unreachable:
        def acquire(self, key, holder):
            raise ConnectionError("coordinator actor died")

    device = new_device()
    result = autobatch(FakeSpec(), TuningSettings(**SETTINGS), cache=TuningCache(tmp_path / "c.json"), meter=device,
                       run_batch=device.run, say=lambda line: None, single_flight=LeasedFlights(Unreachable()))
    assert result.cache == MEASURED and "tuning without it" in caplog.text


def test_a_forced_retune_takes_no_part_in_a_flight(tmp_path):
    table = LeaseTable()
    device = new_device()
    autobatch(FakeSpec(), TuningSettings(**SETTINGS), cache=TuningCache(tmp_path / "c.json"), meter=device,
              run_batch=device.run, say=lambda line: None, single_flight=LeasedFlights(table), force=True)
    assert table.grants == {}
