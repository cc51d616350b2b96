"""The CUDA-graph forward's logic on the CPU: buckets, padding, the shared input buffer, the eager
fallbacks, and the classifier and warm-up wiring. The backend here replays a "graph" by running the
captured model again into the captured output tensor, which is what a CUDA graph does with the
same buffers. The real capture is timed and compared on the GPU (benchmarks/cuda_graphs_check.py)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deployments.cuda_graphs import GraphedForward, bucket_for, bucket_sizes


class ReplayingBackend:
    """A stand-in for torch.cuda graphs: `replay` recomputes the captured call into its output buffer."""

    def __init__(self, fail_at: int | None = None):
        self.captured: list[int] = []
        self.replays: list[int] = []
        self.released = 0
        self.fail_at = fail_at

    def empty_like_input(self, shape, dtype, memory_format):
        return torch.zeros(shape, dtype=dtype).contiguous(memory_format=memory_format or torch.contiguous_format)

    def reserved_bytes(self) -> int:
        return 1000 * len(self.captured)

    def release_cached(self) -> None:
        self.released += 1

    def capture(self, model, static_input):
        size = static_input.shape[0]
        if size == self.fail_at:
            raise RuntimeError("operator not permitted when stream is capturing")
        self.captured.append(size)
        output = model(static_input).clone()
        return (model, static_input, output), output

    def replay(self, graph) -> None:
        model, static_input, output = graph
        self.replays.append(static_input.shape[0])
        output.copy_(model(static_input))


def per_sample_model():
    """Every sample computed on its own, as a vision model in eval mode is."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()


def test_buckets_are_powers_of_two_below_the_served_batch_then_the_batch():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(75) == [1, 2, 4, 8, 16, 32, 64, 75]
    with pytest.raises(ValueError, match="at least 1"):
        bucket_sizes(0)
    buckets = bucket_sizes(75)
    assert [bucket_for(n, buckets) for n in (1, 3, 9, 64, 65, 75, 76)] == [1, 4, 16, 64, 75, 75, None]
    # never more than half a batch's work is padding
    assert all(bucket_for(n, buckets) < 2 * n for n in range(1, 76))


def test_every_size_up_to_the_batch_replays_a_bucket_and_answers_as_the_eager_model():
    model = per_sample_model()
    with torch.inference_mode():
        model(torch.zeros(1, 3, 6, 6))  # the lazy layer's shape
        backend = ReplayingBackend()
        graphed = GraphedForward(model, (3, 6, 6), torch.float32, 6, backend)
        report = graphed.capture()
        assert report.state == "captured" and report.buckets == [1, 2, 4, 6]
        assert backend.captured == [6, 4, 2, 1]  # largest first: the smaller ones reuse its pool
        assert report.to_dict()["summary"].startswith("CUDA graphs captured for batch sizes 1, 2, 4, 6")
        for n in range(1, 7):
            batch = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n))
            out = graphed(batch)
            assert out.shape[0] == n
            torch.testing.assert_close(out, model(batch))  # the padding rows changed nothing
        assert backend.replays == [1, 2, 4, 4, 6, 6] and report.replays == 6 and report.eager_runs == 0


def test_a_batch_over_the_largest_bucket_runs_eager_and_is_counted():
    model = per_sample_model()
    with torch.inference_mode():
        model(torch.zeros(1, 3, 6, 6))
        graphed = GraphedForward(model, (3, 6, 6), torch.float32, 2, ReplayingBackend())
        graphed.capture()
        batch = torch.randn(3, 3, 6, 6)
        torch.testing.assert_close(graphed(batch), model(batch))
        assert graphed.report.eager_runs == 1 and graphed.report.replays == 0


def test_a_failed_capture_keeps_no_graph_and_says_why():
    model = per_sample_model()
    with torch.inference_mode():
        model(torch.zeros(1, 3, 6, 6))
        backend = ReplayingBackend(fail_at=2)
        graphed = GraphedForward(model, (3, 6, 6), torch.float32, 4, backend)
        report = graphed.capture()
        assert report.state == "failed" and "not permitted when stream is capturing" in report.why
        assert "eager forward serves" in report.why and graphed.buckets == []
        batch = torch.randn(3, 3, 6, 6)
        torch.testing.assert_close(graphed(batch), model(batch))
        assert backend.replays == [] and report.eager_runs == 1
        assert backend.released >= 2  # before the capture, and after the failure


def test_a_channels_last_input_buffer_takes_contiguous_batches():
    model = per_sample_model()
    with torch.inference_mode():
        model(torch.zeros(1, 3, 6, 6))
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        graphed = GraphedForward(model, (3, 6, 6), torch.float32, 4, ReplayingBackend(), torch.channels_last)
        graphed.capture()
        assert graphed._input.is_contiguous(memory_format=torch.channels_last)
        batch = torch.randn(3, 3, 6, 6)  # NCHW, as prepare makes it
        torch.testing.assert_close(graphed(batch), model(batch))


def resnet_spec(**options):
    from deployments.registry import create_spec

    spec = create_spec("resnet50", None, **options)
    spec.load("cpu", "float32")
    return spec


def test_the_classifier_on_a_cpu_says_graphs_are_off_and_serves_eager():
    spec = resnet_spec()
    assert not spec.channels_last  # auto: channels-last only on a GPU
    report = spec.set_serving_batch(4).to_dict()
    assert report["state"] == "off" and "not CUDA" in report["why"] and spec.graphs is None
    assert spec.set_serving_batch(None) is None
    answers = spec.predict(spec.example_batch(2))
    assert len(answers) == 2 and len(answers[0]) == 5


def test_the_classifier_answers_the_same_through_graphs_and_channels_last():
    eager = resnet_spec()
    spec = resnet_spec(memory_format="channels_last")
    spec.model.load_state_dict(eager.model.state_dict())
    assert spec.channels_last and spec.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    samples = eager.example_batch(3)
    want = eager.predict(samples)
    assert [[c["class_id"] for c in row] for row in spec.predict(samples)] == [[c["class_id"] for c in row] for row in want]
    with torch.inference_mode():
        spec.graphs = GraphedForward(spec.model, (3, 224, 224), torch.float32, 4, ReplayingBackend(), torch.channels_last)
        assert spec.graphs.capture().state == "captured"
    got = spec.predict(samples)
    assert spec.graphs.report.replays == 1  # 3 samples: the bucket of 4
    for row, want_row in zip(got, want):
        assert [c["class_id"] for c in row] == [c["class_id"] for c in want_row]
        assert [c["score"] for c in row] == pytest.approx([c["score"] for c in want_row], rel=1e-4, abs=1e-6)
    spec.set_serving_batch(None)  # before a tuning: the eager forward again
    assert spec.graphs is None


def test_options_that_make_no_sense_say_what_to_send():
    from deployments.base import SpecConfigError
    from deployments.registry import create_spec

    with pytest.raises(SpecConfigError, match="cuda_graphs must be auto, true or false"):
        create_spec("resnet50", None, cuda_graphs="sometimes")
    with pytest.raises(SpecConfigError, match="memory_format must be auto, channels_last or contiguous"):
        create_spec("vit_b_16", None, memory_format="nhwc")
    # the memory format is part of the tuning key: a channels-last model measures differently
    assert create_spec("resnet50", None, memory_format="contiguous").signature() != create_spec("resnet50", None).signature()


def test_the_warm_up_prepares_the_served_size_before_it_warms_any():
    from serve.replica.warm_schedule import WarmUpSchedule
    from serve.replica.warmup import SizeWarmer

    calls = []

    class Locks:
        def exclusive(self):
            class Held:
                async def __aenter__(self):
                    calls.append("lock")

                async def __aexit__(self, *exc):
                    return False
            return Held()

    warmer = SizeWarmer(lambda n: calls.append(("run", n)), budget_s=0)

    from deployments.cuda_graphs import GraphReport

    report = GraphReport("captured", "batches up to 8 replay them", buckets=[1, 2, 4, 8])

    def set_serving_batch(n):
        calls.append(("graphs", n))
        return report

    with ThreadPoolExecutor(1) as executor:
        schedule = WarmUpSchedule(warmer, Locks(), executor, lambda: "resnet50", set_serving_batch)
        asyncio.run(schedule.before_traffic(8, True))
    assert calls == ["lock", ("graphs", 8)]  # the warm budget is 0: graphs still, no size run
    assert schedule.graphs_report()["state"] == "captured" and schedule.report == {"skipped": "warm_sizes_budget_s is 0"}
    report.replays += 3  # batches served since: GET /tuning shows the counts as of now
    assert schedule.graphs_report()["replays"] == 3


def test_a_failing_preparation_is_reported_and_the_warm_up_goes_on():
    from serve.replica.warm_schedule import WarmUpSchedule
    from serve.replica.warmup import SizeWarmer

    class Locks:
        def exclusive(self):
            class Held:
                async def __aenter__(self):
                    return None

                async def __aexit__(self, *exc):
                    return False
            return Held()

    ran = []

    def set_serving_batch(n):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with ThreadPoolExecutor(1) as executor:
        schedule = WarmUpSchedule(SizeWarmer(ran.append, budget_s=60), Locks(), executor, lambda: "vit_b_16", set_serving_batch)
        asyncio.run(schedule.before_traffic(4, True))
    graphs = schedule.graphs_report()
    assert graphs["state"] == "failed" and "not permitted when stream is capturing" in graphs["why"]
    assert "the eager forward serves" in graphs["summary"]
    assert ran[:2] == [4, 1]  # the sizes a queue forms first were still warmed
