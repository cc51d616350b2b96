"""The wire vocabulary every layer shares: the error a client can fix and the tensor datatypes.

The model families (deployments/), the server (serve/) and the clients (autobatch/client/) all
speak it, so it lives below all of them and imports nothing of ours (nor numpy: a spec module
that only raises PayloadError loads nothing more). Beside it, the Open Inference Protocol's wire
forms, which the server and the clients both read and write:
  tensors.py     datatypes as numpy arrays, the JSON and binary tensor forms
  request.py     a request and a response, independent of REST or gRPC
  grpc_codec.py  those to and from the gRPC messages (grpc_predict_v2_pb2*.py, generated from
                 grpc_predict_v2.proto by generate_grpc.py)
"""
from __future__ import annotations


class PayloadError(ValueError):
    """A request the client can fix. `status` becomes the HTTP status; the message says what to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


# The tensor data types of the Open Inference Protocol v2 (KServe inference_rest.md), plus Triton's BF16.
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES")
# Each datatype's numpy type, little-endian as the binary tensor extension fixes it; a BYTES tensor
# is an object array of bytes. BF16 has no numpy type: it is refused where it is read.
NUMPY_TYPES = {"BOOL": "bool", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
               "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
               "BYTES": "O"}

__all__ = ["PayloadError", "DATATYPES", "NUMPY_TYPES"]
