"""YOLO11n-pose: letterbox, NMS and rescaling on hand-made arrays and tensors (cross-checked with
ultralytics' own LetterBox and ops), image decoding, batch order with a live checkpoint, the
worst-case example batch, config errors, and `autobatch tune yolo11n_pose --device cpu`."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
import pytest
import torch

from deployments.base import PayloadError, SpecConfigError
from model_helpers import image_bytes, run_guarded_python, run_tune
from deployments.yolo11n_pose import (NUM_KEYPOINTS, PAD_VALUE, YOLO11nPoseSpec, letterbox, nms_pose, scale_boxes,
                                      scale_keypoints, ultralytics_offline)
from optimizer.tuning import Tuning

ultralytics_offline()


def tuned(model: str, tmp_path, *args, **kwargs) -> tuple[Tuning, str, list[str]]:
    """`autobatch tune MODEL --json` (run_tune), its JSON read back as the Tuning it prints."""
    result, stderr, network = run_tune(model, tmp_path, *args, **kwargs)
    return Tuning.from_dict(result), stderr, network


# ---------------------------------------------------------------- letterbox
@pytest.mark.parametrize("shape", [(200, 300), (300, 200), (640, 640), (100, 100), (1000, 37), (37, 1000), (481, 641)])
def test_letterbox_matches_ultralytics_letterbox(shape):
    from ultralytics.data.augment import LetterBox

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, gain, pad = letterbox(image, 640)
    theirs = LetterBox(new_shape=(640, 640), auto=False, scaleup=True, center=True)(image=image.copy())
    assert ours.shape == (640, 640, 3) and np.array_equal(ours, theirs)


def test_letterbox_geometry_on_a_known_case():
    image = np.full((200, 300, 3), 7, dtype=np.uint8)  # height 200, width 300
    boxed, (gain_x, gain_y), (left, top) = letterbox(image, 640)
    # width fills 640 (gain 640/300); height 200 * 2.133 = 426.67 -> 427 rows, 213 to share: 106 above, 107 below
    assert (left, top) == (0.0, 106.0)
    assert gain_x == pytest.approx(640 / 300) and gain_y == pytest.approx(427 / 200)
    assert (boxed[:106] == PAD_VALUE).all() and (boxed[106 + 427:] == PAD_VALUE).all()
    assert (boxed[106:106 + 427] == 7).all()


# ---------------------------------------------------------------- NMS
def _prediction(rows: list[tuple], num_classes: int = 1) -> torch.Tensor:
    """rows: (cx, cy, w, h, class scores..., keypoint seed) -> [4 + nc + 51, anchors] like the pose head emits."""
    columns = []
    for row in rows:
        box, scores, seed = row[:4], row[4:4 + num_classes], row[4 + num_classes]
        kpts = [[seed + k, seed + 100 + k, 0.5] for k in range(NUM_KEYPOINTS)]
        columns.append([*box, *scores, *np.ravel(kpts)])
    return torch.tensor(columns, dtype=torch.float32).T


def test_nms_keeps_the_best_of_overlapping_boxes_and_carries_their_keypoints():
    prediction = _prediction([
        (100, 100, 50, 50, 0.80, 1),   # a: kept
        (102, 101, 50, 50, 0.90, 2),   # b: overlaps a (IoU ~0.9), higher score -> kept, suppresses a
        (300, 300, 40, 80, 0.70, 3),   # c: alone -> kept
        (320, 300, 40, 80, 0.60, 4),   # d: overlaps c with IoU 1/3 < 0.7 -> kept
        (500, 500, 20, 20, 0.10, 5),   # e: under the confidence threshold -> dropped
    ])
    boxes, scores, classes, keypoints = nms_pose(prediction, 1, conf_threshold=0.25, iou_threshold=0.7)
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert boxes.tolist() == [[77, 76, 127, 126], [280, 260, 320, 340], [300, 260, 340, 340]]
    assert classes.tolist() == [0, 0, 0]
    assert keypoints.shape == (3, NUM_KEYPOINTS, 3)
    assert keypoints[:, 0, 0].tolist() == [2, 3, 4]  # each detection keeps its own anchor's keypoints
    assert keypoints[0, 16].tolist() == [2 + 16, 102 + 16, 0.5]
    # a stricter IoU threshold also removes d; max_det caps the count, best first
    _, scores, _, _ = nms_pose(prediction, 1, conf_threshold=0.25, iou_threshold=0.3)
    assert scores.tolist() == pytest.approx([0.9, 0.7])
    _, scores, _, _ = nms_pose(prediction, 1, conf_threshold=0.25, iou_threshold=0.7, max_det=1)
    assert scores.tolist() == pytest.approx([0.9])


def test_nms_is_class_aware_and_handles_no_candidates():
    prediction = _prediction([(100, 100, 50, 50, 0.9, 0.1, 1), (100, 100, 50, 50, 0.1, 0.8, 2)], num_classes=2)
    boxes, scores, classes, keypoints = nms_pose(prediction, 2, conf_threshold=0.25, iou_threshold=0.5)
    assert classes.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.8])  # same box, two classes
    boxes, scores, classes, keypoints = nms_pose(prediction, 2, conf_threshold=0.95)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and keypoints.shape == (0, NUM_KEYPOINTS, 3)


# ---------------------------------------------------------------- rescaling
def test_boxes_and_keypoints_map_back_to_original_pixels():
    from ultralytics.utils import ops

    orig = (200, 300)  # height, width
    _, gain, pad = letterbox(np.zeros((*orig, 3), dtype=np.uint8), 640)
    # points placed in the original image, pushed through the letterbox by hand
    original_boxes = torch.tensor([[10.0, 20.0, 110.0, 180.0], [250.0, 0.0, 300.0, 200.0]])
    boxed = original_boxes.clone()
    boxed[:, [0, 2]] = boxed[:, [0, 2]] * gain[0] + pad[0]
    boxed[:, [1, 3]] = boxed[:, [1, 3]] * gain[1] + pad[1]
    back = scale_boxes(boxed, gain, pad, orig)
    assert torch.allclose(back, original_boxes, atol=1e-4)
    assert torch.allclose(back, ops.scale_boxes((640, 640), boxed.clone(), orig), atol=1e-4)
    # off-image coordinates (in the padding) are clipped to the image
    clipped = scale_boxes(torch.tensor([[-5.0, 0.0, 700.0, 640.0]]), gain, pad, orig)
    assert clipped.tolist() == [[0.0, 0.0, 300.0, 200.0]]

    keypoints = torch.tensor([[[15.0, 30.0, 0.9], [299.0, 199.0, 0.2]]])
    boxed_kpts = keypoints.clone()
    boxed_kpts[..., 0] = boxed_kpts[..., 0] * gain[0] + pad[0]
    boxed_kpts[..., 1] = boxed_kpts[..., 1] * gain[1] + pad[1]
    back = scale_keypoints(boxed_kpts, gain, pad, orig)
    assert torch.allclose(back, keypoints, atol=1e-4)  # confidences untouched
    assert torch.allclose(back, ops.scale_coords((640, 640), boxed_kpts.clone(), orig), atol=1e-4)


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("PNG", "L"), ("PNG", "RGBA")])
def test_decode_letterboxes_and_remembers_the_original_size(fmt, mode):
    spec = YOLO11nPoseSpec()
    sample = spec.decode(image_bytes(fmt, (300, 200), seed=2, mode=mode))
    assert sample.image.shape == (3, 640, 640) and sample.image.dtype == torch.uint8
    assert sample.orig_size == (200, 300) and sample.pad == (0.0, 106.0)
    assert sample.gain[0] == pytest.approx(640 / 300)
    assert (sample.image[:, :106] == PAD_VALUE).all()


def test_decode_of_extreme_aspect_ratios_fits_the_square():
    spec = YOLO11nPoseSpec()
    for size in ((30000, 1), (1, 30000)):
        sample = spec.decode(image_bytes("PNG", size))
        assert sample.image.shape == (3, 640, 640) and sample.orig_size == (size[1], size[0])


@pytest.mark.parametrize("payload,status,message", [
    (b"", 400, "empty request body"),
    (b"GET / HTTP/1.1\r\n\r\n", 415, "JPEG, PNG or WebP"),
    (image_bytes("JPEG", (400, 300))[:1500], 422, "truncated or corrupt"),
    (image_bytes("PNG", (400, 300))[:-40], 422, "truncated or corrupt"),
], ids=["empty", "text", "truncated-jpeg", "truncated-png"])
def test_decode_rejects_bad_payloads(payload, status, message):
    with pytest.raises(PayloadError, match=message) as err:
        YOLO11nPoseSpec().decode(payload)
    assert err.value.status == status


def test_decode_rejects_oversize_images():
    with pytest.raises(PayloadError, match="over the limit") as err:
        YOLO11nPoseSpec(max_image_pixels=50_000).decode(image_bytes("PNG", (400, 300)))
    assert err.value.status == 413
    with pytest.raises(PayloadError, match="over the limit") as err:
        YOLO11nPoseSpec(max_image_bytes=500).decode(image_bytes("PNG", (400, 300)))
    assert err.value.status == 413


# ---------------------------------------------------------------- config
def test_config_errors_say_what_to_change(tmp_path):
    with pytest.raises(SpecConfigError, match="multiple of 32"):
        YOLO11nPoseSpec(imgsz=100)
    with pytest.raises(SpecConfigError, match="not an existing local .pt file"):
        YOLO11nPoseSpec("yolo11n-pose.pt")  # a bare asset name: would be a download, so refused
    assert not os.path.exists("yolo11n-pose.pt")
    path = tmp_path / "linear.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(SpecConfigError, match="not a 17-keypoint"):
        YOLO11nPoseSpec(str(path)).load("cpu", "float32")


# ---------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def live_checkpoint(tmp_path_factory):
    """A yolo11n-pose checkpoint whose random network is alive: batch-norm statistics calibrated on a
    few images (randomly initialised, its activations fade to ~0 and every anchor scores the same)
    and a class bias that yields a few dozen candidates, saved as an ultralytics-style .pt."""
    from ultralytics.nn.tasks import PoseModel, yaml_model_load

    architecture = yaml_model_load("yolo11n-pose.yaml")
    architecture["nc"] = 1
    torch.manual_seed(0)
    model = PoseModel(architecture, verbose=False)
    calibration = YOLO11nPoseSpec(imgsz=320)
    images = torch.stack([calibration.decode(image_bytes("PNG", (256, 192), seed=s)).image for s in range(4)]).float() / 255
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    model.train()
    with torch.no_grad():
        model(images)
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(-1.5)
    model.eval()
    model.names = {0: "person"}
    path = tmp_path_factory.mktemp("pose") / "pose-live.pt"
    torch.save({"model": model}, path)
    return str(path)


def test_predict_one_output_per_input_in_order_for_every_batch_size(live_checkpoint):
    spec = YOLO11nPoseSpec(live_checkpoint, imgsz=320)
    assert spec.signature()["weights"] != "synthetic"
    spec.load("cpu", "float32")
    sizes = [("JPEG", (320, 240)), ("PNG", (200, 300)), ("WEBP", (500, 120))]
    samples = [spec.decode(image_bytes(fmt, size, seed=seed)) for seed, (fmt, size) in enumerate(sizes)]
    alone = [spec.predict([s])[0] for s in samples]
    assert sum(len(a["boxes"]) > 0 for a in alone) >= 2, "the live checkpoint should find something"
    assert len({len(a["boxes"]) for a in alone}) > 1  # distinct inputs, distinct outputs
    for n in range(1, len(samples) + 1):
        batched = spec.predict(samples[:n])
        assert len(batched) == n
        for got, want in zip(batched, alone):
            assert got["image_size"] == want["image_size"]
            assert len(got["boxes"]) == len(want["boxes"])
            if got["boxes"]:
                # the same detections; two with near-equal scores may trade places, since a batch's
                # forward rounds differently from one image's
                got_rows = torch.cat([torch.tensor(got["boxes"]), torch.tensor(got["keypoints"]).flatten(1),
                                      torch.tensor(got["scores"])[:, None]], dim=1)
                want_rows = torch.cat([torch.tensor(want["boxes"]), torch.tensor(want["keypoints"]).flatten(1),
                                       torch.tensor(want["scores"])[:, None]], dim=1)
                nearest = torch.cdist(want_rows, got_rows, p=float("inf")).min(dim=1).values
                assert nearest.max() <= 0.05
                assert got["scores"] == pytest.approx(sorted(got["scores"], reverse=True))
    for (fmt, (width, height)), out in zip(sizes, alone):
        assert out["image_size"] == [width, height]
        assert len(out["boxes"]) == len(out["scores"]) == len(out["keypoints"]) == len(out["labels"])
        assert out["scores"] == sorted(out["scores"], reverse=True) and all(s > 0.25 for s in out["scores"])
        assert set(out["labels"]) <= {"person"}
        for box, kpts in zip(out["boxes"], out["keypoints"]):
            assert 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height
            assert len(kpts) == NUM_KEYPOINTS and all(len(k) == 3 for k in kpts)
            assert all(0 <= x <= width and 0 <= y <= height and 0 <= c <= 1 for x, y, c in kpts)
    encoded = spec.encode(alone[0])
    assert encoded["model"] == "yolo11n_pose" and encoded["weights"] == "local" and encoded["boxes"] == alone[0]["boxes"]


def test_synthetic_model_and_worst_case_example_batch():
    spec = YOLO11nPoseSpec()
    assert spec.input_signature()["image"] == [3, 640, 640]
    spec.load("cpu", "float32")
    assert spec.num_classes == 1 and spec.names == {0: "person"}
    batch = spec.example_batch(2)
    assert [tuple(s.image.shape) for s in batch] == [(3, 640, 640)] * 2  # the largest input the model takes
    out = spec.predict(batch)
    assert len(out) == 2 and all(set(o) >= {"boxes", "scores", "keypoints", "image_size"} for o in out)


def test_autobatch_tune_yolo11n_pose_on_cpu_end_to_end(tmp_path):
    result, stderr, network = tuned("yolo11n_pose", tmp_path, "--memory-budget-mb", "4096", "--max-batch", "4",
                                     "--latency-budget-ms", "30000", "--repeats", "1")
    assert network == [], f"network access attempted: {network}"
    assert result.model == "yolo11n_pose" and result.cache == "miss"
    assert 1 <= result.batch_size <= result.max_safe_batch <= 4
    assert all(p.outcome in ("ok", "over_latency", "over_memory", "oom", "predicted") for p in result.probes)
    assert result.probes[0].outcome == "ok"


def test_the_spec_keeps_ultralytics_offline_even_without_the_env_vars(tmp_path):
    """No YOLO_OFFLINE / HF_HUB_OFFLINE in the environment: import, build, predict and a bad payload
    (which ultralytics' PIL patch would answer with a pip install) still touch no network."""
    code = ("from deployments.registry import create_spec\n"
            "from deployments.base import PayloadError\n"
            "spec = create_spec('yolo11n_pose', imgsz=320)\nspec.load('cpu', 'float32')\n"
            "print(len(spec.predict(spec.example_batch(1))))\n"
            "try:\n    spec.decode(b'definitely not an image')\nexcept PayloadError as e:\n    print(e.status)\n")
    out, attempts = run_guarded_python(tmp_path, code, offline_env=False)
    assert out.split() == ["1", "415"]
    assert attempts == []
