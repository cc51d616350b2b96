"""What a request may cost, Ray-free (issue 23): the body read against max_body_bytes (by
Content-Length and counted as it streams), JSON size and depth before parsing, samples per request
and decoded bytes at admission, the size of a decoded sample, and the heap trim."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import numpy as np
import pytest
from serve_helpers import make_tuning

from optimizer.tuning import MemoryFit
from serve.api import costs
from serve.replica.admission import REQUEST_BATCHES, Admission, Capacity, Refused, capacity_from
from serve.oip import rest
from wire import PayloadError


async def _chunks(parts):
    for part in parts:
        yield part


def read(parts, content_length=None, limit=100):
    return asyncio.run(rest.read_limited(_chunks(parts), content_length, limit))


# ----------------------------------------------------------------- the body
def test_a_body_within_the_limit_is_read_whole():
    assert read([b"ab", b"", b"cd"], "4", limit=4) == b"abcd"


def test_a_declared_length_over_the_limit_is_413_before_a_byte_is_read():
    def never():
        raise AssertionError("the body was read")
        yield b""  # noqa: unreachable - makes this a generator

    async def go():
        async def chunks():
            for part in never():
                yield part
        return await rest.read_limited(chunks(), "101", 100)

    with pytest.raises(PayloadError) as caught:
        asyncio.run(go())
    assert caught.value.status == 413 and "100 bytes" in caught.value.message and "max_body_bytes" in caught.value.message


def test_a_chunked_body_is_counted_as_it_streams_and_stopped_at_the_limit():
    seen = []

    async def chunks():
        for i in range(1000):
            seen.append(i)
            yield b"x" * 10

    with pytest.raises(PayloadError) as caught:
        asyncio.run(rest.read_limited(chunks(), None, 100))
    assert caught.value.status == 413 and "while it was read" in caught.value.message
    assert len(seen) == 11  # stopped at the first chunk past the limit, not at the end of the body


def test_the_default_limit_is_64_mib():
    assert rest.DEFAULT_MAX_BODY_BYTES == 64 * 2**20


# ----------------------------------------------------------------- JSON before parsing
@pytest.mark.parametrize("text,depth", [
    (b"", 0), (b"1", 0), (b"{}", 1), (b"[[[]]]", 3), (b'{"a": "[[[["}', 1),
    (b'{"a": "x\\\\", "b": [[1]]}', 3),  # an escaped backslash ends before the quote that closes the string
    (b'{"a": "x\\"[[[", "b": 2}', 1),  # an escaped quote does not close it
    (b"[" * 100_000, 100_000),
])
def test_json_depth_counts_nesting_outside_strings(text, depth):
    assert rest.json_depth(text) == depth


def test_json_depth_agrees_with_the_parser_on_a_real_request_across_chunks(monkeypatch):
    monkeypatch.setattr(rest, "_DEPTH_CHUNK_BYTES", 7)  # chunk edges fall inside strings and escapes
    doc = {"id": 'a "quoted" [x] \\ {y}', "inputs": [{"name": "p", "shape": [2, 2, 1], "data": [[[1], [2]], [[3], [4]]]}]}
    assert rest.json_depth(json.dumps(doc).encode()) == 6  # {, [, {, then data's three


def test_deeply_nested_json_is_a_400_naming_the_limit_not_a_recursion_error():
    with pytest.raises(PayloadError) as caught:
        rest.parse_infer_request("m", b"[" * 100_000, {})
    assert caught.value.status == 400 and str(rest.MAX_JSON_DEPTH) in caught.value.message


def test_json_over_its_size_limit_is_a_400_that_says_to_send_binary():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1000], "data": [1] * 1000}]}).encode()
    with pytest.raises(PayloadError) as caught:
        rest.parse_infer_request("m", body, {}, max_json_bytes=1000)
    assert caught.value.status == 400 and "1000 bytes" in caught.value.message and "binary" in caught.value.message
    assert rest.parse_infer_request("m", body, {}).inputs[0].data.shape == (1000,)


# ----------------------------------------------------------------- samples and decoded bytes at admission
def capacity(**kw) -> Capacity:
    base = dict(batch_size=4, batch_time_s=0.1, wait_s=0.0, latency_budget_s=1.0, headroom_bytes=1000.0,
                per_sample_bytes=10.0, max_request_samples=16)
    return Capacity(**{**base, **kw})


def test_samples_past_the_bound_are_413_with_the_bound():
    a = Admission()
    a.set_capacity(capacity())
    a.admit(samples=16).release()
    with pytest.raises(Refused) as caught:
        a.admit(samples=17)
    assert caught.value.status == 413 and "16" in caught.value.message and "17 samples" in caught.value.message


def test_the_bound_is_a_few_of_the_largest_batches():
    tuning = make_tuning(max_batch=16, max_safe_batch=2, batch_size=2,
                         memory_fit=MemoryFit(intercept_bytes=0.0, per_sample_bytes=1000.0))
    assert capacity_from(tuning, 2, 0.0).max_request_samples == REQUEST_BATCHES * 16  # the max batch, not max safe
    assert capacity_from(tuning, 32, 0.0).max_request_samples == REQUEST_BATCHES * 32  # a pin above it


def test_decoded_bytes_are_charged_before_decoding_413_never_503_not_now():
    a = Admission()
    a.set_capacity(capacity())
    with pytest.raises(Refused) as never:
        a.admit(samples=2, decoded_bytes=2000)  # more than the headroom alone
    assert never.value.status == 413
    held = a.admit(samples=1, decoded_bytes=900)
    assert a.describe()["pending_decoded_bytes"] == 900
    with pytest.raises(Refused) as later:
        a.admit(samples=1, decoded_bytes=100)  # fits alone, not beside the one ahead
    assert later.value.status == 503 and later.value.retry_after_s is not None
    held.release()
    a.admit(samples=1, decoded_bytes=100).release()
    assert a.describe()["pending_decoded_bytes"] == 0


# ----------------------------------------------------------------- the size of a decoded sample
@dataclass
class Holder:
    pixels: object
    jpeg: bytes | None = None
    height: int = 0


def test_nbytes_counts_buffers_inside_samples():
    torch = pytest.importorskip("torch")
    assert costs.nbytes(torch.zeros(3, 224, 224)) == 3 * 224 * 224 * 4
    assert costs.nbytes(torch.zeros(8, 10)[0]) == 40  # a view: its own elements, not its base's
    assert costs.nbytes(np.zeros((2, 2), dtype=np.uint8)) == 4
    assert costs.nbytes(Holder(np.zeros(10, dtype=np.float32), b"abc", 5)) == 43
    assert costs.nbytes({"a": [b"xy", (b"z",)]}) == 3


def test_decoded_sample_bytes_is_measured_once_per_spec_and_zero_when_it_cannot_be():
    class Spec:
        calls = 0

        def example_batch(self, n):
            Spec.calls += 1
            return [np.zeros(100, dtype=np.uint8)] * n

    class Broken:
        def example_batch(self, n):
            raise RuntimeError("no example")

    spec = Spec()
    assert costs.decoded_sample_bytes(spec, "m") == 100 and costs.decoded_sample_bytes(spec, "m") == 100
    assert Spec.calls == 1
    assert costs.decoded_sample_bytes(Broken(), "m") == 0


def test_the_heap_is_trimmed_once_enough_is_released():
    trimmer = costs.HeapTrimmer(min_bytes=100)
    trimmer.released(60)
    assert trimmer.trims == 0
    trimmer.released(60)
    for _ in range(200):
        if trimmer.trims:
            break
        __import__("time").sleep(0.01)
    assert trimmer.trims == 1


TRIM_SCRIPT = r'''
import sys
from serve.api import costs

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

big = bytearray(8 * 2**20); del big  # an mmapped block freed: glibc's mmap threshold rises to 8 MiB
held = [bytearray(4 * 2**20) for _ in range(32)]  # 128 MiB of request buffers, on the heap now
sentinel = bytearray(4096)  # above them: free() alone cannot give the heap's top back
for block in held:
    block[::4096] = b"x" * len(block[::4096])  # touch every page
before = rss()
del held
after_free = rss()
costs.HeapTrimmer().trim_now()
print(before, after_free, rss())
'''


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux") or costs._malloc_trim() is None,
                    reason="malloc_trim is glibc's")
def test_freed_request_buffers_go_back_to_the_os_only_when_trimmed():
    """What the replica's RSS does after a large request without the trim: it stays."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    before, after_free, after_trim = map(int, done.stdout.split())
    assert after_free > before - 32 * 2**20  # freed, but most of it still resident
    assert after_trim < before - 96 * 2**20  # trimmed: the 128 MiB went back
