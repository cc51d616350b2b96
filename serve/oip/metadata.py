"""The Open Inference Protocol's metadata and health documents, and which REST path asks for which.

Models here are unversioned: each serves one version, "1", which a client may name or leave out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata as _pkg
from typing import Sequence

from wire import PayloadError

SERVER_NAME = "autobatch"
EXTENSIONS = ("binary_tensor_data",)
MODEL_VERSION = "1"
# Eager PyTorch models. OIP's platform is "<project>_<format>" and informative only.
PLATFORM = "pytorch_eager"


def server_version() -> str:
    try:
        return _pkg.version("autobatch")
    except _pkg.PackageNotFoundError:
        return "0.1.0"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [int(d) for d in spec.shape]}


def model_metadata(name: str, inputs: Sequence, outputs: Sequence, properties: dict[str, str] | None = None) -> dict:
    """GET /v2/models/<name>: inputs and outputs as the spec declares them (-1: varies; the first
    dimension is the sample count). `properties`: free text (gRPC's map<string,string>), here each
    tensor's description, so a client learns what an element holds without reading our code."""
    doc = {"name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
           "inputs": [tensor_metadata(s) for s in inputs], "outputs": [tensor_metadata(s) for s in outputs]}
    props = dict(properties or {})
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for spec in tensors:
            text = getattr(spec, "description", "")
            if getattr(spec, "optional", False):
                text = f"optional; {text}" if text else "optional"
            if text:
                props[f"{kind}.{spec.name}"] = text
    if props:
        doc["properties"] = props
    return doc


def check_version(model: str, version: str | None) -> None:
    if version not in (None, "", MODEL_VERSION):
        raise PayloadError(f"model {model!r} has no version {version!r}; it serves version {MODEL_VERSION} "
                           f"(or leave the version out)", status=404)


@dataclass(frozen=True)
class Route:
    """What a /v2 path asks for: kind is one of server_metadata, live, ready, model_metadata,
    model_ready, infer."""

    kind: str
    model: str | None = None
    version: str | None = None


_MODEL_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?$")
_FIXED = {"/v2": "server_metadata", "/v2/health/live": "live", "/v2/health/ready": "ready"}


def match_route(method: str, path: str) -> Route:
    """The route of a /v2 request; PayloadError 404 (unknown path) or 405 (wrong method)
    says which paths exist."""
    path = "/" + path.strip("/")
    kind = _FIXED.get(path)
    model = version = None
    if kind is None:
        found = _MODEL_PATH.match(path)
        if found is None:
            raise PayloadError(f"no such path {path!r}; the Open Inference Protocol paths are GET /v2, "
                               f"/v2/health/live, /v2/health/ready, /v2/models/<model>[/versions/<v>][/ready] "
                               f"and POST /v2/models/<model>[/versions/<v>]/infer", status=404)
        model, version = found["model"], found["version"]
        kind = {"/ready": "model_ready", "/infer": "infer", None: "model_metadata"}[found["tail"]]
    wanted = "POST" if kind == "infer" else "GET"
    if method.upper() != wanted and not (wanted == "GET" and method.upper() == "HEAD"):
        raise PayloadError(f"{path} takes {wanted}, not {method}", status=405)
    return Route(kind, model, version)
