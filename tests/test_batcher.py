"""The batcher's entries are whole requests (serve/replica/batcher.py, issue 20): a request's samples travel
as one entry with one future, batches form by sample count, a request larger than the room is split
over batches in order, a bad element fails only its request, a caller gone is not computed, an
out-of-memory splits a batch of slices; and the wait, as @serve.batch's: a batch closes the wait
after its first request, or at once when full or when a request brings its own batch."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.base import PayloadError
from optimizer.devices import make_meter
from serve.replica.batch_runner import BatchRunner, Outcome
from serve.replica.batcher import Batch, Batcher, Entry, Slice


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


class Gate:
    """A device that records each batch (its slices and samples) and holds it until released."""

    def __init__(self):
        self.batches: list[list] = []
        self.slices: list[list[tuple[int, int]]] = []
        self.release: list[asyncio.Event] = []

    async def run(self, batch: Batch):
        self.batches.append(batch.samples())
        self.slices.append([(s.start, s.stop) for s in batch])
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        return [Outcome(200, b"", f"answer {x}") for x in batch.samples()]

    def open_all(self):
        for gate in self.release:
            gate.set()


def values(outcomes):
    return [o.value for o in outcomes]


def test_a_request_is_one_entry_split_over_batches_by_sample_count_in_order():
    async def scenario():
        device = Gate()
        batcher = Batcher(device.run, max_batch_size=4)
        blocker = asyncio.create_task(batcher.submit(Entry(["x"])))
        await settle()
        big = asyncio.create_task(batcher.submit(Entry(list(range(6)))))
        small = asyncio.create_task(batcher.submit(Entry(["a", "b"])))
        await settle()
        assert batcher.waiting_requests == 2 and batcher.waiting_samples == 8
        for i in range(3):
            device.release[i].set()
            await settle()
        # 6 samples: 4 in one batch, the other 2 with the next request's 2; never reordered
        assert device.batches == [["x"], [0, 1, 2, 3], [4, 5, "a", "b"]]
        assert device.slices[2] == [(4, 6), (0, 2)]
        assert values(await big) == [f"answer {i}" for i in range(6)]  # one future, every sample, in order
        assert values(await small) == ["answer a", "answer b"]
        await blocker
        described = batcher.describe()
        assert described["split_requests"] == 1 and described["coalesced_batches"] == 1
        assert described["waiting_samples"] == 0 and described["waiting_requests"] == 0

    asyncio.run(scenario())


def test_a_caller_gone_mid_request_is_not_computed_further_and_the_others_are_answered():
    async def scenario():
        device = Gate()
        batcher = Batcher(device.run, max_batch_size=3)
        gone = asyncio.create_task(batcher.submit(Entry(list(range(7)))))
        await settle()
        kept = asyncio.create_task(batcher.submit(Entry(["k"])))
        await settle()
        assert device.batches == [[0, 1, 2]]
        gone.cancel()
        await settle()
        device.release[0].set()  # the first slice's answers come back to a caller who left: dropped
        await settle()
        assert device.batches[1] == ["k"]  # the rest of the cancelled request never ran
        device.open_all()
        assert values(await kept) == ["answer k"]
        assert batcher.waiting_samples == 0

    asyncio.run(scenario())


def test_the_wait_holds_a_lone_request_for_company_and_a_full_batch_or_a_request_of_many_goes_at_once():
    async def scenario():
        device = Gate()
        batcher = Batcher(device.run, max_batch_size=4, batch_wait_timeout_s=0.2)
        first = asyncio.create_task(batcher.submit(Entry(["a"])))
        await asyncio.sleep(0.05)
        assert device.batches == []  # the device is free, but the wait is not over
        second = asyncio.create_task(batcher.submit(Entry(["b"])))
        await asyncio.sleep(0.3)
        assert device.batches == [["a", "b"]]  # one batch, the wait after its first request
        device.open_all()
        await asyncio.gather(first, second)
        # a full batch does not wait
        many = [asyncio.create_task(batcher.submit(Entry([i]))) for i in range(4)]
        await settle()
        assert device.batches[-1] == [0, 1, 2, 3]
        device.open_all()
        await asyncio.gather(*many)
        # a request that brings its own batch (the OIP route's) is not held
        own = asyncio.create_task(batcher.submit(Entry(["t1", "t2"], waits=False)))
        await settle()
        assert device.batches[-1] == ["t1", "t2"]
        device.open_all()
        await own
        # a wait set while serving applies to the next batch
        batcher.set_batch_wait_timeout_s(0.0)
        lone = asyncio.create_task(batcher.submit(Entry(["z"])))
        await settle()
        assert device.batches[-1] == ["z"]
        device.open_all()
        await lone

    asyncio.run(scenario())


def test_what_waits_for_a_busy_device_is_one_batch_when_it_frees_even_within_the_wait():
    async def scenario():
        device = Gate()
        batcher = Batcher(device.run, max_batch_size=8, batch_wait_timeout_s=0.05)
        first = asyncio.create_task(batcher.submit(Entry(["a"], waits=False)))
        await settle()
        later = [asyncio.create_task(batcher.submit(Entry([i]))) for i in range(3)]
        await asyncio.sleep(0.1)  # they waited out the wait behind the busy device
        assert len(device.batches) == 1
        device.release[0].set()
        await settle()
        assert device.batches[1] == [0, 1, 2]
        device.open_all()
        await asyncio.gather(first, *later)

    asyncio.run(scenario())


# ------------------------------------------------------------ through the batch runner
class Spec:
    """A spec whose predict echoes its samples; 'bad' is a sample only the batch finds bad (a corrupt
    JPEG), 'raise' makes the whole batch raise (the runner retries sample by sample), and a batch
    over `oom_above` runs out of memory."""

    def __init__(self, oom_above: int | None = None):
        self.oom_above, self.batches = oom_above, []

    def overlaps(self):
        return False

    def predict(self, samples):
        self.batches.append(list(samples))
        if self.oom_above is not None and len(samples) > self.oom_above:
            raise RuntimeError("CPU out of memory (injected)")
        if "raise" in samples:
            raise ValueError("this sample breaks the model")
        return [PayloadError("corrupt", 422) if s == "bad" else s for s in samples]

    def encode(self, output):
        return {"echo": output}


class Sink:
    def inc(self, *a, **k): ...

    def observe(self, *a, **k): ...


def runner_for(spec, ooms=None) -> BatchRunner:
    return BatchRunner(spec, make_meter("cpu"), ThreadPoolExecutor(1), Sink(), model_name="echo",
                       before_predict=lambda batch: None,
                       on_oom=lambda n, m: (ooms if ooms is not None else []).append(n))


async def gathered(batcher, requests, keep_value=False):
    """Submit every request while the device is held by a first one, so that they share batches."""
    return await asyncio.gather(*(batcher.submit(Entry(list(r), keep_value=keep_value)) for r in requests))


@pytest.mark.parametrize("failing", ["bad", "raise"])
def test_a_bad_element_fails_only_its_request(failing):
    spec = Spec()
    runner = runner_for(spec)
    batcher = Batcher(runner.run, max_batch_size=16)
    answers = asyncio.run(gathered(batcher, [[1, 2], [3, failing, 4], [5]], keep_value=True))
    assert [[o.status for o in a] for a in answers] == [[200, 200], [200, 422, 200], [200]]
    assert [o.value for o in answers[0]] == [{"echo": 1}, {"echo": 2}]
    assert len(spec.batches[0]) == 6  # one device batch of three requests' samples


def test_an_out_of_memory_splits_a_batch_of_requests_and_every_sample_is_answered_in_order():
    spec, ooms = Spec(oom_above=2), []
    runner = runner_for(spec, ooms)
    batcher = Batcher(runner.run, max_batch_size=16)
    answers = asyncio.run(gathered(batcher, [[0, 1, 2], [3], [4, 5]]))
    assert [[json.loads(o.body)["echo"] for o in a] for a in answers] == [[0, 1, 2], [3], [4, 5]]
    assert ooms and ooms[0] == 6  # the whole batch ran out of memory, then its halves (slices cut) ran
    assert [0, 1, 2] in spec.batches and [3, 4, 5] in spec.batches


def test_a_batch_split_cuts_a_request_s_slice_where_the_halves_meet():
    entry = Entry(list(range(5)))
    other = Entry(["a", "b"])
    batch = Batch([Slice(entry, 1, 5), Slice(other, 0, 2)])
    first, rest = batch.split(3)
    assert first.samples() == [1, 2, 3] and rest.samples() == [4, "a", "b"]
    assert [(s.start, s.stop) for s in rest] == [(4, 5), (0, 2)]
    assert [b.samples() for b in batch.each()] == [[1], [2], [3], [4], ["a"], ["b"]]
    assert len(batch) == 6 and batch.arrivals() == [entry.arrived_s] * 4 + [other.arrived_s] * 2
    assert Batch([Slice(Entry([1], waits=False), 0, 1)]).arrivals() == []


def test_a_failed_batch_fails_each_request_in_it_once_and_the_next_batch_runs():
    async def scenario():
        calls = []

        async def run(batch):
            calls.append(batch.samples())
            if "boom" in batch.samples():
                raise RuntimeError("the device failed")
            return [Outcome(200, b"", x) for x in batch.samples()]

        batcher = Batcher(run, max_batch_size=2)
        split = asyncio.create_task(batcher.submit(Entry(["boom", "x", "y"])))
        with pytest.raises(RuntimeError, match="the device failed"):
            await split
        assert values(await batcher.submit(Entry(["fine"]))) == ["fine"]

    asyncio.run(scenario())
