"""What every model family declares about its wire format (Open Inference Protocol v2 tensors, a usage
line, an example payload) and how families are registered (the built-in table, the
`autobatch.models` entry points, $AUTOBATCH_MODELS). No model is loaded: all of it is cheap."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deployments.base import DATATYPES, SpecConfigError, TensorSpec, check_wire_format
from deployments.registry import (BUILTIN_MODELS, ENTRY_POINT_GROUP, MODELS_ENV, create_spec, model_names,
                                  registered_models, spec_class)

FIFTH_DIR = Path(__file__).resolve().parent / "fifth_model"


@pytest.fixture(autouse=True)
def only_what_a_test_registers(monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)


@pytest.fixture
def tiny_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIFTH_DIR))


# ---------------------------------------------------------------- every registered model's declarations
@pytest.mark.parametrize("name", model_names())
def test_inputs_and_outputs_are_open_inference_protocol_tensors(name):
    spec = create_spec(name)  # create_spec checks the declarations; the asserts say what that means
    check_wire_format(spec)
    assert isinstance(spec.usage, str) and spec.usage.strip() and "\n" not in spec.usage
    for tensors in (spec.inputs(), spec.outputs()):
        assert tensors and len({t.name for t in tensors}) == len(tensors)
        for t in tensors:
            assert isinstance(t, TensorSpec) and t.datatype in DATATYPES
            assert t.shape[0] == -1 and all(d == -1 or d >= 1 for d in t.shape)  # samples first, then sizes or -1
            assert json.loads(json.dumps(t.metadata())) == {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            assert t.description.strip()
    assert any(not t.optional for t in spec.inputs()) or len(spec.inputs()) > 1  # a request can always say something


@pytest.mark.parametrize("name", model_names())
def test_the_example_payload_decodes_through_the_models_own_decode_into_what_tuning_runs(name):
    spec = create_spec(name)
    body, content_type = spec_class(name).example_payload()
    assert isinstance(body, bytes) and body and isinstance(content_type, str) and "/" in content_type
    sample = spec.decode(body, content_type)
    tuned = spec.example_batch(1)[0]
    assert type(sample) is type(tuned)  # the served path is the tuned path
    if spec.fixed_sample_shape:
        shape = lambda s: tuple(getattr(s, "image", s).shape)  # noqa: E731 - a PoseSample carries its tensor
        assert shape(sample) == shape(tuned)
    # a generation length asked for reaches the sample; models that generate nothing ignore it
    assert spec.decode(*spec_class(name).example_payload(max_new_tokens=3)) is not None


def test_the_declared_shapes_follow_the_deployments_options():
    assert [t.shape for t in create_spec("resnet50", top_k=3).outputs()] == [(-1, 3), (-1, 3)]
    assert [(t.name, t.datatype) for t in create_spec("vit_b_16").outputs()] == [("scores", "FP32"), ("class_ids", "INT64")]
    pose = {t.name: t for t in create_spec("yolo11n_pose", max_det=20).outputs()}
    assert pose["keypoints"].shape == (-1, -1, 17, 3) and pose["count"].datatype == "INT64"
    assert "at most 20" in pose["boxes"].description and "padded" in pose["scores"].description
    llama = create_spec("llama_int4", max_new_tokens=12, default_new_tokens=5)
    inputs = {t.name: t for t in llama.inputs()}
    assert inputs["text_input"].datatype == "BYTES" and not inputs["text_input"].optional
    assert inputs["max_tokens"].optional and "1..12" in inputs["max_tokens"].description
    assert llama.decode(*llama.example_payload(max_new_tokens=7)).max_new_tokens == 7
    assert llama.decode(*llama.example_payload()).max_new_tokens == 5  # left out: the deployment's default


# ---------------------------------------------------------------- TensorSpec checks itself
@pytest.mark.parametrize("kwargs, message", [
    (dict(datatype="FLOAT32"), "not an Open Inference Protocol type; use one of BOOL"),
    (dict(shape=(4, 3)), "must start with -1, the sample count"),
    (dict(shape=()), "must start with -1"),
    (dict(shape=(-1, 0)), "only positive sizes and -1"),
    (dict(shape=(-1, True)), "only positive sizes and -1"),
    (dict(name="2d-points"), "letters, digits and underscores"),
    (dict(description=" "), "give a description"),
])
def test_a_malformed_tensor_says_what_to_fix(kwargs, message):
    fields = dict(name="points", datatype="FP32", shape=(-1, 2), description="x, y per sample") | kwargs
    with pytest.raises(SpecConfigError, match=message):
        TensorSpec(**fields)


def test_a_tensor_is_frozen_and_hashable():
    t = TensorSpec("points", "FP32", [-1, 2], "x, y per sample")
    assert t.shape == (-1, 2) and hash(t) == hash(TensorSpec("points", "FP32", (-1, 2), "x, y per sample"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.shape = (-1,)


def test_a_spec_without_usage_or_with_a_tensor_named_twice_is_refused(tiny_on_path):
    from tiny_mlp import TinyMLPSpec

    class NoUsage(TinyMLPSpec):
        usage = ""

    class Twice(TinyMLPSpec):
        def outputs(self):
            return super().outputs() + super().outputs()[:1]

    with pytest.raises(SpecConfigError, match="sets no `usage`"):
        check_wire_format(NoUsage())
    with pytest.raises(SpecConfigError, match="names a tensor twice"):
        check_wire_format(Twice())


# ---------------------------------------------------------------- registration
def test_the_built_in_families_are_registered_and_nothing_else_here():
    assert model_names() == sorted(BUILTIN_MODELS)
    assert all(source == "built in" for _, source in registered_models().values())
    with pytest.raises(SpecConfigError, match=f"choose one of: llama_int4, resnet50.*{MODELS_ENV}"):
        spec_class("resnet51")


def test_a_family_registers_through_the_environment(tiny_on_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, " tiny_mlp = tiny_mlp:TinyMLPSpec , ")
    assert model_names() == sorted([*BUILTIN_MODELS, "tiny_mlp"])
    assert registered_models()["tiny_mlp"] == ("tiny_mlp:TinyMLPSpec", f"${MODELS_ENV}")
    assert create_spec("tiny_mlp").name == "tiny_mlp"


def test_a_family_registers_through_an_installed_packages_entry_point(tiny_on_path, monkeypatch, tmp_path):
    """An installed distribution is a *.dist-info folder on sys.path; this one declares only the entry point."""
    info = tmp_path / "tiny_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntiny_mlp = tiny_mlp:TinyMLPSpec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny_mlp" in model_names()
    assert registered_models()["tiny_mlp"] == ("tiny_mlp:TinyMLPSpec", "entry point of tiny-family")
    assert type(create_spec("tiny_mlp")).__name__ == "TinyMLPSpec"
    monkeypatch.setenv(MODELS_ENV, "tiny_mlp=tiny_mlp:TinyMLPSpec")  # the same target twice is one model
    assert model_names().count("tiny_mlp") == 1


@pytest.mark.parametrize("value, message", [
    ("tiny_mlp", "is not name=module:Class"),
    ("tiny_mlp=tiny_mlp", "is not name=module:Class"),
    ("tiny mlp=tiny_mlp:TinyMLPSpec", "is not name=module:Class"),
    ("resnet50=tiny_mlp:TinyMLPSpec", "'resnet50' is registered twice: deployments.resnet50:ResNet50Spec \\(built in\\)"),
])
def test_a_bad_registration_says_what_to_write(tiny_on_path, monkeypatch, value, message):
    monkeypatch.setenv(MODELS_ENV, value)
    with pytest.raises(SpecConfigError, match=message):
        model_names()


@pytest.mark.parametrize("value, message", [
    ("mlp=tiny_mlp:TinyMLPSpec", "calls itself 'tiny_mlp'; register it under its own `name`"),
    ("tiny_mlp=not_a_module_here:TinyMLPSpec", "cannot be imported \\(ModuleNotFoundError.*PYTHONPATH"),
    ("tiny_mlp=tiny_mlp:NoSuchSpec", "cannot be imported \\(AttributeError"),
    ("tiny_mlp=json:JSONDecoder", "is not a ModelSpec subclass"),
])
def test_a_registration_that_cannot_be_served_fails_when_named(tiny_on_path, monkeypatch, value, message):
    monkeypatch.setenv(MODELS_ENV, value)
    name = value.split("=")[0]
    assert name in model_names()  # listing stays cheap: nothing is imported until the model is named
    with pytest.raises(SpecConfigError, match=message):
        spec_class(name)
