"""Model name -> ModelSpec class. Configs and the CLI name models by these keys."""
from __future__ import annotations

import importlib

from .base import ModelSpec, SpecConfigError

# name -> "module:Class", imported on demand so naming a model never imports every family's libraries
SPECS = {
    "resnet50": "deployments.resnet50:ResNet50Spec",
    "vit_b_16": "deployments.vit_b_16:ViTB16Spec",
    "yolo11n_pose": "deployments.yolo11n_pose:YOLO11nPoseSpec",
    "llama_int4": "deployments.llama_int4:LlamaInt4Spec",
}


def model_names() -> list[str]:
    return sorted(SPECS)


def spec_class(name: str) -> type[ModelSpec]:
    if name not in SPECS:
        raise SpecConfigError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    module, cls = SPECS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_spec(name: str, weights_path: str | None = None, **options) -> ModelSpec:
    return spec_class(name)(weights_path=weights_path, **options)
