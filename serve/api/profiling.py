"""Where a replica's time goes: a torch.profiler capture of the replica serving, or of its own tuning
probe at the served batch, summarised in the numbers that say whether the card or the host is the
limit (issue 20: a served batch took 87 ms where the tuning's period was 36 ms, and nobody could say
where the difference went).

Off unless the app sets `profile_dir` or the replicas start with AUTOBATCH_PROFILE_DIR set (a trace has the model's Python stacks
and costs the replica a few seconds to write): then `POST <route>/profile {"seconds": 2, "what":
"serving"}` captures the next seconds of serving, and `"what": "probe"` runs the tuner's own
measurement of the served batch (optimizer/model.py's ExampleBatches, the device held alone) for the
same seconds. Each writes a Chrome trace (.json.gz, for Perfetto or chrome://tracing) under that
folder and answers the summary.

torch's profiler records CPU operators only in the thread that starts it, so the capture starts and
stops in the replica's forward thread: the operators are the forward's, while the CUDA kernels,
copies and runtime calls (synchronisations, pinned allocations) come from every thread, and so do
the Python stacks. Two host numbers the profiler cannot give are measured beside it: each thread's
CPU seconds (/proc/self/task) and how late a thread that sleeps 1 ms wakes, which is how long a
thread wanting the GIL waits for it (the OS's own scheduling delay is a few microseconds of that).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import statistics
import threading
import time
from typing import Callable, Iterable

PROFILE_DIR_ENV = "AUTOBATCH_PROFILE_DIR"
MAX_SECONDS = 10.0

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
PINNED_CALLS = ("cudaHostAlloc", "cudaMallocHost", "cudaHostRegister", "cudaFreeHost", "cudaHostUnregister",
                "cuMemHostAlloc", "cuMemAllocHost")
DEVICE_ALLOC_CALLS = ("cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync")
LONG_GAP_US = 1000.0


def profile_dir(configured: str | None = None) -> str | None:
    """Where traces go: the app's `profile_dir`, else $AUTOBATCH_PROFILE_DIR; None: profiling is off."""
    return configured or os.environ.get(PROFILE_DIR_ENV) or None


class ProfileRequestError(ValueError):
    """A profile request the replica cannot run; the message says what to send."""


def parse_request(body: bytes, default_batch: int) -> dict:
    try:
        asked = json.loads(body or b"{}")
    except ValueError as exc:
        raise ProfileRequestError(f"the profile request is not JSON ({exc}); send "
                                  '{"seconds": 2, "what": "serving"} or {"what": "probe"}') from None
    if not isinstance(asked, dict):
        raise ProfileRequestError('send a JSON object: {"seconds": 2, "what": "serving" or "probe"}')
    what = asked.get("what", "serving")
    if what not in ("serving", "probe"):
        raise ProfileRequestError(f'"what" is {what!r}; send "serving" (the next seconds of traffic) or '
                                  '"probe" (the tuner\'s measurement of the served batch)')
    try:
        seconds = float(asked.get("seconds", 2.0))
        batch_size = int(asked.get("batch_size") or default_batch)
    except (TypeError, ValueError):
        raise ProfileRequestError('"seconds" must be a number and "batch_size" an integer') from None
    if not 0 < seconds <= MAX_SECONDS:
        raise ProfileRequestError(f'"seconds" is {seconds}; send a number in (0, {MAX_SECONDS:g}]')
    if batch_size < 1:
        raise ProfileRequestError(f'"batch_size" is {batch_size}; send a positive integer')
    return {"what": what, "seconds": seconds, "batch_size": batch_size,
            "with_stack": bool(asked.get("with_stack", True))}


# ----- the trace's summary (a pure function of the Chrome trace: tests feed it made-up traces) -----
def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _calls(events: list[dict], names: tuple[str, ...]) -> dict:
    found: dict[str, dict] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and name.startswith(names):
            key = next(n for n in names if name.startswith(n))
            slot = found.setdefault(key, {"count": 0, "ms": 0.0})
            slot["count"] += 1
            slot["ms"] += e.get("dur", 0.0) / 1e3
    return {k: {"count": v["count"], "ms": round(v["ms"], 3)} for k, v in sorted(found.items())}


def summarize_trace(trace: dict, window_s: float | None = None, top: int = 8) -> dict:
    """GPU busy fraction and the idle gaps between its work, host synchronisations, pinned and device
    allocations, copies by kind, and the kernels and operators that took longest."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    spans = [e["ts"] for e in events] + [e["ts"] + e["dur"] for e in events]
    trace_window_us = (max(spans) - min(spans)) if spans else 0.0
    window_us = window_s * 1e6 if window_s else trace_window_us
    summary: dict = {"window_s": round(window_us / 1e6, 4), "events": len(events)}
    if gpu:
        busy = _union((e["ts"], e["ts"] + e["dur"]) for e in gpu)
        busy_us = sum(e - s for s, e in busy)
        gaps = [b[0] - a[1] for a, b in zip(busy, busy[1:])]
        first, last = busy[0][0], busy[-1][1]
        long_gaps = [g for g in gaps if g >= LONG_GAP_US]
        summary["gpu"] = {
            "busy_fraction": round(busy_us / window_us, 4) if window_us else None,
            "busy_ms": round(busy_us / 1e3, 3),
            "kernels": sum(e.get("cat") == "kernel" for e in gpu),
            "idle_gaps": len(gaps), "idle_ms": round(sum(gaps) / 1e3, 3),
            "gap_p50_us": _quantile(gaps, 0.5), "gap_p99_us": _quantile(gaps, 0.99),
            "gap_max_us": max(gaps) if gaps else None,
            f"gaps_over_{LONG_GAP_US / 1e3:g}ms": len(long_gaps),
            f"idle_ms_in_gaps_over_{LONG_GAP_US / 1e3:g}ms": round(sum(long_gaps) / 1e3, 3),
            "idle_before_first_and_after_last_ms": round((window_us - (last - first)) / 1e3, 3)
            if window_us and window_us >= last - first else None,
        }
        copies: dict[str, dict] = {}
        for e in gpu:
            if e.get("cat") != "gpu_memcpy":
                continue
            slot = copies.setdefault(e.get("name", "memcpy"), {"count": 0, "ms": 0.0, "bytes": 0})
            slot["count"] += 1
            slot["ms"] += e["dur"] / 1e3
            slot["bytes"] += int((e.get("args") or {}).get("bytes", 0) or 0)
        summary["copies"] = {k: {**v, "ms": round(v["ms"], 3)} for k, v in copies.items()}
        by_kernel: dict[str, float] = {}
        for e in gpu:
            if e.get("cat") == "kernel":
                by_kernel[e["name"]] = by_kernel.get(e["name"], 0.0) + e["dur"]
        summary["top_kernels_ms"] = {k[:120]: round(v / 1e3, 3) for k, v in
                                     sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]}
    else:
        summary["gpu"] = None  # a CPU replica, or a trace without CUDA activity
    summary["host_syncs"] = _calls(events, SYNC_CALLS)
    summary["pinned_allocations"] = _calls(events, PINNED_CALLS)
    summary["device_allocations"] = _calls(events, DEVICE_ALLOC_CALLS)
    by_op: dict[str, float] = {}
    for e in cpu_ops:
        by_op[e["name"]] = by_op.get(e["name"], 0.0) + e["dur"]
    summary["top_cpu_ops_ms"] = {k[:120]: round(v / 1e3, 3) for k, v in
                                 sorted(by_op.items(), key=lambda kv: -kv[1])[:top]}
    return summary


# ----- host measurements beside the profiler -----
_NUMBERED = re.compile(r"[_-]\d+$")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, by Python thread name (a pool's
    numbered workers together), the threads Python did not start as "other"."""
    names = {t.native_id: _NUMBERED.sub("", t.name) for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return seconds
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended between the listing and the read
        name = names.get(int(tid), "other")
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


def cpu_seconds_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in sorted(set(before) | set(after))
            if after.get(k, 0.0) - before.get(k, 0.0) > 0}


class GilTicker:
    """A thread that sleeps `interval_s` again and again and records how late it wakes: the lateness
    is the time it waited for the GIL (plus the OS's scheduling delay)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.late_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autobatch-gil-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            time.sleep(self.interval_s)
            self.late_s.append(max(0.0, time.perf_counter() - started - self.interval_s))

    def __enter__(self) -> "GilTicker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        late = self.late_s
        if not late:
            return {"ticks": 0}
        return {"ticks": len(late), "late_mean_us": round(1e6 * statistics.fmean(late), 1),
                "late_p50_us": round(1e6 * _quantile(late, 0.5), 1),
                "late_p99_us": round(1e6 * _quantile(late, 0.99), 1),
                "late_max_us": round(1e6 * max(late), 1)}


# ----- one capture -----
class Capture:
    """A torch.profiler session that starts and stops in the thread the caller runs `start` and
    `stop` in (the replica's forward thread), with the host measurements beside it."""

    def __init__(self, cuda: bool, with_stack: bool):
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
        self._profiler = tp.profile(activities=activities, with_stack=with_stack, record_shapes=False)
        self._ticker = GilTicker()
        self.cpu_before: dict[str, float] = {}
        self.started_s = self.stopped_s = 0.0
        self.process_cpu_s = 0.0

    def start(self) -> None:
        self._ticker.__enter__()
        self.cpu_before = thread_cpu_seconds()
        self.process_cpu_s = time.process_time()
        self._profiler.start()
        self.started_s = time.perf_counter()

    def stop(self) -> None:
        self.stopped_s = time.perf_counter()
        self.process_cpu_s = time.process_time() - self.process_cpu_s
        self.cpu_after = thread_cpu_seconds()  # before the profiler's own processing of its events
        self._ticker.__exit__(None, None, None)
        self._profiler.stop()

    @property
    def window_s(self) -> float:
        return self.stopped_s - self.started_s

    def write(self, path_prefix: str) -> tuple[str, dict]:
        """The Chrome trace gzipped beside `path_prefix`, and its summary with the host numbers."""
        raw = path_prefix + ".json"
        self._profiler.export_chrome_trace(raw)
        with open(raw, "rb") as f:
            trace = json.load(f)
        gz = raw + ".gz"
        with open(raw, "rb") as f, gzip.open(gz, "wb", compresslevel=3) as g:
            g.write(f.read())
        os.remove(raw)
        summary = summarize_trace(trace, self.window_s)
        summary["process_cpu_cores"] = round(self.process_cpu_s / self.window_s, 3) if self.window_s else None
        summary["thread_cpu_s"] = cpu_seconds_between(self.cpu_before, self.cpu_after)
        summary["gil_wait_1ms_ticker"] = self._ticker.summary()
        return gz, summary


def per_batch(summary: dict, batches: int, samples: int) -> dict:
    """The capture's totals per served batch, where batches ran in it."""
    if batches <= 0:
        return {"batches": 0, "samples": samples}
    window_ms = summary["window_s"] * 1e3
    out = {"batches": batches, "samples": samples, "mean_batch": round(samples / batches, 2),
           "ms_per_batch": round(window_ms / batches, 3),
           "samples_per_s": round(samples / summary["window_s"], 1) if summary["window_s"] else None}
    if summary.get("gpu"):
        out["gpu_busy_ms_per_batch"] = round(summary["gpu"]["busy_ms"] / batches, 3)
        out["gpu_idle_ms_per_batch"] = round((window_ms - summary["gpu"]["busy_ms"]) / batches, 3)
    cpu = summary.get("thread_cpu_s") or {}
    out["thread_cpu_ms_per_batch"] = {k: round(1e3 * v / batches, 3) for k, v in cpu.items()}
    syncs = summary.get("host_syncs") or {}
    out["host_syncs_per_batch"] = round(sum(v["count"] for v in syncs.values()) / batches, 2)
    return out


def trace_path(directory: str, model: str, what: str) -> str:
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{model}-{what}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}")


def run_probe_loop(run_batch: Callable[[int], object], batch_size: int, seconds: float,
                   synchronize: Callable[[], None]) -> int:
    """The tuner's `run_batch` at `batch_size`, again and again for `seconds`: how many batches ran."""
    batches = 0
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        run_batch(batch_size)
        batches += 1
    synchronize()
    return batches


def _probe_captured(spec, meter, capture: Capture, batch_size: int, seconds: float) -> int:
    """In the forward thread, the device held alone: the tuner's measurement of `batch_size`
    (ExampleBatches, overlapped as the replica serves where the spec's stages overlap), warmed,
    then captured for `seconds`."""
    from optimizer.model import ExampleBatches

    run = ExampleBatches(spec)
    try:
        for _ in range(2):  # the first run of a size fills the overlap's pipe; the second is steady
            run(batch_size)
        meter.synchronize()
        capture.start()
        batches = run_probe_loop(run, batch_size, seconds, meter.synchronize)
        capture.stop()
        return batches
    finally:
        run.clear()
        meter.cleanup()


async def capture_replica(replica, asked: dict, directory: str) -> dict:
    """One capture of `replica` (serve/replica/replica.py) as `parse_request` read it: its summary, per
    batch, and where the trace was written."""
    loop = asyncio.get_running_loop()
    forward = replica.forward_executor
    capture = Capture(replica.meter.fingerprint.kind == "cuda", asked["with_stack"])
    what, seconds = asked["what"], asked["seconds"]
    if what == "serving":
        stats = replica.stats
        counted: dict[str, int] = {}

        def start() -> None:
            counted.update(batches=stats.batches, samples=stats.samples_served)
            capture.start()

        def stop() -> None:
            capture.stop()
            counted.update(batches=stats.batches - counted["batches"], samples=stats.samples_served - counted["samples"])

        await loop.run_in_executor(forward, start)  # queued behind the batch computing now, if any
        await asyncio.sleep(seconds)
        await loop.run_in_executor(forward, stop)
        batches, samples = counted["batches"], counted["samples"]
    else:
        async with replica.locks.exclusive():  # no served batch runs while the probe is timed
            batches = await loop.run_in_executor(forward, _probe_captured, replica.spec, replica.meter, capture,
                                                 asked["batch_size"], seconds)
        samples = batches * asked["batch_size"]
    path, summary = await loop.run_in_executor(None, capture.write, trace_path(directory, replica.model_name, what))
    return {"model": replica.model_name, "device": replica.device_label, "what": what,
            "batch_size": asked["batch_size"] if what == "probe" else None,
            "serving_max_batch_size": replica.settings.size if replica.settings else None,
            "trace": path, "per_batch": per_batch(summary, batches, samples), "summary": summary}
