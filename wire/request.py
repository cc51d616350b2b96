"""An inference request and response of the Open Inference Protocol v2, independent of the wire
(REST JSON, REST + binary tensor data, gRPC): what the router parses into, validates against a
model's declared tensors, and hands to the model's replica."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import PayloadError
from .tensors import NUMPY_DTYPES, Tensor


@dataclass
class RequestedOutput:
    """An output the client asked for; `binary`: the binary_data parameter (None: not given)."""

    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model_name: str
    inputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Samples in the request: the first dimension, which validate() made the same for every input."""
        return self.inputs[0].samples if self.inputs else 0

    @property
    def payload_bytes(self) -> int:
        """The bytes its tensors hold (a BYTES element by its length): what crosses to the replica."""
        return sum(t.nbytes for t in self.inputs)

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def binary_output(self, name: str) -> bool:
        """Whether a REST response sends this output as binary data: its own binary_data parameter,
        else the request's binary_data_output, else JSON."""
        for requested in self.outputs:
            if requested.name == name and requested.binary is not None:
                return requested.binary
        return bool(self.parameters.get("binary_data_output", False))


@dataclass
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    # the replica's admission room (serve/replica/admission.py Admission.room) for the router's shedding
    # (serve/oip/shed.py); never on the wire
    admission: dict | None = field(default=None, compare=False)


@dataclass
class InferFailure:
    """A request the model's replica refused (a bad element, an over-long prompt): returned, not
    raised, so its status and message cross the actor boundary intact. The message names the
    element's index where one element is at fault."""

    status: int
    message: str
    retry_after_s: float | None = None  # a 503's Retry-After
    admission: dict | None = field(default=None, compare=False)  # as InferResponse's, never on the wire

    @classmethod
    def of(cls, error: PayloadError, index: int | None = None) -> "InferFailure":
        where = f"element {index}: " if index is not None else ""
        return cls(error.status, where + error.message)


# ----------------------------------------------------------------- validation against a model
def describe_tensor(spec) -> str:
    return f"{spec.name} ({spec.datatype} {list(spec.shape)})"


def _integer(datatype: str) -> bool:
    return datatype in NUMPY_DTYPES and datatype != "BOOL" and NUMPY_DTYPES[datatype].kind in "iu"


def _as_declared(tensor: Tensor, spec) -> Tensor:
    """The tensor in its declared datatype. Integers of another width are taken when every value
    fits (a client's np.array([16]) is INT64); anything else must match exactly."""
    if tensor.datatype == spec.datatype:
        return tensor
    if _integer(tensor.datatype) and _integer(spec.datatype):
        info = np.iinfo(NUMPY_DTYPES[spec.datatype])
        flat = tensor.data.reshape(-1)
        bad = np.flatnonzero((flat < info.min) | (flat > info.max)) if flat.size else []
        if len(bad):
            index = int(bad[0])
            raise PayloadError(f"input {tensor.name!r}: element {index} ({flat[index]}) does not fit {spec.datatype} "
                               f"({info.min}..{info.max}); send {describe_tensor(spec)}")
        return Tensor(tensor.name, spec.datatype, tensor.shape, tensor.data.astype(NUMPY_DTYPES[spec.datatype]),
                      tensor.parameters)
    raise PayloadError(f"input {tensor.name!r} is {tensor.datatype} but the model takes {describe_tensor(spec)}; "
                       f"send it as {spec.datatype}")


def _check_shape(tensor: Tensor, spec) -> None:
    declared = tuple(spec.shape)
    if len(tensor.shape) != len(declared):
        raise PayloadError(f"input {tensor.name!r} has shape {list(tensor.shape)} ({len(tensor.shape)} dimensions) but "
                           f"the model takes {describe_tensor(spec)}: the first dimension is the sample count, -1 "
                           f"any size")
    for axis, (got, want) in enumerate(zip(tensor.shape, declared)):
        if want != -1 and got != want:
            raise PayloadError(f"input {tensor.name!r}: dimension {axis} is {got} but the model takes {want} there "
                               f"({describe_tensor(spec)})")
    if tensor.shape and tensor.shape[0] < 1:
        raise PayloadError(f"input {tensor.name!r} carries no samples (shape {list(tensor.shape)}); send at least one")


def validate(request: InferRequest, inputs: Sequence, outputs: Sequence) -> InferRequest:
    """Check a request against a model's declared tensors (objects with .name, .datatype, .shape
    and, optionally, .optional): known inputs, each required one present, datatypes and shapes as
    declared, one sample count across inputs, known requested outputs. Returns the request with
    its inputs in their declared datatypes; PayloadError (400) says what to send otherwise."""
    declared = {spec.name: spec for spec in inputs}
    listing = ", ".join(describe_tensor(s) for s in inputs)
    seen: set[str] = set()
    converted = []
    for tensor in request.inputs:
        if tensor.name in seen:
            raise PayloadError(f"input {tensor.name!r} is given twice; send each input once")
        seen.add(tensor.name)
        spec = declared.get(tensor.name)
        if spec is None:
            raise PayloadError(f"model {request.model_name!r} has no input {tensor.name!r}; its inputs are: {listing}")
        tensor = _as_declared(tensor, spec)
        _check_shape(tensor, spec)
        converted.append(tensor)
    missing = [s for s in inputs if s.name not in seen and not getattr(s, "optional", False)]
    if missing:
        raise PayloadError(f"missing input {', '.join(describe_tensor(s) for s in missing)} for model "
                           f"{request.model_name!r}; " + "; ".join(f"{s.name}: {s.description}" for s in missing
                                                                   if getattr(s, "description", "")))
    if not converted:
        raise PayloadError(f"the request has no inputs; model {request.model_name!r} takes one of: {listing}")
    counts = {t.name: t.samples for t in converted}
    if len(set(counts.values())) > 1:
        raise PayloadError(f"inputs disagree on the sample count (the first dimension): "
                           f"{', '.join(f'{k}={v}' for k, v in counts.items())}; give every input the same one")
    output_names = [spec.name for spec in outputs]
    for requested in request.outputs:
        if requested.name not in output_names:
            raise PayloadError(f"model {request.model_name!r} has no output {requested.name!r}; its outputs are: "
                               f"{', '.join(describe_tensor(s) for s in outputs)}")
    request.inputs = converted
    return request


def select_outputs(request: InferRequest, produced: list[Tensor]) -> list[Tensor]:
    """The outputs the request asked for, in its order; all of them when it named none."""
    if not request.outputs:
        return produced
    by_name = {t.name: t for t in produced}
    return [by_name[r.name] for r in request.outputs if r.name in by_name]
