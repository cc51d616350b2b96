"""serve/api/profiling.py: the trace's summary from made-up traces (the GPU numbers the issue asks for:
busy fraction, idle gaps, host syncs, pinned allocations), the request's checks, and a real
torch.profiler capture on this CPU started and stopped in a worker thread, as the replica does."""
from __future__ import annotations

import gzip
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve.api import profiling


def kernel(ts, dur, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def runtime(ts, dur, name):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur}


def test_busy_fraction_and_gaps_come_from_the_union_of_the_gpu_work():
    trace = {"traceEvents": [
        kernel(0, 100, "conv"), kernel(50, 100, "conv"),  # overlapping: 0-150 busy once
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 200, "dur": 50,
         "args": {"bytes": 4096}},
        kernel(2250, 750, "gemm"),  # after a 2 ms gap
        runtime(10, 5, "cudaStreamSynchronize"), runtime(20, 7, "cudaStreamSynchronize"),
        runtime(30, 40, "cudaHostAlloc"), runtime(80, 3, "cudaMalloc"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 90},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},  # not a span: ignored
    ]}
    s = profiling.summarize_trace(trace, window_s=0.004)
    gpu = s["gpu"]
    assert gpu["busy_ms"] == pytest.approx((150 + 50 + 750) / 1e3)
    assert gpu["busy_fraction"] == pytest.approx(950 / 4000)
    assert gpu["idle_gaps"] == 2 and gpu["gap_max_us"] == 2000
    assert gpu["gaps_over_1ms"] == 1 and gpu["idle_ms_in_gaps_over_1ms"] == 2.0
    assert gpu["idle_before_first_and_after_last_ms"] == pytest.approx(1.0)
    assert gpu["kernels"] == 3
    assert s["copies"]["Memcpy HtoD (Pinned -> Device)"] == {"count": 1, "ms": 0.05, "bytes": 4096}
    assert s["host_syncs"] == {"cudaStreamSynchronize": {"count": 2, "ms": 0.012}}
    assert s["pinned_allocations"] == {"cudaHostAlloc": {"count": 1, "ms": 0.04}}
    assert s["device_allocations"] == {"cudaMalloc": {"count": 1, "ms": 0.003}}
    assert list(s["top_kernels_ms"]) == ["gemm", "conv"]
    assert s["top_cpu_ops_ms"] == {"aten::conv2d": 0.09}


def test_per_batch_divides_the_window_and_the_gpu_time_by_the_batches():
    summary = {"window_s": 1.0, "gpu": {"busy_ms": 400.0}, "thread_cpu_s": {"autobatch-forward": 0.5},
               "host_syncs": {"cudaStreamSynchronize": {"count": 20, "ms": 1.0}}}
    out = profiling.per_batch(summary, batches=10, samples=320)
    assert out["ms_per_batch"] == 100.0 and out["gpu_busy_ms_per_batch"] == 40.0
    assert out["gpu_idle_ms_per_batch"] == 60.0 and out["mean_batch"] == 32.0
    assert out["thread_cpu_ms_per_batch"] == {"autobatch-forward": 50.0}
    assert out["host_syncs_per_batch"] == 2.0 and out["samples_per_s"] == 320.0
    assert profiling.per_batch(summary, batches=0, samples=0) == {"batches": 0, "samples": 0}


def test_a_trace_without_gpu_work_says_so():
    s = profiling.summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10}]})
    assert s["gpu"] is None and s["top_cpu_ops_ms"] == {"aten::mm": 0.01}


@pytest.mark.parametrize("body, says", [
    (b"nope", "not JSON"), (b"[1]", "JSON object"), (b'{"what": "train"}', '"what" is'),
    (b'{"seconds": 0}', '"seconds" is 0'), (b'{"seconds": 60}', "(0, 10]"), (b'{"seconds": "x"}', "must be a number"),
    (b'{"batch_size": -2}', '"batch_size" is -2'),
])
def test_a_bad_profile_request_says_what_to_send(body, says):
    with pytest.raises(profiling.ProfileRequestError, match=None) as err:
        profiling.parse_request(body, default_batch=8)
    assert says in str(err.value)


def test_a_profile_request_defaults_to_two_seconds_of_serving_at_the_served_batch():
    assert profiling.parse_request(b"", 8) == {"what": "serving", "seconds": 2.0, "batch_size": 8, "with_stack": True}
    assert profiling.parse_request(b'{"what": "probe", "batch_size": 3, "with_stack": false}', 8)["batch_size"] == 3


def test_the_profile_folder_is_the_apps_else_the_environments(monkeypatch):
    monkeypatch.delenv(profiling.PROFILE_DIR_ENV, raising=False)
    assert profiling.profile_dir(None) is None
    monkeypatch.setenv(profiling.PROFILE_DIR_ENV, "/tmp/env-traces")
    assert profiling.profile_dir(None) == "/tmp/env-traces"
    assert profiling.profile_dir("/tmp/app-traces") == "/tmp/app-traces"


def test_the_gil_ticker_sees_a_thread_that_holds_the_gil():
    stop = threading.Event()

    def spin():  # pure Python: holds the GIL until the interpreter's switch interval takes it away
        while not stop.is_set():
            sum(range(1000))

    with profiling.GilTicker() as quiet:
        time.sleep(0.2)
    spinner = threading.Thread(target=spin)
    with profiling.GilTicker() as busy:
        spinner.start()
        time.sleep(0.3)
        stop.set()
    spinner.join()
    assert quiet.summary()["ticks"] > 20
    assert busy.summary()["late_max_us"] > 1000  # waited at least one switch interval (5 ms) once


def test_a_capture_in_a_worker_thread_records_that_threads_operators(tmp_path):
    import torch

    forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autobatch-forward")
    capture = profiling.Capture(cuda=False, with_stack=True)
    x = torch.randn(128, 128)
    forward.submit(capture.start).result()
    for _ in range(20):
        forward.submit(lambda: (x @ x).sum().item()).result()
    forward.submit(capture.stop).result()
    path, summary = capture.write(str(tmp_path / "cap"))
    with gzip.open(path) as f:
        assert json.load(f)["traceEvents"]
    assert not (tmp_path / "cap.json").exists()  # only the gzipped trace is kept
    assert "aten::mm" in summary["top_cpu_ops_ms"]
    assert summary["gpu"] is None and summary["window_s"] > 0
    assert summary["thread_cpu_s"].get("autobatch-forward", 0) >= 0
    assert summary["gil_wait_1ms_ticker"]["ticks"] > 0
    forward.shutdown()
