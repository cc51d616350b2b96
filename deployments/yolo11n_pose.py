"""YOLO11n-pose (ultralytics): person boxes with 17 COCO keypoints (x, y, confidence).

decode: image bytes -> letterbox (aspect kept, grey 114 padding) to a square `imgsz` input,
remembering the original size, the scale and the padding. predict: one forward pass for the
batch, confidence filter + NMS per image, then boxes and keypoints mapped back to the original
image's pixels. The post-processing (`letterbox`, `nms_pose`, `scale_boxes`, `scale_keypoints`)
is plain tensor code so it can be checked on hand-made tensors.

On the device pipeline (`image_pipeline`, deployments/device_images.py) decode only reads the
header (the letterbox geometry follows from the size alone) and keeps the JPEG bytes; predict
decodes the batch on the device and letterboxes there with the same arithmetic.

Weights: a local `.pt` checkpoint when configured, else the real architecture built from
`yolo11n-pose.yaml` with random weights. Nothing here can make ultralytics download: the offline
environment is set before ultralytics is imported, only the packaged YAML or an existing local
file is ever named, and the checkpoint is read with torch.load, not ultralytics' downloader.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from wire import PayloadError

from .base import ModelSpec, SpecConfigError, TensorSpec, torch_dtype
from .pose_nms import nms_pose, nms_pose_batch, scale_boxes, scale_keypoints, xywh_to_xyxy  # noqa: F401 - also imported from here
from .device_images import (DeviceBatch, ImageInput, LetterboxGeometry, PrepareStream, TorchvisionJpegDecoder,
                            image_input, letterbox_batch, overlap_for, pipeline_for, prepare_on_device)
from .images import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, IMAGE_INPUTS, decode_image, example_jpeg,
                     image_tensor_samples)

ARCHITECTURE_YAML = "yolo11n-pose.yaml"  # packaged with ultralytics; the 'n' scale comes from the name
NUM_KEYPOINTS = 17
PAD_VALUE = 114
MAX_STRIDE = 32


def ultralytics_offline() -> None:
    """Make ultralytics unable to reach the network: no online check, no auto-install, no hub.

    Must run before `import ultralytics` (it checks connectivity at import unless YOLO_OFFLINE is set)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class PoseSample:
    """One decoded request: the letterboxed image and what is needed to map results back."""

    image: Any  # torch.uint8 tensor [3, imgsz, imgsz], RGB, letterboxed; or an ImageInput (device pipeline)
    orig_size: tuple[int, int]  # (height, width) of the image as sent
    gain: tuple[float, float]  # (x, y) letterboxed pixels per original pixel (each side is rounded)
    pad: tuple[float, float]  # (left, top) padding in letterboxed pixels
    # Tuning only: no confidence cut, so NMS sees max_candidates boxes and rescaling and encoding
    # run at max_det detections per image, the most post-processing a request can cause. Random
    # weights on random pixels detect nothing, which would tune for the cheapest case instead.
    worst_case: bool = False


# ---------------------------------------------------------------- pre- and post-processing
def letterbox(image, size: int):
    """Resize an HxWx3 uint8 array to fit a size x size square, aspect kept, centred on grey 114.

    Returns (square array, (gain_x, gain_y), (left, top)). Same arithmetic as ultralytics' LetterBox
    (center=True, auto=False, scaleup=True), so a checkpoint sees what it was trained on; the two
    gains differ slightly because each side is rounded to whole pixels (as ultralytics' scale_boxes
    accounts for)."""
    import cv2
    import numpy as np

    h, w = image.shape[:2]
    g = LetterboxGeometry.of(h, w, size)
    if (g.new_w, g.new_h) != (w, h):
        image = cv2.resize(image, (g.new_w, g.new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(image, g.top, g.bottom, g.left, g.right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    assert out.shape[:2] == (size, size), out.shape
    return np.ascontiguousarray(out), g.gain, (float(g.left), float(g.top))


# ---------------------------------------------------------------- the spec
class YOLO11nPoseSpec(ModelSpec):
    name: ClassVar[str] = "yolo11n_pose"
    usage: ClassVar[str] = ("POST one image (JPEG, PNG or WebP bytes); the answer is each detected person's box, "
                            "score and 17 COCO keypoints (x, y, confidence), in the image's own pixels")
    library_packages: ClassVar[tuple[str, ...]] = ("torch", "torchvision", "ultralytics", "opencv-python")
    default_latency_budget_s: ClassVar[float] = 0.5
    # On a CPU a batch takes what a GPU's dozens do: batch 1 of a vision model alone can take most of
    # the 0.5 s default, and a budget below it serves unbatched and refuses most clients
    # (docs/benchmarks.md §12, §16).
    default_latency_budget_s_by_device: ClassVar[dict[str, float]] = {"cpu": 4.0}
    # 2: on a GPU the next batch is prepared while this one computes, and the tuner times that overlap
    spec_version: ClassVar[int] = 2

    def __init__(self, weights_path: str | None = None, imgsz: int = 640, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.7, max_det: int = 300, max_candidates: int = 1000,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, image_pipeline: str = "auto",
                 overlap: str | bool = "auto",
                 tuning_image_size: tuple[int, int] | list[int] = (640, 480), **options: Any):
        super().__init__(weights_path, **options)
        pipeline_for(image_pipeline, "cpu")  # validates
        self.image_pipeline = image_pipeline
        try:
            overlap_for(overlap, "device", "cpu")
        except ValueError as exc:
            raise SpecConfigError(str(exc)) from None
        self.overlap = overlap  # prepare the next batch during this one's forward (overlap_for)
        # The JPEG (width, height) the device pipeline tunes with: decoding is part of what it times.
        self.tuning_image_size = (int(tuning_image_size[0]), int(tuning_image_size[1]))
        self.jpeg_decoder = None  # a JpegDecoder; load() sets torchvision's for the device unless one is given
        self._stream: PrepareStream | None = None  # the prepare stage's CUDA stream, made on first use
        try:
            imgsz = int(imgsz)
        except (TypeError, ValueError):
            raise SpecConfigError(f"imgsz must be a whole number of pixels, got {imgsz!r}") from None
        if imgsz < MAX_STRIDE or imgsz > 4096 or imgsz % MAX_STRIDE:
            raise SpecConfigError(f"imgsz must be a multiple of {MAX_STRIDE} between {MAX_STRIDE} and 4096, got {imgsz}; e.g. 640")
        if not 0 <= float(conf_threshold) <= 1 or not 0 <= float(iou_threshold) <= 1:
            raise SpecConfigError(f"conf_threshold and iou_threshold must be in [0, 1], got {conf_threshold}, {iou_threshold}")
        if int(max_det) < 1:
            raise SpecConfigError(f"max_det must be at least 1, got {max_det}")
        if self.weights_path and not (self.weights_path.endswith(".pt") and os.path.isfile(self.weights_path)):
            # A bare name such as 'yolo11n-pose.pt' is never handed to ultralytics: it would download it.
            raise SpecConfigError(f"weights path {self.weights_path!r} is not an existing local .pt file; give the path of "
                                  f"an ultralytics pose checkpoint on this machine, or omit it for synthetic weights")
        self.imgsz = imgsz
        self.conf_threshold = float(conf_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_det = int(max_det)
        # Boxes kept for NMS per image, best first (ultralytics' max_nms, 30000 there). NMS costs
        # O(candidates^2) on a CPU, so this bounds a request's worst-case post-processing: random
        # weights on a real photo put thousands of anchors over the threshold.
        self.max_candidates = int(max_candidates)
        if self.max_candidates < self.max_det:
            raise SpecConfigError(f"max_candidates ({max_candidates}) must be at least max_det ({max_det})")
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.names: dict[int, str] = {0: "person"}
        self.num_classes = 1

    @property
    def pipeline(self) -> str:
        """'device' or 'host' for the device this spec was loaded on."""
        return pipeline_for(self.image_pipeline, self.device)

    def input_signature(self) -> dict:
        return {"image": [3, self.imgsz, self.imgsz], "max_det": self.max_det, "max_candidates": self.max_candidates,
                "pipeline": self.image_pipeline, "overlap": self.overlap, "tuning_jpeg": list(self.tuning_image_size)}

    def inputs(self) -> tuple[TensorSpec, ...]:
        return IMAGE_INPUTS

    def outputs(self) -> tuple[TensorSpec, ...]:
        # One row per sample; detections padded to the most any sample of the request has (Triton's
        # usual layout for variable detections), so `count` says how many rows of each are real.
        padded = (f"padded with zeros to the largest detection count in the request (at least 1 row, at most {self.max_det}); "
                  f"the first count[i] rows of sample i are its detections, best score first")
        return (TensorSpec("boxes", "FP32", (-1, -1, 4), f"person boxes as x1, y1, x2, y2 in the image's pixels, {padded}"),
                TensorSpec("scores", "FP32", (-1, -1), f"each box's confidence in [0, 1], {padded}"),
                TensorSpec("keypoints", "FP32", (-1, -1, NUM_KEYPOINTS, 3),
                           f"per box the {NUM_KEYPOINTS} COCO keypoints as x, y (image pixels), confidence, {padded}"),
                TensorSpec("count", "INT64", (-1,), "detections per sample: how many rows of boxes, scores and keypoints are real"))

    @classmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        return example_jpeg(), "image/jpeg"

    # --- load
    def _build(self):
        ultralytics_offline()
        import torch
        from ultralytics.nn.modules.head import Pose
        from ultralytics.nn.tasks import PoseModel, yaml_model_load

        if self.weights_path:
            if not os.path.isfile(self.weights_path):
                raise SpecConfigError(f"weights file {self.weights_path!r} does not exist; give a local .pt file, or omit it")
            # A local file the operator configured; ultralytics checkpoints pickle their module classes.
            checkpoint = torch.load(self.weights_path, map_location="cpu", weights_only=False)
            model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else checkpoint
            if not isinstance(model, torch.nn.Module):
                raise SpecConfigError(f"{self.weights_path!r} holds no model (expected an ultralytics checkpoint with 'model')")
        else:
            architecture = yaml_model_load(ARCHITECTURE_YAML)  # packaged file; the name picks scale 'n'
            architecture["nc"] = 1  # the person-only head of yolo11n-pose.pt (set here: no override notice on stdout)
            model = PoseModel(architecture, verbose=False)
            model.names = {0: "person"}
        head = model.model[-1] if hasattr(model, "model") else None
        if not isinstance(head, Pose) or tuple(head.kpt_shape) != (NUM_KEYPOINTS, 3):
            raise SpecConfigError(f"{self.weights_path!r} is not a {NUM_KEYPOINTS}-keypoint (x, y, conf) pose model")
        if getattr(head, "end2end", False):
            raise SpecConfigError(f"{self.weights_path!r} has an end-to-end (NMS-free) head; this spec serves YOLO11-pose checkpoints")
        names = getattr(model, "names", None) or {}
        self.names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
        self.num_classes = int(head.nc)
        model = model.float().eval()
        return model.fuse(verbose=False) if hasattr(model, "fuse") else model

    def load(self, device: str, dtype: str):
        import torch

        model = self._build()
        for p in model.parameters():
            p.requires_grad_(False)
        self.device, self.dtype_name = device, dtype
        self._stream = None
        self.model = model.to(device=device, dtype=torch_dtype(dtype))
        if self.jpeg_decoder is None or self.jpeg_decoder.device != str(device):
            self.jpeg_decoder = TorchvisionJpegDecoder(device)
        with torch.inference_mode():  # builds the head's anchors once, outside any probe
            self.model(torch.zeros(1, 3, self.imgsz, self.imgsz, device=device, dtype=torch_dtype(dtype)))
        return self.model

    # --- samples
    def example_batch(self, n: int) -> list:
        """What `decode` hands to `predict`, at its most post-processing (worst_case): on the device
        pipeline a photo-like JPEG of `tuning_image_size` (its decode and letterbox are timed too),
        on the host pipeline letterboxed pixels."""
        import torch

        if self.pipeline == "device":
            width, height = self.tuning_image_size
            jpeg, g = example_jpeg((width, height)), LetterboxGeometry.of(height, width, self.imgsz)
            return [PoseSample(ImageInput(height, width, jpeg=jpeg), (height, width), g.gain, (float(g.left), float(g.top)),
                               worst_case=True) for _ in range(n)]
        generator = torch.Generator().manual_seed(n)
        images = torch.randint(0, 256, (n, 3, self.imgsz, self.imgsz), generator=generator, dtype=torch.uint8)
        return [PoseSample(image, (self.imgsz, self.imgsz), (1.0, 1.0), (0.0, 0.0), worst_case=True) for image in images]

    def decode(self, payload: bytes, content_type: str | None = None) -> PoseSample:
        import numpy as np
        import torch

        if self.pipeline == "device":
            image = image_input(payload, content_type, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
            g = LetterboxGeometry.of(image.height, image.width, self.imgsz)
            return PoseSample(image, (image.height, image.width), g.gain, (float(g.left), float(g.top)))
        image = decode_image(payload, content_type, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
            raise PayloadError(f"image has shape {array.shape}, expected height x width x 3; send an RGB image", 422)
        try:
            boxed, gain, pad = letterbox(array, self.imgsz)
        except Exception as exc:  # noqa: BLE001 - an image that decoded but cannot be resized is the client's to fix
            raise PayloadError(f"image of {array.shape[1]}x{array.shape[0]} pixels could not be resized "
                               f"({type(exc).__name__}); send an ordinary RGB JPEG, PNG or WebP", 422) from None
        tensor = torch.from_numpy(boxed).permute(2, 0, 1).contiguous()
        return PoseSample(tensor, (int(array.shape[0]), int(array.shape[1])), gain, pad)

    # --- batch
    def overlaps(self) -> bool:
        """On a GPU with the device pipeline: the next batch's copy, JPEG decode and letterbox run
        beside this batch's forward and NMS."""
        return overlap_for(self.overlap, self.pipeline, self.device)

    def predict(self, samples: list[PoseSample]) -> list[dict]:
        """One output per sample; on the device pipeline a sample whose JPEG no decoder could read
        gets its PayloadError in its place (serve answers it alone) and the rest are computed."""
        return self.forward(self.prepare(samples))

    def prepare(self, samples: list[PoseSample]) -> DeviceBatch:
        """The letterboxed batch on the device in the model's dtype, [0, 1]; `extra` holds the kept
        samples (their geometry maps detections back to the image as sent)."""
        import torch

        dtype = torch_dtype(self.dtype_name)
        with torch.inference_mode():
            if not isinstance(samples[0].image, ImageInput):
                batch = torch.stack([s.image for s in samples]).to(self.device, non_blocking=True)
                return DeviceBatch(batch.to(dtype).div_(255.0), [None] * len(samples), extra=list(samples))
            if self._stream is None:
                self._stream = PrepareStream(self.device)
            prepared = prepare_on_device([s.image for s in samples], self.jpeg_decoder, self._stream,
                                         lambda good: letterbox_batch(good, self.imgsz, PAD_VALUE, dtype))
            prepared.extra = [s for s, error in zip(samples, prepared.errors) if error is None]
            return prepared

    def forward(self, prepared: DeviceBatch) -> list[dict]:
        import torch

        with torch.inference_mode():
            batch = prepared.wait_ready()
            if batch is None:
                return prepared.answers([])
            raw = self.model(batch)
            raw = raw[0] if isinstance(raw, (tuple, list)) else raw
            kept = prepared.extra
            detections = nms_pose_batch(
                raw, self.num_classes, [-1.0 if s.worst_case else self.conf_threshold for s in kept],
                iou_threshold=self.iou_threshold, max_det=self.max_det, max_candidates=self.max_candidates)
        outputs = []
        for (boxes, scores, class_ids, keypoints), sample in zip(detections, kept):
            class_list = class_ids.tolist()
            outputs.append({
                "image_size": [sample.orig_size[1], sample.orig_size[0]],  # width, height
                "boxes": scale_boxes(boxes, sample.gain, sample.pad, sample.orig_size).tolist(),  # x1, y1, x2, y2
                "scores": scores.tolist(),
                "class_ids": class_list,
                "labels": [self.names.get(c, str(c)) for c in class_list],
                # per detection: 17 x [x, y, confidence], in the image's own pixels
                "keypoints": scale_keypoints(keypoints, sample.gain, sample.pad, sample.orig_size).tolist(),
            })
        return prepared.answers(outputs)

    def encode(self, output: dict) -> dict:
        return {"model": self.name, "weights": "local" if self.weights_path else "synthetic", **output}

    # --- many samples per request (Open Inference Protocol tensors), on top of decode and encode
    def decode_pixels(self, array) -> PoseSample:
        """An RGB uint8 array (height x width x 3) as decode makes it from an image's bytes."""
        import numpy as np
        import torch

        if self.pipeline == "device":  # the pixels go to the device as they are, letterboxed there
            g = LetterboxGeometry.of(int(array.shape[0]), int(array.shape[1]), self.imgsz)
            image = ImageInput(int(array.shape[0]), int(array.shape[1]), pixels=torch.from_numpy(np.ascontiguousarray(array)))
            return PoseSample(image, (image.height, image.width), g.gain, (float(g.left), float(g.top)))
        boxed, gain, pad = letterbox(array, self.imgsz)
        tensor = torch.from_numpy(boxed).permute(2, 0, 1).contiguous()
        return PoseSample(tensor, (int(array.shape[0]), int(array.shape[1])), gain, pad)

    def decode_tensors(self, inputs: dict, parameters: dict) -> list:
        return image_tensor_samples(inputs, self.decode, self.decode_pixels, self.max_image_pixels)

    def encode_tensors(self, encoded: list[dict]) -> dict:
        """Detections padded with zeros to the request's largest count (at least one row, so no
        tensor is empty); `count` says how many rows of each sample are real."""
        import numpy as np

        n, rows = len(encoded), max([1] + [len(answer["scores"]) for answer in encoded])
        boxes = np.zeros((n, rows, 4), np.float32)
        scores = np.zeros((n, rows), np.float32)
        keypoints = np.zeros((n, rows, NUM_KEYPOINTS, 3), np.float32)
        for i, answer in enumerate(encoded):
            k = len(answer["scores"])
            if k:
                boxes[i, :k], scores[i, :k] = answer["boxes"], answer["scores"]
                keypoints[i, :k] = answer["keypoints"]
        return {"boxes": boxes, "scores": scores, "keypoints": keypoints,
                "count": np.array([len(answer["scores"]) for answer in encoded], np.int64)}
