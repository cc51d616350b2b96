"""The ModelSpec protocol: what a model family provides, named after a request's journey.

load -> example_batch (tuning) ; decode -> predict -> encode (serving). The optimizer only sees
`load`, `example_batch` and `predict`; Ray Serve sees all of them. Each spec also declares its wire
format (`inputs`, `outputs` as Open Inference Protocol v2 tensors, a `usage` line, an
`example_payload`), so the serving layer, the clients and the benchmarks ask the spec instead of
keeping a table per model. No Ray imports here, so a spec is usable and testable in a plain process.
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

# PayloadError is the spec's way to refuse a request (specs import it from here or from wire);
# DATATYPES is the table every TensorSpec is checked against. Both are the wire's (wire/__init__.py).
from wire import DATATYPES, NUMPY_TYPES, PayloadError  # noqa: F401

DTYPES = ("float32", "float16", "bfloat16")


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


_TENSOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model, in Open Inference Protocol v2 terms (what
    `GET /v2/models/<model>` lists and tritonclient builds requests from).

    shape: -1 marks a dimension that varies by request. The first dimension is always the sample
    count (-1), so one request may carry many samples and they batch by sample. A BYTES element is
    one whole byte string (one encoded image, one UTF-8 text), not one byte. `optional`: a request
    may leave the tensor out (the description says what happens then)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str
    optional: bool = False

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        where = f"tensor {self.name!r}"
        if not isinstance(self.name, str) or not _TENSOR_NAME.fullmatch(self.name):
            raise SpecConfigError(f"{where}: a tensor name is letters, digits and underscores, not starting with a digit")
        if self.datatype not in DATATYPES:
            raise SpecConfigError(f"{where}: datatype {self.datatype!r} is not an Open Inference Protocol type; "
                                  f"use one of {', '.join(DATATYPES)}")
        if not self.shape or self.shape[0] != -1:
            raise SpecConfigError(f"{where}: shape {list(self.shape)} must start with -1, the sample count")
        if any(isinstance(d, bool) or not isinstance(d, int) or not (d == -1 or d >= 1) for d in self.shape):
            raise SpecConfigError(f"{where}: shape {list(self.shape)} may hold only positive sizes and -1 (varies)")
        if not isinstance(self.description, str) or not self.description.strip():
            raise SpecConfigError(f"{where}: give a description (what an element holds, its units and layout)")

    def metadata(self) -> dict:
        """The tensor as Open Inference Protocol model metadata lists it."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class ModelSpec(abc.ABC):
    """One model family. Subclasses set `name`, `usage`, `library_packages` and the hooks below.

    A new family is one module with a subclass plus one registration under its `name` (the
    registry's table, the `autobatch.models` entry-point group, or $AUTOBATCH_MODELS; see
    deployments/registry.py); nothing in serve/, the clients or the benchmarks names a family."""

    name: ClassVar[str]
    # One line for a person reading GET <route>/: what to POST on the simple route, what comes back.
    usage: ClassVar[str]
    # The packages whose versions change memory or speed: part of the tuning cache key.
    library_packages: ClassVar[tuple[str, ...]] = ("torch",)
    # A whole batch's compute must fit this unless the deployment says otherwise.
    default_latency_budget_s: ClassVar[float] = 0.5
    # The default on one kind of device where it differs ({"cpu": 4.0}; optimizer/model.py's
    # default_latency_budget_s() reads it). Empty: default_latency_budget_s everywhere.
    default_latency_budget_s_by_device: ClassVar[dict[str, float]] = {}
    spec_version: ClassVar[int] = 1
    # Every decoded sample has one tensor shape (a resized image), so a batch's shape is its size
    # alone and a replica can run each size once before traffic (serve/replica/warmup.py). False where
    # shapes also follow the input (prompt lengths): warming sizes would not cover them.
    fixed_sample_shape: ClassVar[bool] = True
    # A cheaper probe for tuning (optimizer/model.py's TunableModel says what it must do); a family
    # whose predict is one forward pass has none: its probe is the predict itself.
    probe_batch = None

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

    # --- predict in two stages, so that a replica can feed the device the next batch while it
    # computes this one (serve/replica/batch_runner.py; the tuner times the same overlap, optimizer/model.py)
    def overlaps(self) -> bool:
        """True where `prepare` and `forward` use different parts of the machine, so that running
        one batch's prepare during the previous batch's forward gains throughput: on a GPU the JPEG
        decoder and the copy engine against the compute units. False: a replica runs predict whole."""
        return False

    def prepare(self, samples: list) -> Any:
        """The first part of `predict`: the samples put on the device as one batch (decoded,
        resized, normalised there), ready for `forward`. `forward(prepare(s))` answers as
        `predict(s)` does. The default does nothing, for a spec that does not overlap."""
        return samples

    def forward(self, prepared: Any) -> list:
        """The rest of `predict`: the model and its post-processing on a prepared batch."""
        return self.predict(prepared)

    def set_serving_batch(self, max_batch_size: int | None):
        """The replica's word that batches up to `max_batch_size` will be served from now on (after a
        tuning), or None before it measures again: a spec that prepares per served size (CUDA graphs,
        deployments/cuda_graphs.py) does it here, and lets go of it for a measurement. Returns a report
        of what it did (a dict, or an object with to_dict() whose counts stay live) for the log and
        GET /tuning, or None where there is nothing to do."""
        return None

    # --- the wire format (cheap: no model is loaded)
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """What a request carries, as Open Inference Protocol tensors (first dimension: samples)."""

    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """What the answer carries per sample, as Open Inference Protocol tensors."""

    # --- many samples per request, as Open Inference Protocol tensors (built on decode and encode)
    def decode_tensors(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> list:
        """One request's input tensors (numpy arrays named as `inputs()` declares them, already
        checked against the declared datatypes and shapes, first dimension the sample count) ->
        per sample, in order, the decoded sample or the PayloadError that sample earned (one bad
        element fails its request, naming the element, and nothing else). A PayloadError raised
        here fails the whole request (inputs that contradict each other).

        The default serves a spec whose one input is BYTES: each element is a body for `decode`."""
        declared = self.inputs()
        if len(declared) == 1 and declared[0].datatype == "BYTES":
            return decode_each(lambda element: self.decode(bytes(element)), inputs[declared[0].name])
        raise PayloadError(f"model {self.name!r} does not take Open Inference Protocol tensors: its spec has no "
                           f"decode_tensors; POST one payload to /{self.name} instead", 501)

    def encode_tensors(self, encoded: list[dict]) -> dict[str, Any]:
        """The answers of one request's samples (each what `encode` returned, in order) -> the
        declared output tensors as numpy arrays, first dimension the sample count.

        The default takes each declared output from the encoded answer's field of the same name."""
        import numpy as np

        tensors = {}
        for spec in self.outputs():
            dtype = NUMPY_TYPES[spec.datatype]
            values = [answer[spec.name] for answer in encoded]
            if spec.datatype == "BYTES":
                values = [v.encode() if isinstance(v, str) else v for v in values]
            tensors[spec.name] = np.array(values, dtype=dtype)
        return tensors

    @classmethod
    @abc.abstractmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        """One request body for the simple POST route and its content type: what `autobatch bench`
        sends when told nothing else. Made in code (no file). `max_new_tokens`: for a model that
        generates, the tokens the example asks for (None: the deployment's default); others ignore it."""


def decode_each(decode, elements) -> list:
    """decode(element) for each element, in order; an element that fails gets its PayloadError in
    its place (a decoder bug too, as a 422), so its request can name it and its neighbours are kept."""
    samples = []
    for element in elements:
        try:
            samples.append(decode(element))
        except PayloadError as exc:
            samples.append(exc)
        except Exception as exc:  # noqa: BLE001 - nothing a client sent may escape as a 500
            samples.append(PayloadError(f"could not be decoded ({type(exc).__name__}: {exc}); check it is what "
                                        f"the model's metadata describes", 422))
    return samples


def check_wire_format(spec: ModelSpec) -> None:
    """A spec's declarations are usable: a usage line, at least one input and one output, unique
    names. The tensors check themselves when made. SpecConfigError says what to fix."""
    usage = getattr(type(spec), "usage", None)
    if not isinstance(usage, str) or not usage.strip():
        raise SpecConfigError(f"{type(spec).__name__} sets no `usage`; give one line saying what to POST and what comes back")
    for kind, tensors in (("inputs", spec.inputs()), ("outputs", spec.outputs())):
        if not tensors or not all(isinstance(t, TensorSpec) for t in tensors):
            raise SpecConfigError(f"{type(spec).__name__}.{kind}() must return one or more TensorSpec, got {tensors!r}")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise SpecConfigError(f"{type(spec).__name__}.{kind}() names a tensor twice: {names}")
