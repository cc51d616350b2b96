"""A vision model's forward replayed as CUDA graphs, one per batch-size bucket, once the served batch is known.

Why: on a GPU the eager forward of a batch is host-bound. Every operator is a Python call and a
kernel launch, and one replica process's thread spends more CPU per batch on launches than the card
spends computing it (docs/benchmarks.md §16 has the profile). A captured graph launches the whole
forward in one call.

What it costs, and why that stays within the tuning:
- One graph per bucket: the powers of two below the served batch, and the served batch itself. A
  batch of n runs the smallest bucket >= n; the padding rows compute on whatever the input buffer
  held and are never read. In eval mode every sample is computed on its own (batch norm uses its
  running statistics, attention stays within a sample), so the padding changes no answer.
- All buckets share one memory pool, captured largest first, so the smaller graphs reuse the
  largest one's intermediates. The pool holds about what one eager forward of the served batch
  held at its peak, which is what the tuner measured and found within the memory budget.
- The input buffer is one tensor of the served batch, sliced per bucket.
- The graphs replay one at a time, and each output is consumed before the next replay, because
  every forward runs in the replica's one forward thread and the caller copies the output to the host.
- Capturing takes a few forwards per bucket. It happens once the batch is decided, before traffic.

A batch larger than the largest bucket, a device that is not CUDA, or a capture that fails all run
the eager forward, and the reason is kept in `report` for the log and GET /tuning.

Mechanism only: which sizes to capture and when is the replica's (serve/replica/replica.py calls the
spec's `ready_to_serve`). The backend is injectable so that the CPU tests check the buckets, the
padding and the fallbacks without a GPU (tests/test_cuda_graphs.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size: at most half of a batch's work is padding."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds n samples; None when n is over the largest (run eager)."""
    for size in buckets:
        if size >= n:
            return size
    return None


@dataclass
class GraphReport:
    """What GET /tuning shows under `cuda_graphs` and the replica logs."""

    state: str  # "captured", "off" or "failed"
    why: str
    buckets: list[int] = field(default_factory=list)
    capture_s: float = 0.0
    pool_bytes: int = 0
    replays: int = 0
    eager_runs: int = 0  # batches over the largest bucket

    def describe(self) -> str:
        if self.state != "captured":
            return f"CUDA graphs {self.state}: {self.why}"
        return (f"CUDA graphs captured for batch sizes {', '.join(map(str, self.buckets))} in {self.capture_s:.2f} s "
                f"({self.pool_bytes / 2**20:.0f} MiB held by their pool); {self.why}")

    def to_dict(self) -> dict:
        return {"state": self.state, "why": self.why, "summary": self.describe(), "buckets": self.buckets, "capture_s": round(self.capture_s, 3),
                "pool_bytes": self.pool_bytes, "replays": self.replays, "eager_runs": self.eager_runs}


class TorchCudaGraphs:
    """The real backend: torch.cuda graphs sharing one pool, captured on a side stream."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.pool = torch.cuda.graph_pool_handle()

    def empty_like_input(self, shape, dtype, memory_format):
        return self.torch.zeros(shape, dtype=dtype, device=self.device).contiguous(memory_format=memory_format or self.torch.contiguous_format)

    def reserved_bytes(self) -> int:
        return int(self.torch.cuda.memory_reserved(self.device))

    def release_cached(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()

    def capture(self, model: Callable, static_input) -> tuple[Any, Any]:
        """Warm the shape on the side stream (lazy library set-up must not happen inside a capture),
        then capture one forward into the shared pool. Returns (graph, its output tensor)."""
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                model(static_input)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a decode thread allocating beside the capture must not invalidate it
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            output = model(static_input)
        return graph, output

    def replay(self, graph) -> None:
        graph.replay()


class GraphedForward:
    """`model(batch)` for batches up to `max_batch_size`, replayed from captured graphs."""

    def __init__(self, model: Callable, sample_shape: tuple[int, ...], dtype, max_batch_size: int,
                 backend, memory_format=None):
        self.model, self.sample_shape, self.dtype = model, tuple(sample_shape), dtype
        self.max_batch_size = int(max_batch_size)
        self.backend = backend
        self.memory_format = memory_format
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._input = None
        self.report = GraphReport("off", "not captured yet")

    @property
    def buckets(self) -> list[int]:
        return sorted(self._graphs)

    def capture(self, why: str = "") -> GraphReport:
        """Every bucket, largest first. Any failure leaves no graph: the eager forward serves."""
        buckets = bucket_sizes(self.max_batch_size)
        started = time.perf_counter()
        try:
            self.backend.release_cached()  # the tuning's cached eager blocks go back before the pool grows
            before = self.backend.reserved_bytes()
            self._input = self.backend.empty_like_input((self.max_batch_size, *self.sample_shape), self.dtype,
                                                        self.memory_format)
            for size in sorted(buckets, reverse=True):
                self._graphs[size] = self.backend.capture(self.model, self._input[:size])
            self.backend.release_cached()  # the warm-up runs' eager blocks
            pool_bytes = max(0, self.backend.reserved_bytes() - before)
        except Exception as exc:  # a model with an operator capture cannot take: serve eager, say why
            self._graphs, self._input = {}, None
            try:
                self.backend.release_cached()
            except Exception:
                pass
            self.report = GraphReport("failed", f"{type(exc).__name__}: {exc}; the eager forward serves")
            return self.report
        self.report = GraphReport("captured", why or f"batches up to {self.max_batch_size} replay them",
                                  buckets=sorted(buckets), capture_s=time.perf_counter() - started,
                                  pool_bytes=pool_bytes)
        return self.report

    def __call__(self, batch):
        """The model's output for `batch`: a view into a graph's output tensor, valid until the next
        call (read it, or copy it, before then)."""
        n = int(batch.shape[0])
        size = bucket_for(n, self.buckets) if self._graphs else None
        if size is None:
            self.report.eager_runs += 1
            return self.model(batch)
        self._input[:n].copy_(batch)
        graph, output = self._graphs[size]
        self.backend.replay(graph)
        self.report.replays += 1
        return output[:n]

    def release(self) -> None:
        self._graphs, self._input = {}, None
