"""The torchvision classifiers (ResNet-50, ViT-B/16): image decoding, the weights' transforms,
top-k, batch order, local checkpoints, and `autobatch tune vit_b_16 --device cpu` end to end.
(ResNet-50's CPU tune is exercised by tests/test_optimizer_cpu.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest
import torch

from deployments.base import PayloadError, SpecConfigError
from deployments.classifier import top_k
from deployments.registry import create_spec, model_names
from model_helpers import image_bytes, run_guarded_python, run_tune
from optimizer.tuning import Tuning

CLASSIFIERS = ["resnet50", "vit_b_16"]


def tuned(model: str, tmp_path, *args, **kwargs) -> tuple[Tuning, str, list[str]]:
    """`autobatch tune MODEL --json` (run_tune), its JSON read back as the Tuning it prints."""
    result, stderr, network = run_tune(model, tmp_path, *args, **kwargs)
    return Tuning.from_dict(result), stderr, network


def distinct_payloads() -> list[bytes]:
    return [image_bytes(fmt, size, seed=seed) for seed, (fmt, size) in
            enumerate([("JPEG", (320, 240)), ("PNG", (200, 300)), ("WEBP", (500, 120))])]


@pytest.fixture(scope="module")
def loaded():
    """Each classifier loaded once on the CPU, with a random head centred on these test images'
    features: a randomly initialised backbone gives features with a large common part (and
    torchvision zero-initialises ViT's head), so every input would otherwise score alike."""
    specs = {}
    for name in CLASSIFIERS:
        spec = create_spec(name, top_k=5)
        spec.load("cpu", "float32")
        head = spec.model.heads.head if name == "vit_b_16" else spec.model.fc
        seen = []
        hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            spec.model(torch.stack([spec.decode(p) for p in distinct_payloads()]))
            hook.remove()
            features = seen[0]
            torch.manual_seed(1)
            head.weight.normal_(0, 3.0 / (features.std(0).norm() + 1e-6))
            head.bias.copy_(-head.weight @ features.mean(0))
        specs[name] = spec
    return specs


def test_registry_names_the_classifiers():
    assert set(CLASSIFIERS) <= set(model_names())
    with pytest.raises(SpecConfigError, match="choose one of"):
        create_spec("resnet51")


def test_naming_and_signing_a_model_imports_no_heavy_library():
    """A cache hit must answer fast: constructing a spec and its signature import no torch, transformers or ultralytics."""
    code = ("import sys, time\nt = time.perf_counter()\nfrom deployments.registry import create_spec, model_names\n"
            "sigs = [create_spec(m).signature() for m in model_names()]\n"
            "print(time.perf_counter() - t, sorted(m for m in ('torch', 'transformers', 'ultralytics', 'bitsandbytes', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    _seconds, heavy = done.stdout.split(" ", 1)
    assert heavy.strip() == "[]"  # what makes it fast; the time itself is not asserted (shared machines)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_accepts_jpeg_png_webp_and_applies_the_weights_transforms(fmt):
    from PIL import Image
    import io

    spec = create_spec("vit_b_16")
    payload = image_bytes(fmt, (300, 200), seed=3)
    sample = spec.decode(payload, f"image/{fmt.lower()}")
    assert sample.shape == (3, 224, 224) and sample.dtype == torch.float32
    expected = spec.transform(Image.open(io.BytesIO(payload)).convert("RGB"))
    assert torch.equal(sample, expected)
    # normalised with ImageNet statistics: a plain [0, 1] image would never go negative
    assert sample.min() < 0


def test_decode_converts_greyscale_and_rgba():
    spec = create_spec("resnet50")
    for mode in ("L", "RGBA"):
        assert spec.decode(image_bytes("PNG", (64, 48), mode=mode)).shape == (3, 224, 224)


def _bad_payloads():
    jpeg = image_bytes("JPEG", (320, 240), seed=1)
    png = image_bytes("PNG", (320, 240), seed=1)
    return [
        ("empty", b"", 400, "empty request body"),
        ("text", b"this is not an image, it is a sentence", 415, "JPEG, PNG or WebP"),
        ("json", b'{"image": "cat.jpg"}', 415, "could not be decoded"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], 422, "truncated or corrupt"),
        ("truncated-png", png[: len(png) // 2], 422, "truncated or corrupt"),
        ("gif", image_bytes("GIF", (32, 32)), 415, "not accepted"),
    ]


@pytest.mark.parametrize("label,payload,status,message", _bad_payloads(), ids=[p[0] for p in _bad_payloads()])
def test_decode_rejects_bad_payloads_with_a_status_and_what_to_send(label, payload, status, message):
    spec = create_spec("resnet50")
    with pytest.raises(PayloadError, match=message) as err:
        spec.decode(payload)
    assert err.value.status == status


def test_decode_rejects_images_over_the_configured_size():
    payload = image_bytes("PNG", (400, 300))
    with pytest.raises(PayloadError, match="over the limit of 1000 bytes") as err:
        create_spec("vit_b_16", max_image_bytes=1000).decode(payload)
    assert err.value.status == 413
    with pytest.raises(PayloadError, match="400x300 pixels, over the limit") as err:
        create_spec("vit_b_16", max_image_pixels=100_000).decode(payload)
    assert err.value.status == 413


def test_very_elongated_images_decode_cheaply_to_what_the_transform_gives():
    import io

    from PIL import Image

    spec = create_spec("resnet50")
    payload = image_bytes("PNG", (600, 60), seed=4)
    full = spec.transform(Image.open(io.BytesIO(payload)).convert("RGB"))  # still affordable at 10:1
    assert torch.allclose(spec.decode(payload), full, atol=1e-5)
    sample = spec.decode(image_bytes("PNG", (30000, 1)))  # 30000x1: without the guard the resize alone wants ~23 GB
    assert sample.shape == (3, 224, 224)
    assert spec.decode(image_bytes("PNG", (1, 30000))).shape == (3, 224, 224)


def test_top_k_on_known_scores():
    probabilities = torch.tensor([[0.1, 0.6, 0.05, 0.25], [0.7, 0.1, 0.15, 0.05]])
    rows = top_k(probabilities, 3, ["cat", "dog", "fish", "bird"])
    assert [[item["class_id"] for item in row] for row in rows] == [[1, 3, 0], [0, 2, 1]]
    assert [item["label"] for item in rows[0]] == ["dog", "bird", "cat"]
    assert rows[1][0]["score"] == pytest.approx(0.7)
    # k larger than the number of classes: all classes, best first; no labels without categories
    rows = top_k(probabilities[:1], 10, None)
    assert [item["class_id"] for item in rows[0]] == [1, 3, 0, 2] and "label" not in rows[0][0]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_predict_one_output_per_input_in_order_for_every_batch_size(loaded, name):
    spec = loaded[name]
    samples = [spec.decode(p) for p in distinct_payloads()]
    alone = [spec.predict([s])[0] for s in samples]
    assert len({tuple(item["class_id"] for item in row) for row in alone}) > 1, "inputs should not all score alike"
    for n in range(1, len(samples) + 1):
        batched = spec.predict(samples[:n])
        assert len(batched) == n
        for got, want in zip(batched, alone[:n]):
            assert len(got) == 5
            assert [item["class_id"] for item in got] == [item["class_id"] for item in want]
            assert [item["score"] for item in got] == pytest.approx([item["score"] for item in want], abs=1e-4)
            assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))
    assert spec.encode(alone[0]) == {"model": name, "weights": "synthetic", "top_k": alone[0]}


def test_example_batch_is_the_preprocessed_worst_case(loaded):
    spec = loaded["vit_b_16"]
    batch = spec.example_batch(3)
    assert len(batch) == 3 and all(s.shape == (3, 224, 224) for s in batch)
    assert len(spec.predict(batch)) == 3


def test_local_checkpoint_is_loaded_and_brings_category_names(tmp_path, loaded):
    path = tmp_path / "resnet50.pth"
    torch.save(loaded["resnet50"].model.state_dict(), path)
    spec = create_spec("resnet50", str(path), top_k=3)
    assert spec.signature()["weights"] != "synthetic"
    spec.load("cpu", "float32")
    sample = spec.decode(image_bytes("JPEG", seed=7))
    out = spec.predict([sample])[0]
    assert out[0]["class_id"] == loaded["resnet50"].predict([sample])[0][0]["class_id"]
    assert isinstance(out[0]["label"], str) and out[0]["label"]  # ImageNet names come with real weights
    assert spec.encode(out)["weights"] == "local"


def test_missing_checkpoint_is_a_config_error():
    with pytest.raises(SpecConfigError, match="does not exist"):
        create_spec("vit_b_16", "/nonexistent/vit.pth")


def test_autobatch_tune_vit_b_16_on_cpu_end_to_end(tmp_path):
    result, stderr, network = tuned("vit_b_16", tmp_path, "--memory-budget-mb", "4096", "--max-batch", "4",
                                     "--latency-budget-ms", "30000", "--repeats", "1")
    assert network == []
    assert result.model == "vit_b_16" and result.cache == "miss" and result.dtype == "float32"
    assert 1 <= result.batch_size <= result.max_safe_batch <= 4
    assert result.probes[0].batch_size == 1 and result.probes[0].outcome == "ok"
    assert "random weights" in result.weights
    again, _, _ = tuned("vit_b_16", tmp_path, "--memory-budget-mb", "4096", "--max-batch", "4",
                         "--latency-budget-ms", "30000", "--repeats", "1")
    assert again.cache == "hit" and again.batch_size == result.batch_size


def test_the_network_guard_used_by_the_tune_tests_does_catch_network_access(tmp_path):
    code = ("import socket\nfor call in (lambda: socket.getaddrinfo('pypi.org', 443), lambda: socket.socket().connect(('1.1.1.1', 80))):\n"
            "    try:\n        call()\n    except OSError as e:\n        print('refused:', e)\n")
    out, attempts = run_guarded_python(tmp_path, code)
    assert out.count("refused:") == 2
    assert [a.split()[0] for a in attempts] == ["getaddrinfo", "connect"]
