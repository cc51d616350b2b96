"""A model family of a user's own, in one file: a 2-layer MLP that scores 3 classes from 8 numbers.

What it takes to serve a model with autobatch: a ModelSpec subclass with the request's journey
(load, example_batch, decode, predict, encode) and its wire format (inputs, outputs, usage,
example_payload), registered under its `name`. tests/test_fifth_model.py registers it the way a
user without a package would, in the application's runtime_env:
    AUTOBATCH_MODELS=tiny_mlp=tiny_mlp:TinyMLPSpec   with this folder on the PYTHONPATH
(an installed package would use the `autobatch.models` entry-point group instead).
"""
from __future__ import annotations

import json
import math
from typing import ClassVar

from deployments.base import ModelSpec, PayloadError, TensorSpec, torch_dtype

FEATURES, HIDDEN, CLASSES = 8, 32, 3
MAX_REQUEST_BYTES = 4096  # 8 numbers in JSON are far less; a bigger body is not a request for this model


class TinyMLPSpec(ModelSpec):
    name: ClassVar[str] = "tiny_mlp"
    usage: ClassVar[str] = (f"POST a JSON list of {FEATURES} numbers; the answer is the softmax scores of its "
                            f"{CLASSES} classes and the best class id")

    def load(self, device: str, dtype: str):
        import torch

        with torch.random.fork_rng(devices=[]):  # the same weights in every process: answers can be checked
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
        if self.weights_path:
            model.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        self.device, self.dtype_name = device, dtype
        self.model = model.eval().to(device=device, dtype=torch_dtype(dtype))
        return self.model

    def example_batch(self, n: int) -> list:
        import torch

        return list(torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(n)))

    def decode(self, payload: bytes, content_type: str | None = None):
        import torch

        send = f"send a JSON list of {FEATURES} numbers, e.g. {json.dumps([0.5] * FEATURES)}"
        if len(payload) > MAX_REQUEST_BYTES:
            raise PayloadError(f"request is {len(payload)} bytes, over {MAX_REQUEST_BYTES}; {send}", 413)
        try:
            values = json.loads(payload)
        except (ValueError, RecursionError):
            raise PayloadError(f"request body is not JSON ({len(payload)} bytes of {content_type or 'unknown type'}); {send}", 400) from None
        numbers = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers or len(values) != FEATURES:
            got = f"a list of {len(values)} items" if isinstance(values, list) else type(values).__name__
            raise PayloadError(f"expected {FEATURES} finite numbers, got {got}; {send}", 422)
        return torch.tensor(values, dtype=torch.float32)

    def predict(self, samples: list) -> list[dict]:
        import torch

        with torch.inference_mode():
            batch = torch.stack(samples).to(self.device, dtype=torch_dtype(self.dtype_name))
            scores = torch.softmax(self.model(batch).float(), dim=-1).cpu()
        return [{"scores": row.tolist(), "class_id": int(row.argmax())} for row in scores]

    def encode(self, output: dict) -> dict:
        return {"model": self.name, **output}

    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("features", "FP32", (-1, FEATURES), f"{FEATURES} finite numbers per sample"),)

    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("scores", "FP32", (-1, CLASSES), f"softmax scores of the {CLASSES} classes per sample"),
                TensorSpec("class_id", "INT64", (-1,), "the class with the highest score per sample"))

    @classmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        return json.dumps([round(0.25 * i - 1, 2) for i in range(FEATURES)]).encode(), "application/json"
