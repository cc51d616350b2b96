"""The batcher (serve/replica/batcher.py) as a device queue: a device batch is formed when a slot frees, from
every request that waited meanwhile, oldest first, never over the max batch size. (Its requests of
one sample and the wait: tests/test_batcher.py.)"""
from __future__ import annotations

import asyncio

import pytest

from serve.replica.batcher import Batcher, Entry


class Device:
    """A stand-in for the batch runner: records each batch and holds it until released."""

    def __init__(self):
        self.batches: list[list] = []
        self.release: list[asyncio.Event] = []
        self.running = 0
        self.most_running = 0
        self.fail_on = set()

    async def run(self, batch):
        items = batch.samples()
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.release.append(gate)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await gate.wait()
        finally:
            self.running -= 1
        if any(item in self.fail_on for item in items):
            raise RuntimeError("the model failed")
        return [f"answer {item}" for item in items]


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


class DeviceQueue(Batcher):
    """The batcher with no wait, fed requests as the device queue was fed @serve.batch's batches:
    `put(samples)` is one request of those samples."""

    def put(self, samples):
        return self.submit(Entry(list(samples)))


def test_what_arrives_while_the_device_is_busy_forms_one_batch_when_it_frees():
    async def scenario():
        device = Device()
        queue = DeviceQueue(device.run, max_batch_size=8, slots=1)
        first = asyncio.create_task(queue.put(["a"]))
        await settle()
        assert device.batches == [["a"]]  # the device was free: the first batch went at once
        later = [asyncio.create_task(queue.put(items)) for items in (["b", "c"], ["d"], ["e", "f", "g"])]
        await settle()
        assert device.batches == [["a"]] and queue.waiting_samples == 6  # three clock batches wait
        device.release[0].set()
        await settle()
        assert device.batches[1] == ["b", "c", "d", "e", "f", "g"]  # one device batch, in arrival order
        device.release[1].set()
        assert await first == ["answer a"]
        assert [await t for t in later] == [["answer b", "answer c"], ["answer d"], ["answer e", "answer f", "answer g"]]
        assert queue.describe()["coalesced_batches"] == 1 and queue.describe()["device_batches"] == 2

    run(scenario())


def test_a_device_batch_never_exceeds_the_max_and_a_split_put_keeps_its_order():
    async def scenario():
        device = Device()
        queue = DeviceQueue(device.run, max_batch_size=4, slots=1)
        blocker = asyncio.create_task(queue.put(["x"]))
        await settle()
        big = asyncio.create_task(queue.put(list(range(10))))
        await settle()
        for i in range(4):
            device.release[i].set()
            await settle()
        assert device.batches == [["x"], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert await big == [f"answer {i}" for i in range(10)]
        await blocker

    run(scenario())


def test_the_max_batch_size_set_while_serving_applies_to_the_next_batch():
    async def scenario():
        device = Device()
        queue = DeviceQueue(device.run, max_batch_size=8, slots=1)
        asyncio.create_task(queue.put(["x"]))
        await settle()
        task = asyncio.create_task(queue.put(list(range(6))))
        await settle()
        queue.set_max_batch_size(2)
        for i in range(4):
            device.release[i].set()
            await settle()
        assert [len(b) for b in device.batches] == [1, 2, 2, 2]
        await task

    run(scenario())


def test_two_slots_let_a_second_batch_in_while_the_first_runs_and_no_third():
    async def scenario():
        device = Device()
        queue = DeviceQueue(device.run, max_batch_size=2, slots=2)
        tasks = []
        for i in range(3):  # three clock batches, each after the last was taken
            tasks.append(asyncio.create_task(queue.put([i])))
            await settle()
        # the first two went out as two batches (each found a free slot); the third waits
        assert device.batches == [[0], [1]] and queue.waiting_samples == 1 and device.most_running == 2
        device.release[0].set()
        await settle()
        assert device.batches[2] == [2]
        for gate in device.release:
            gate.set()
        assert [await t for t in tasks] == [["answer 0"], ["answer 1"], ["answer 2"]]

    run(scenario())


def test_a_failed_batch_fails_its_callers_and_the_queue_goes_on():
    async def scenario():
        device = Device()
        device.fail_on = {"bad"}
        queue = DeviceQueue(device.run, max_batch_size=4, slots=1)
        failing = asyncio.create_task(queue.put(["bad", "ok"]))
        await settle()
        device.release[0].set()
        with pytest.raises(RuntimeError, match="the model failed"):
            await failing
        after = asyncio.create_task(queue.put(["fine"]))
        await settle()
        device.release[1].set()
        assert await after == ["answer fine"]

    run(scenario())


def test_a_cancelled_caller_s_samples_are_not_computed():
    async def scenario():
        device = Device()
        queue = DeviceQueue(device.run, max_batch_size=8, slots=1)
        first = asyncio.create_task(queue.put(["a"]))
        await settle()
        gone = asyncio.create_task(queue.put(["gone"]))
        kept = asyncio.create_task(queue.put(["kept"]))
        await settle()
        gone.cancel()
        await settle()
        device.release[0].set()
        await settle()
        assert device.batches[1] == ["kept"]
        device.release[1].set()
        assert await kept == ["answer kept"] and await first == ["answer a"]

    run(scenario())
