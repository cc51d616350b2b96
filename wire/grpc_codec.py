"""The gRPC wire of the Open Inference Protocol v2 (`inference.GRPCInferenceService`, kserve
`inference_grpc.md`): ModelInferRequest -> InferRequest, InferResponse -> ModelInferResponse
(outputs in `raw_output_contents`, as Triton answers), the metadata messages, and the gRPC status
for a PayloadError. Ray-free."""
from __future__ import annotations

import grpc
import numpy as np

from . import PayloadError
from . import grpc_predict_v2_pb2 as pb
from .request import InferRequest, InferResponse, RequestedOutput
from .tensors import NUMPY_DTYPES, Tensor, check_datatype, check_shape, element_count, from_binary, to_binary

# InferTensorContents field per datatype (FP16 and BF16 travel only as raw contents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# HTTP status of a PayloadError -> the gRPC code Triton uses for the same failure.
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
              405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
              503: grpc.StatusCode.UNAVAILABLE}


def grpc_code(status: int) -> grpc.StatusCode:
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def parameter_value(param: pb.InferParameter):
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def set_parameter(target, key: str, value) -> None:
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _typed_contents(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise PayloadError(f"input {name!r}: {datatype} tensors travel only as raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise PayloadError(f"input {name!r}: contents.{field} holds {len(values)} elements but shape {list(shape)} "
                           f"needs {count}; make the shape and the data agree")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = [bytes(v) for v in values]
        return out.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    array = np.asarray(values)
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        bad = np.flatnonzero((array < info.min) | (array > info.max))
        if len(bad):
            raise PayloadError(f"input {name!r}: element {int(bad[0])} ({array[bad[0]]}) is outside {datatype}'s "
                               f"range {info.min}..{info.max}")
    return array.astype(dtype).reshape(shape)


def request_from_proto(message: pb.ModelInferRequest, max_body_bytes: int | None = None) -> InferRequest:
    """A ModelInferRequest as an InferRequest: raw_input_contents (one per input, in order, as
    tritonclient sends them) or typed contents."""
    raw = list(message.raw_input_contents)
    if max_body_bytes is not None:
        total = sum(len(r) for r in raw)
        if total > max_body_bytes:
            raise PayloadError(f"the request carries {total} bytes of tensor data, over this server's limit of "
                               f"{max_body_bytes}; send fewer samples per request", status=413)
    if raw and len(raw) != len(message.inputs):
        raise PayloadError(f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs; send one "
                           f"per input, in the inputs' order, or none and typed contents")
    inputs = []
    for index, item in enumerate(message.inputs):
        datatype = check_datatype(item.name, item.datatype)
        shape = check_shape(item.name, list(item.shape))
        params = {k: parameter_value(v) for k, v in item.parameters.items()}
        if raw:
            if item.HasField("contents"):
                raise PayloadError(f"input {item.name!r} has contents but the request uses raw_input_contents; "
                                   f"use one form for every input")
            data = from_binary(item.name, datatype, shape, raw[index])
        else:
            data = _typed_contents(item.name, datatype, shape, item.contents)
        inputs.append(Tensor(item.name, datatype, shape, data, params))
    outputs = [RequestedOutput(o.name, None, {k: parameter_value(v) for k, v in o.parameters.items()})
               for o in message.outputs]
    return InferRequest(model_name=message.model_name, model_version=message.model_version, id=message.id,
                        parameters={k: parameter_value(v) for k, v in message.parameters.items()},
                        inputs=inputs, outputs=outputs)


def response_to_proto(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id)
    for key, value in response.parameters.items():
        set_parameter(message.parameters, key, value)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        message.raw_output_contents.append(to_binary(tensor.datatype, tensor.data))
    return message


def server_metadata_proto(doc: dict) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])


def model_metadata_proto(doc: dict) -> pb.ModelMetadataResponse:
    message = pb.ModelMetadataResponse(name=doc["name"], versions=doc.get("versions", []), platform=doc["platform"])
    for kind in ("inputs", "outputs"):
        for tensor in doc[kind]:
            getattr(message, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    message.properties.update(doc.get("properties", {}))
    return message


def request_to_proto(request: InferRequest) -> pb.ModelInferRequest:
    """The client side: an InferRequest as a ModelInferRequest with raw_input_contents."""
    message = pb.ModelInferRequest(model_name=request.model_name, model_version=request.model_version, id=request.id)
    for key, value in request.parameters.items():
        set_parameter(message.parameters, key, value)
    for tensor in request.inputs:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        message.raw_input_contents.append(to_binary(tensor.datatype, tensor.data))
    for requested in request.outputs:
        message.outputs.add(name=requested.name)
    return message


def response_from_proto(message: pb.ModelInferResponse) -> InferResponse:
    """The client side: a ModelInferResponse's raw outputs as numpy arrays."""
    raw = list(message.raw_output_contents)
    outputs = []
    for index, item in enumerate(message.outputs):
        shape = tuple(item.shape)
        data = (from_binary(item.name, item.datatype, shape, raw[index]) if raw
                else _typed_contents(item.name, item.datatype, shape, item.contents))
        outputs.append(Tensor(item.name, item.datatype, shape, data))
    return InferResponse(model_name=message.model_name, outputs=outputs, model_version=message.model_version,
                         id=message.id)
