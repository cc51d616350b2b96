"""Batches in two overlapping stages (issue 13): a spec's `prepare` for the next batch runs while
`forward` computes this one, in the tuner (optimizer/model.py ExampleBatches, timed as a BatchTiming)
and in the replica (serve/replica/batch_runner.py, two locks and two threads). On a GPU the stages use the
JPEG engine and copies beside the compute units; here they are CPU stand-ins that sleep (the GIL is
released, as it is while CUDA works), and the tests check the order of events, not durations.

The classifiers and YOLO on the CPU with `overlap: true` run the same two stages (no CUDA streams
there): `forward(prepare(x))` answers as `predict(x)`, a corrupt JPEG keeps its place as an error.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.base import PayloadError, SpecConfigError
from deployments.device_images import DeviceBatch, overlap_for
from deployments.registry import create_spec
from optimizer.devices import make_meter
from optimizer.model import ExampleBatches
from optimizer.probe import OOM, BatchTiming, probe
from serve.replica.batch_runner import BatchRunner, DeviceLocks
from serve.replica.batcher import Batch

STAGE_S = 0.05


class Journal:
    """Every stage's (name, batch, start, end), from whichever thread ran it."""

    def __init__(self):
        self.events: list[tuple[str, object, float, float]] = []
        self._lock = threading.Lock()

    def run(self, name: str, batch, seconds: float = STAGE_S):
        started = time.perf_counter()
        time.sleep(seconds)
        with self._lock:
            self.events.append((name, batch, started, time.perf_counter()))

    def interval(self, name: str, batch) -> tuple[float, float]:
        return next((s, e) for n, b, s, e in self.events if n == name and b == batch)


class TwoStageModel:
    """A TunableModel whose prepare and forward each take STAGE_S; `oom_in_forward` raises a CPU
    out-of-memory from forward at that batch size."""

    name, library_packages, default_latency_budget_s, probe_batch = "two_stage", ("torch",), 1.0, None

    def __init__(self, overlap: bool = True, oom_in_forward: int | None = None):
        self.journal, self.overlap, self.oom_in_forward = Journal(), overlap, oom_in_forward
        self.prepared = 0

    def overlaps(self) -> bool:
        return self.overlap

    def example_batch(self, n: int) -> list:
        return list(range(n))

    def prepare(self, samples: list):
        self.prepared += 1
        tag = self.prepared
        self.journal.run("prepare", tag)
        return DeviceBatch(tag, [PayloadError("bad sample", 422) if s == "bad" else None for s in samples])

    def forward(self, prepared: DeviceBatch) -> list:
        n = sum(e is None for e in prepared.errors)
        if self.oom_in_forward is not None and len(prepared.errors) >= self.oom_in_forward:
            raise MemoryError("out of memory (a stand-in)")
        self.journal.run("forward", prepared.tensor)
        return prepared.answers([{"ok": i} for i in range(n)])

    def predict(self, samples: list) -> list:
        return self.forward(self.prepare(samples))

    def encode(self, output: dict) -> dict:
        return output

    # the rest of the TunableModel protocol, unused here
    def signature(self):
        return {"model": self.name}

    def default_dtype(self, kind):
        return "float32"

    def weights_description(self):
        return "none"

    def load(self, device, dtype):
        return None


# ---------------------------------------------------------------- the tuner
def test_the_tuner_times_the_next_prepare_during_this_forward():
    model = TwoStageModel()
    runs = ExampleBatches(model)
    assert runs.overlap
    timings = [runs(4) for _ in range(3)]
    assert all(isinstance(t, BatchTiming) for t in timings)
    # run k forwards the batch run k-1 prepared, while batch k+1 prepares in the helper thread
    for k in (2, 3):
        forward_start, forward_end = model.journal.interval("forward", k)
        next_start, next_end = model.journal.interval("prepare", k + 1)
        assert next_start < forward_end and forward_start < next_end, "the stages did not overlap"
    # a batch's latency is its own two stages; the period is the time between batches
    for t in timings[1:]:
        assert t.latency_s >= 2 * STAGE_S * 0.99 and t.period_s > 0
    runs.clear()
    assert runs._ahead is None and runs._helper is None


def test_a_probe_of_overlapped_batches_reports_their_period_and_the_throughput_it_gives():
    model = TwoStageModel()
    result = probe(ExampleBatches(model), 8, make_meter("cpu"), memory_budget_bytes=2**40, latency_budget_s=None,
                   warmup=1, repeats=3)
    assert result.ok and result.period_s is not None and result.latency_s is not None
    assert result.throughput == pytest.approx(8 / result.period_s)
    assert not model.overlap or result.latency_s >= 2 * STAGE_S * 0.99


def test_a_model_that_does_not_overlap_is_timed_whole():
    model = TwoStageModel(overlap=False)
    runs = ExampleBatches(model)
    assert not runs.overlap and runs(2) is None
    result = probe(runs, 2, make_meter("cpu"), memory_budget_bytes=2**40, latency_budget_s=None, repeats=1)
    assert result.period_s is None and result.throughput == pytest.approx(2 / result.latency_s)


def test_an_oom_in_an_overlapped_forward_is_a_probe_outcome_and_leaves_nothing_prepared():
    model = TwoStageModel(oom_in_forward=4)
    runs = ExampleBatches(model)
    result = probe(runs, 4, make_meter("cpu"), memory_budget_bytes=2**40, latency_budget_s=None)
    assert result.outcome == OOM
    assert runs._ahead is None  # the batch prepared ahead was dropped with the failure
    assert probe(runs, 2, make_meter("cpu"), memory_budget_bytes=2**40, latency_budget_s=None).ok


# ---------------------------------------------------------------- the replica's runner
class Sink:  # the runner's metrics; these tests read outcomes and events
    def inc(self, *a, **k): ...

    def observe(self, *a, **k): ...


def runner_for(model, overlap_thread: bool = True) -> BatchRunner:
    forward = ThreadPoolExecutor(1, thread_name_prefix="test-forward")
    return BatchRunner(model, make_meter("cpu"), forward, Sink(), model_name="two_stage",
                       before_predict=lambda items: None, on_oom=lambda n, m: None, locks=DeviceLocks(),
                       prepare_executor=ThreadPoolExecutor(1, thread_name_prefix="test-prepare") if overlap_thread else None)


def test_the_runner_prepares_the_next_batch_while_this_one_computes():
    model = TwoStageModel()
    runner = runner_for(model)
    assert runner.overlaps

    async def two_batches():
        return await asyncio.gather(runner.run_timed(Batch.of([0, 1])), runner.run_timed(Batch.of([2, "bad", 3])))

    first, second = asyncio.run(two_batches())
    assert [o.status for o in first.outcomes] == [200, 200]
    assert [o.status for o in second.outcomes] == [200, 422, 200]  # the bad sample fails alone, in its place
    forward_start, forward_end = model.journal.interval("forward", 1)
    prepare_start, prepare_end = model.journal.interval("prepare", 2)
    assert prepare_start < forward_end and forward_start < prepare_end, "batch 2 was not prepared during batch 1"
    assert model.journal.interval("forward", 2)[0] >= forward_end  # forwards never overlap each other
    assert runner.overlapped_batches == 1
    assert first.latency_s >= first.period_s > 0


def test_without_its_own_prepare_thread_a_runner_runs_batches_whole_and_in_turn():
    model = TwoStageModel()
    runner = runner_for(model, overlap_thread=False)
    assert not runner.overlaps

    async def two_batches():
        return await asyncio.gather(runner.run_timed(Batch.of([0])), runner.run_timed(Batch.of([1])))

    first, second = asyncio.run(two_batches())
    assert first.latency_s == first.period_s
    assert model.journal.interval("prepare", 2)[0] >= model.journal.interval("forward", 1)[1]


def test_an_oom_in_an_overlapped_batch_splits_it_and_every_sample_is_answered():
    model = TwoStageModel(oom_in_forward=3)
    ooms = []
    runner = runner_for(model)
    runner._on_oom = lambda n, message: ooms.append(n)
    outcomes = asyncio.run(runner.run(Batch.of(list(range(4)))))
    assert [o.status for o in outcomes] == [200] * 4 and ooms == [4]


def test_a_tuning_holds_the_device_against_both_stages():
    locks = DeviceLocks()

    async def scenario():
        async with locks.exclusive():
            assert locks.prepare.locked() and locks.forward.locked()
        assert not locks.prepare.locked() and not locks.forward.locked()

    asyncio.run(scenario())


# ---------------------------------------------------------------- the vision specs, on this CPU
def test_overlap_option_resolves_per_pipeline_and_device():
    assert overlap_for("auto", "device", "cuda:0") and not overlap_for("auto", "device", "cpu")
    assert not overlap_for("auto", "host", "cuda:0")
    assert overlap_for(True, "host", "cpu") and not overlap_for(False, "device", "cuda:0")
    with pytest.raises(SpecConfigError, match="overlap must be auto, true or false"):
        create_spec("resnet50", overlap="sometimes")


@pytest.fixture(scope="module")
def classifier():
    spec = create_spec("resnet50", image_pipeline="device", overlap=True)
    spec.load("cpu", "float32")
    return spec


def test_a_classifier_answers_the_same_in_two_stages_as_whole(classifier):
    from test_device_images import corrupt_jpeg, mixed_payloads

    assert classifier.overlaps()
    samples = [classifier.decode(p) for p in mixed_payloads()[:2]] + [classifier.decode(corrupt_jpeg())]
    prepared = classifier.prepare(samples)
    assert isinstance(prepared, DeviceBatch) and prepared.ready is None  # no stream on a CPU
    staged, whole = classifier.forward(prepared), classifier.predict(samples)
    assert [o[0]["class_id"] for o in staged[:2]] == [o[0]["class_id"] for o in whole[:2]]
    assert isinstance(staged[2], PayloadError) and staged[2].status == 422


def test_yolo_answers_the_same_in_two_stages_as_whole():
    from test_device_images import mixed_payloads

    spec = create_spec("yolo11n_pose", image_pipeline="device", overlap=True, conf_threshold=0.0, max_det=5, imgsz=320)
    spec.load("cpu", "float32")
    assert spec.overlaps()
    samples = [spec.decode(p) for p in mixed_payloads()[:2]]
    staged, whole = spec.forward(spec.prepare(samples)), spec.predict(samples)
    assert [len(a["boxes"]) for a in staged] == [len(a["boxes"]) for a in whole] == [5, 5]
    assert staged[0]["scores"] == pytest.approx(whole[0]["scores"], abs=1e-5)


# ---------------------------------------------------------------- live: a real replica, overlapped
@pytest.fixture(scope="module")
def overlapped_app(tmp_path_factory):
    from serve_helpers import ServeCluster, warmed_up

    c = ServeCluster(num_cpus=2)
    c.deploy([{
        "name": "r50o", "route_prefix": "/r50o", "import_path": "serve.app:build",
        "args": {"model": "resnet50", "device": "auto", "latency_budget_ms": 1000, "max_batch": 4, "repeats": 1,
                 "cache_path": str(tmp_path_factory.mktemp("overlap-cache") / "tuning.json"), "num_cpus": 0.5,
                 "single_flight": False,
                 # the GPU's layout on this CPU: the JPEG bytes batched, decoded in prepare, overlapped
                 "options": {"image_pipeline": "device", "overlap": True}},
        "deployments": [{"name": "resnet50", "user_config": {"batch_size": 4, "batch_wait_timeout_ms": 200,
                                                            "faults": {"poison_header": "x-poison"}}}],
    }])
    c.wait_running(["r50o"])
    c.wait_tuning("/r50o", warmed_up, timeout=240)
    yield c
    c.shutdown()


def test_a_live_replica_overlaps_batches_and_answers_each_request_with_its_own_result(overlapped_app):
    from serve_helpers import image_bytes, stats_delta

    c = overlapped_app
    t = c.tuning("/r50o")
    assert t["serving"]["overlap"] is True
    assert all(p["period_s"] is not None for p in t["probes"] if p["outcome"] == "ok"), t["probes"]
    before = t
    requests = [(image_bytes("JPEG", seed=i), "image/jpeg", {"x-poison": "1"} if i == 5 else {}) for i in range(16)]
    responses = c.post_concurrently("/r50o", requests, retries_on_503=3)
    statuses = [r.status_code for r in responses]
    assert statuses[5] == 422 and "poisoned" in responses[5].json()["error"]
    assert statuses[:5] + statuses[6:] == [200] * 15, [r.text for r in responses if r.status_code != 200]
    alone = c.post("/r50o", image_bytes("JPEG", seed=3)).json()["top_k"]
    batched = responses[3].json()["top_k"]  # batch-mates' answers did not mix (a batch rounds a little differently)
    assert [c["class_id"] for c in alone] == [c["class_id"] for c in batched]
    assert [c["score"] for c in alone] == pytest.approx([c["score"] for c in batched], abs=1e-4)
    delta = stats_delta(before, c.tuning("/r50o"))
    assert delta["samples_served"] == 16 and max(delta["batch_sizes"]) > 1, delta
    assert c.tuning("/r50o")["stats"]["overlapped_batches"] >= 1  # a batch was prepared while another computed
