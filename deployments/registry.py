"""Model name -> ModelSpec class. Configs, the CLI, the clients and the benchmarks name models by these keys.

Three sources, read on every call (so an installed plug-in or an environment set after import counts):
1. `BUILTIN_MODELS` below: the families that ship with autobatch;
2. the `autobatch.models` entry-point group: an installed package registers its own family without
   editing ours. In its pyproject.toml:
       [project.entry-points."autobatch.models"]
       my_model = "my_package.my_model:MyModelSpec"
3. $AUTOBATCH_MODELS: `name=module:Class` entries separated by commas, for a module that is on the
   PYTHONPATH but not packaged. Ray Serve replicas see it through the application's runtime_env:
       - name: my_model
         import_path: serve.app:build
         runtime_env: {env_vars: {AUTOBATCH_MODELS: "my_model=my_model:MyModelSpec", PYTHONPATH: "/srv/models"}}
         args: {model: my_model}
A name is registered once (the same target twice is fine); the class's `name` must equal it.
Entries are "module:Class" strings, imported on demand, so naming a model never imports every
family's libraries.
"""
from __future__ import annotations

import importlib
import os
import re
from importlib.metadata import entry_points

from .base import ModelSpec, SpecConfigError, check_wire_format

BUILTIN_MODELS = {
    "resnet50": "deployments.resnet50:ResNet50Spec",
    "vit_b_16": "deployments.vit_b_16:ViTB16Spec",
    "yolo11n_pose": "deployments.yolo11n_pose:YOLO11nPoseSpec",
    "llama_int4": "deployments.llama_int4:LlamaInt4Spec",
}
ENTRY_POINT_GROUP = "autobatch.models"
MODELS_ENV = "AUTOBATCH_MODELS"
# A model's name is also its Ray Serve application name, route and metric tag.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _env_entries(value: str) -> list[tuple[str, str]]:
    entries = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, target = (s.strip() for s in item.partition("="))
        if not _MODEL_NAME.fullmatch(name) or not _TARGET.fullmatch(target):
            raise SpecConfigError(f"${MODELS_ENV} entry {item!r} is not name=module:Class; "
                                  f"write e.g. {MODELS_ENV}=my_model=my_package.my_model:MyModelSpec")
        entries.append((name, target))
    return entries


def registered_models() -> dict[str, tuple[str, str]]:
    """name -> ("module:Class", where it was registered), from all three sources."""
    table = {name: (target, "built in") for name, target in BUILTIN_MODELS.items()}

    def add(name: str, target: str, source: str) -> None:
        if not _MODEL_NAME.fullmatch(name):
            raise SpecConfigError(f"model name {name!r} ({source}) must be letters, digits, '_', '.' or '-': "
                                  f"it becomes a route and an application name")
        if name in table and table[name][0] != target:
            raise SpecConfigError(f"model {name!r} is registered twice: {table[name][0]} ({table[name][1]}) and "
                                  f"{target} ({source}); give one of them another name")
        table.setdefault(name, (target, source))

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        add(ep.name, ep.value, f"entry point of {ep.dist.name if ep.dist else 'an installed package'}")
    for name, target in _env_entries(os.environ.get(MODELS_ENV, "")):
        add(name, target, f"${MODELS_ENV}")
    return table


def model_names() -> list[str]:
    return sorted(registered_models())


def spec_class(name: str) -> type[ModelSpec]:
    table = registered_models()
    if name not in table:
        raise SpecConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(table))} "
                              f"(others register through ${MODELS_ENV} or the {ENTRY_POINT_GROUP!r} entry points)")
    target, source = table[name]
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise SpecConfigError(f"model {name!r} is registered as {target} ({source}), but it cannot be imported "
                              f"({type(exc).__name__}: {exc}); put its module on the PYTHONPATH of every process "
                              f"that serves it, or install its package") from None
    if not (isinstance(cls, type) and issubclass(cls, ModelSpec)):
        raise SpecConfigError(f"model {name!r}: {target} ({source}) is not a ModelSpec subclass")
    if getattr(cls, "name", None) != name:
        raise SpecConfigError(f"model {name!r}: {target} ({source}) calls itself {getattr(cls, 'name', None)!r}; "
                              f"register it under its own `name`, or set name = {name!r}")
    return cls


def create_spec(name: str, weights_path: str | None = None, **options) -> ModelSpec:
    spec = spec_class(name)(weights_path=weights_path, **options)
    check_wire_format(spec)
    return spec
