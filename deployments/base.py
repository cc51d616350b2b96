"""The ModelSpec protocol: what a model family provides, named after a request's journey.

load -> example_batch (tuning) ; decode -> predict -> encode (serving). The optimizer only sees
`load`, `example_batch` and `predict`; Ray Serve sees all of them. No Ray imports here, so a spec
is usable and testable in a plain process.
"""
from __future__ import annotations

import abc
import hashlib
import os
from typing import Any, ClassVar

DTYPES = ("float32", "float16", "bfloat16")


class PayloadError(ValueError):
    """A request the client can fix. `status` becomes the HTTP status; the message says what to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


class SpecConfigError(ValueError):
    """A deployment option that cannot work (unknown model, missing weights file, bad dtype...)."""


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SpecConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def file_identity(path: str | None) -> str:
    """Identifies local weights cheaply (no loading): path, size and modification time."""
    if not path:
        return "synthetic"
    if not os.path.exists(path):
        raise SpecConfigError(f"weights path {path!r} does not exist; give a local file or folder, or omit it for synthetic weights")
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


class ModelSpec(abc.ABC):
    """One model family. Subclasses set `name`, `library_packages` and the hooks below."""

    name: ClassVar[str]
    # The packages whose versions change memory or speed: part of the tuning cache key.
    library_packages: ClassVar[tuple[str, ...]] = ("torch",)
    # A whole batch's compute must fit this unless the deployment says otherwise.
    default_latency_budget_s: ClassVar[float] = 0.5
    spec_version: ClassVar[int] = 1
    # Every decoded sample has one tensor shape (a resized image), so a batch's shape is its size
    # alone and a replica can run each size once before traffic (serve/warmup.py). False where
    # shapes also follow the input (prompt lengths): warming sizes would not cover them.
    fixed_sample_shape: ClassVar[bool] = True

    def __init__(self, weights_path: str | None = None, **options: Any):
        self.weights_path = weights_path or None
        self.options = options
        self.model = None
        self.device = "cpu"
        self.dtype_name = "float32"

    # --- identity (cheap: no model is loaded) ---
    def default_dtype(self, device_kind: str) -> str:
        return "float16" if device_kind == "cuda" else "float32"

    def input_signature(self) -> dict:
        """What fixes the worst-case input (image size, prompt + new tokens): part of the cache key."""
        return {}

    def signature(self) -> dict:
        return {
            "model": self.name,
            "spec_version": self.spec_version,
            "weights": file_identity(self.weights_path),
            "input": self.input_signature(),
        }

    def weights_description(self) -> str:
        return self.weights_path or f"synthetic: the {self.name} architecture with random weights (nothing downloaded)"

    # --- the request's journey ---
    @abc.abstractmethod
    def load(self, device: str, dtype: str) -> Any:
        """Build the model on `device` ('cpu', 'cuda:0') in `dtype`; store it on self.model and return it."""

    @abc.abstractmethod
    def example_batch(self, n: int) -> list:
        """n decoded samples of the worst case the deployment admits, for tuning."""

    @abc.abstractmethod
    def decode(self, payload: bytes, content_type: str | None = None) -> Any:
        """One validated sample, or PayloadError saying what to send instead."""

    @abc.abstractmethod
    def predict(self, samples: list) -> list:
        """One output per sample, in order."""

    def encode(self, output: Any) -> dict:
        return output
