"""A model that behaves like a batch on an accelerator, for measuring batch formation on a CPU machine.

Its `predict` sleeps `fixed_ms + per_sample_ms x n` and computes nothing: like a CUDA kernel, the
batch takes wall time while the host's cores stay free for the event loop, the proxy and the load
generator. On a 2-core machine a real model's forward takes the cores the serving path needs, so
the serving path and the model cannot be told apart; with this stand-in they can. The defaults are
benchmarks/device_queue.py's: 300 ms + 10 ms per sample, a device slow enough that 2 cores' HTTP
path can send it more than it computes (a batch of 64 in 940 ms).

Registered for benchmarks/device_queue.py through $AUTOBATCH_MODELS
(`stand_in_device=stand_in_device:StandInDeviceSpec`, this folder on the PYTHONPATH).
Options: `fixed_ms`, `per_sample_ms`.
"""
from __future__ import annotations

import json
import time
from typing import ClassVar

from deployments.base import ModelSpec, PayloadError, TensorSpec


class StandInDeviceSpec(ModelSpec):
    name: ClassVar[str] = "stand_in_device"
    usage: ClassVar[str] = "POST any JSON number; the answer echoes it after the stand-in device's batch time"

    def __init__(self, weights_path: str | None = None, fixed_ms: float = 300.0, per_sample_ms: float = 10.0, **options):
        super().__init__(weights_path, **options)
        self.fixed_s, self.per_sample_s = float(fixed_ms) / 1e3, float(per_sample_ms) / 1e3

    def input_signature(self) -> dict:
        return {"fixed_s": self.fixed_s, "per_sample_s": self.per_sample_s}  # a new curve is a new cache key

    def load(self, device: str, dtype: str):
        self.device, self.dtype_name = device, dtype
        self.model = object()  # nothing to hold: the batch time is the model
        return self.model

    def example_batch(self, n: int) -> list:
        return [float(i) for i in range(n)]

    def decode(self, payload: bytes, content_type: str | None = None):
        try:
            return float(json.loads(payload))
        except (ValueError, TypeError):
            raise PayloadError(f"send a JSON number (got {len(payload)} bytes of {content_type or 'unknown type'})", 400) from None

    def predict(self, samples: list) -> list:
        time.sleep(self.fixed_s + self.per_sample_s * len(samples))
        return list(samples)

    def encode(self, output) -> dict:
        return {"model": self.name, "echo": output}

    @classmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        return b"1.5", "application/json"

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("value", "BYTES", (-1,), "one JSON number per sample"),)

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("echo", "FP32", (-1,), "the number sent"),)
