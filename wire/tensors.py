"""Tensors of the Open Inference Protocol v2 as numpy arrays: data types, the JSON `data` forms
(row-major, flattened or nested), the binary form (Triton's binary tensor data extension:
little-endian, row-major, no padding; a BYTES element is a 4-byte little-endian length, then the
bytes) and gRPC's typed `contents`.

A BYTES tensor is a numpy object array of `bytes`. Every function that reads a client's tensor
raises PayloadError (status 400) naming the tensor, and the element index where one is at fault,
so a client learns what to send instead.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import DATATYPES, NUMPY_TYPES, PayloadError

# The wire's datatype table (wire/__init__.py) as numpy dtypes; BF16 has none.
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(kind) for name, kind in NUMPY_TYPES.items()}
_LENGTH = struct.Struct("<I")


@dataclass
class Tensor:
    """One named tensor of a request or a response. `parameters` are the tensor's own OIP
    parameters (binary_data_size, binary_data...)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        """The first dimension: the sample count (every spec's tensors start with it)."""
        return int(self.shape[0]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Its data's bytes; a BYTES tensor's elements by their lengths."""
        if self.data.dtype == object:
            return sum(len(e) for e in self.data.reshape(-1))
        return int(self.data.nbytes)


def element_count(shape) -> int:
    return math.prod(int(d) for d in shape)


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype naming a numpy array's dtype (an object array is BYTES)."""
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise ValueError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def check_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise PayloadError(f"input {name!r}: shape must be a list of whole numbers >= 0 (the first is the sample "
                           f"count), got {shape!r}")
    return tuple(int(d) for d in shape)


def check_datatype(name: str, datatype) -> str:
    if datatype not in DATATYPES:
        raise PayloadError(f"input {name!r}: datatype {datatype!r} is not an Open Inference Protocol type; "
                           f"use one of {', '.join(DATATYPES)}")
    if datatype == "BF16":
        raise PayloadError(f"input {name!r}: BF16 tensors are not read here; send FP16 or FP32")
    return datatype


# ----------------------------------------------------------------- BYTES elements
def serialize_bytes(elements) -> bytes:
    """BYTES elements (bytes or str) as the binary extension sends them: each a 4-byte
    little-endian length, then its bytes, in row-major order."""
    parts = []
    for element in elements:
        raw = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(name: str, buffer, count: int) -> np.ndarray:
    """`count` BYTES elements out of a length-prefixed buffer, as a flat object array."""
    view = memoryview(buffer)
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise PayloadError(f"input {name!r}: the binary data ends before element {index}'s 4-byte length "
                               f"({len(view)} bytes for {count} elements); each BYTES element is a 4-byte "
                               f"little-endian length followed by that many bytes")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise PayloadError(f"input {name!r}: element {index} says it is {length} bytes long but only "
                               f"{len(view) - offset} bytes are left; check the element's 4-byte length prefix")
        out[index] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise PayloadError(f"input {name!r}: {len(view) - offset} bytes are left over after the {count} elements "
                           f"its shape holds; send exactly one length-prefixed element per shape element")
    return out


# ----------------------------------------------------------------- binary form
def from_binary(name: str, datatype: str, shape: tuple[int, ...], buffer) -> np.ndarray:
    """A tensor out of its binary bytes (the body after the JSON header, or gRPC raw contents)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, buffer, count).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise PayloadError(f"input {name!r}: {len(buffer)} bytes of binary data, but shape {list(shape)} of "
                           f"{datatype} needs {count} x {dtype.itemsize} = {expected} bytes; send the tensor "
                           f"row-major, little-endian, without padding")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and array.size and (np.frombuffer(buffer, dtype=np.uint8) > 1).any():
        index = int(np.argmax(np.frombuffer(buffer, dtype=np.uint8) > 1))
        raise PayloadError(f"input {name!r}: element {index} is not a BOOL byte (0 or 1)")
    return array


def to_binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(np.asarray(array, dtype=object).reshape(-1))
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


# ----------------------------------------------------------------- JSON form
def _flatten(value, out: list) -> None:
    if isinstance(value, list):
        for item in value:
            _flatten(item, out)
    else:
        out.append(value)


def _nested_shape(value) -> tuple[int, ...] | None:
    """The shape of a nested list when it is regular (None for a ragged one)."""
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    inner = [_nested_shape(v) for v in value]
    if any(s is None or s != inner[0] for s in inner):
        return None
    return (len(value),) + inner[0]


def from_json(name: str, datatype: str, shape: tuple[int, ...], data) -> np.ndarray:
    """A tensor out of JSON `data`: flattened row-major, or nested in the tensor's own shape."""
    if not isinstance(data, list):
        raise PayloadError(f"input {name!r}: data must be a JSON array (flattened row-major, or nested as the "
                           f"shape), got {type(data).__name__}")
    count = element_count(shape)
    nested = _nested_shape(data)
    if nested is None:
        raise PayloadError(f"input {name!r}: data is nested unevenly (rows of different lengths); nest it as shape "
                           f"{list(shape)} or send it flattened")
    if len(nested) > 1 and nested != tuple(shape):
        raise PayloadError(f"input {name!r}: data is nested as {list(nested)} but the shape says {list(shape)}; "
                           f"nest it as the shape or send it flattened")
    flat: list = []
    _flatten(data, flat)
    if len(flat) != count:
        raise PayloadError(f"input {name!r}: data holds {len(flat)} elements but shape {list(shape)} needs {count}; "
                           f"make the shape and the data agree")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for index, element in enumerate(flat):
            if isinstance(element, str):
                out[index] = element.encode("utf-8")
            elif isinstance(element, (bytes, bytearray)):
                out[index] = bytes(element)
            else:
                raise PayloadError(f"input {name!r}: element {index} is a {type(element).__name__}; a BYTES element "
                                   f"in JSON is a string (send binary data for non-UTF-8 bytes such as images)")
        return out.reshape(shape)
    return np.asarray(_json_numbers(name, datatype, flat), dtype=NUMPY_DTYPES[datatype]).reshape(shape)


def _json_numbers(name: str, datatype: str, flat: list) -> list:
    dtype = NUMPY_DTYPES[datatype]
    for index, element in enumerate(flat):
        if datatype == "BOOL":
            ok = isinstance(element, bool)
        elif dtype.kind in "iu":
            ok = isinstance(element, int) and not isinstance(element, bool)
            if ok:
                info = np.iinfo(dtype)
                if not info.min <= element <= info.max:
                    raise PayloadError(f"input {name!r}: element {index} ({element}) is outside {datatype}'s "
                                       f"range {info.min}..{info.max}")
        else:
            ok = isinstance(element, (int, float)) and not isinstance(element, bool)
        if not ok:
            kind = "true or false" if datatype == "BOOL" else "a whole number" if dtype.kind in "iu" else "a number"
            raise PayloadError(f"input {name!r}: element {index} is {element!r}; a {datatype} element is {kind}")
    return flat


def to_json(datatype: str, array: np.ndarray) -> list:
    """A tensor's data as flattened row-major JSON; BYTES elements as UTF-8 strings."""
    flat = np.asarray(array).reshape(-1)
    if datatype == "BYTES":
        out = []
        for element in flat:
            raw = element.encode("utf-8") if isinstance(element, str) else bytes(element)
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise PayloadError(f"output holds bytes that are not UTF-8 and cannot go in JSON; request it with "
                                   f"the parameter binary_data: true") from None
        return out
    if datatype in ("FP16", "FP32", "FP64"):
        return [float(x) for x in flat.astype(np.float64)]
    return flat.tolist()


def http_tensor_entries(tensors, binary) -> tuple[list[dict], list[bytes]]:
    """Tensors as v2 HTTP/REST JSON entries, and the binary blobs that follow the JSON for those
    `binary(name)` says travel as binary data: one encoding for a client's inputs and a server's outputs."""
    entries, blobs = [], []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary(tensor.name):
            blob = to_binary(tensor.datatype, tensor.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_json(tensor.datatype, tensor.data)
        entries.append(entry)
    return entries, blobs


def http_body(header: bytes, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A v2 HTTP body and its headers: JSON alone, or JSON + blobs with Inference-Header-Content-Length."""
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}
