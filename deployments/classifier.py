"""Shared by the torchvision image classifiers (ResNet-50, ViT-B/16): the weights' own transforms
(resize, centre crop, normalise), a forward pass, top-k with scores.

Two pipelines (`image_pipeline`, deployments/device_images.py): "host" decodes and transforms each
request on the CPU and batches fp32 crops (a CPU replica's); "device" checks the header on the CPU,
batches the JPEG bytes (or uint8 pixels), and decodes, resizes and normalises on the device (a GPU
replica's). Both give the same crops within a level or two of 255 (tests/test_device_images.py)."""
from __future__ import annotations

import os
from typing import Any, ClassVar

from wire import PayloadError

from .base import ModelSpec, SpecConfigError, TensorSpec, torch_dtype
from .device_images import (DeviceBatch, ImageInput, PrepareStream, TorchvisionJpegDecoder, classifier_batch,
                            image_input, overlap_for, pipeline_for, prepare_on_device)
from .images import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, IMAGE_INPUTS, decode_image, example_jpeg,
                     image_tensor_samples)


def top_k(probabilities, k: int, categories: list[str] | None) -> list[list[dict]]:
    """Per row, the k most likely classes, best first: [{"class_id", "score", "label"?}]."""
    import torch

    k = min(k, probabilities.shape[-1])
    scores, indices = torch.topk(probabilities.float(), k, dim=-1)
    rows = []
    for score_row, index_row in zip(scores.tolist(), indices.tolist()):
        row = []
        for score, index in zip(score_row, index_row):
            item = {"class_id": int(index), "score": float(score)}
            if categories:
                item["label"] = categories[index]
            row.append(item)
        rows.append(row)
    return rows


MAX_ASPECT = 4  # the transform's centre crop never reaches past the middle 0.875 x short side of the long side


def crop_extreme_aspect(image):
    """Centre-crop the long side of a very elongated image to MAX_ASPECT x its short side.

    The weights' transform resizes the short side to ~256 first, so a small 40000x1 image would
    become 256 x 10 million pixels (tens of GB) before the centre crop: one request could take a
    replica down. The crop keeps every pixel the centre crop uses, so the output is unchanged."""
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


class TorchvisionClassifierSpec(ModelSpec):
    usage: ClassVar[str] = ("POST one image (JPEG, PNG or WebP bytes); the answer is its top-k classes, "
                            "best first, each with its class id and softmax score")
    library_packages: ClassVar[tuple[str, ...]] = ("torch", "torchvision")
    builder_name: ClassVar[str]  # torchvision.models.<builder_name>
    weights_enum: ClassVar[str]  # torchvision.models.<weights_enum>, for transforms and categories
    crop_size: ClassVar[int] = 224
    # On a CPU a batch takes what a GPU's dozens do: batch 1 of a vision model alone can take most of
    # the 0.5 s default, and a budget below it serves unbatched and refuses most clients
    # (docs/benchmarks.md §12, §16).
    default_latency_budget_s_by_device: ClassVar[dict[str, float]] = {"cpu": 4.0}
    # 2: on a GPU the next batch is prepared while this one computes, and the tuner times that overlap;
    # 3: a convolutional net runs channels-last on a GPU (memory_format), which the tuner measures
    spec_version: ClassVar[int] = 3
    # On a GPU a convolutional net's half-precision kernels want NHWC: in NCHW every convolution is
    # wrapped in two layout conversions (the profile in docs/benchmarks.md §16).
    channels_last_on_gpu: ClassVar[bool] = False

    def __init__(self, weights_path: str | None = None, top_k: int = 5,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, image_pipeline: str = "auto",
                 overlap: str | bool = "auto",
                 tuning_image_size: tuple[int, int] | list[int] = (640, 480), cuda_graphs: str | bool = "auto",
                 memory_format: str = "auto", **options: Any):
        super().__init__(weights_path, **options)
        if str(cuda_graphs).lower() not in ("auto", "true", "false", "on", "off"):
            raise SpecConfigError(f"cuda_graphs must be auto, true or false, got {cuda_graphs!r}")
        # auto: on a CUDA device the served batch sizes replay captured graphs (deployments/cuda_graphs.py)
        self.cuda_graphs = str(cuda_graphs).lower()
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise SpecConfigError(f"memory_format must be auto, channels_last or contiguous, got {memory_format!r}")
        self.memory_format = memory_format
        self.graphs = None  # a GraphedForward while graphs serve (set_serving_batch)
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
        if not 1 <= int(top_k) <= 1000:
            raise SpecConfigError(f"top_k must be between 1 and 1000, got {top_k}")
        if self.weights_path and not os.path.isfile(self.weights_path):
            raise SpecConfigError(f"weights file {self.weights_path!r} does not exist; give a local state_dict "
                                  f"(.pth) of {self.builder_name}, or omit it for synthetic weights")
        self.top_k = int(top_k)
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self._transform = None
        self._stream: PrepareStream | None = None  # the prepare stage's CUDA stream, made on first use
        self.categories: list[str] | None = None

    def _weights_meta(self):
        import torchvision.models as tvm

        return getattr(tvm, self.weights_enum).DEFAULT

    @property
    def transform(self):
        """The weights' own preprocessing; built on first use so naming a model stays cheap."""
        if self._transform is None:
            self._transform = self._weights_meta().transforms()
            assert int(self._transform.crop_size[0]) == self.crop_size
        return self._transform

    @property
    def pipeline(self) -> str:
        """'device' or 'host' for the device this spec was loaded on."""
        return pipeline_for(self.image_pipeline, self.device)

    def input_signature(self) -> dict:
        return {"image": [3, self.crop_size, self.crop_size], "pipeline": self.image_pipeline, "overlap": self.overlap,
                "tuning_jpeg": list(self.tuning_image_size), "memory_format": self.memory_format}

    def inputs(self) -> tuple[TensorSpec, ...]:
        return IMAGE_INPUTS

    def outputs(self) -> tuple[TensorSpec, ...]:
        k = self.top_k
        return (TensorSpec("scores", "FP32", (-1, k), f"per sample the {k} highest softmax scores, best first"),
                TensorSpec("class_ids", "INT64", (-1, k), f"per sample the class ids of `scores`, in the same order"))

    @classmethod
    def example_payload(cls, max_new_tokens: int | None = None) -> tuple[bytes, str]:
        return example_jpeg(), "image/jpeg"

    def load(self, device: str, dtype: str):
        import torch
        import torchvision.models as tvm

        model = getattr(tvm, self.builder_name)(weights=None)
        if self.weights_path:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
            # Category names only mean something when real (ImageNet) weights are loaded.
            self.categories = list(self._weights_meta().meta["categories"])
        self.device, self.dtype_name = device, dtype
        self._stream = None
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        self.model = model.eval().to(device=device, dtype=torch_dtype(dtype))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.jpeg_decoder is None or self.jpeg_decoder.device != str(device):
            self.jpeg_decoder = TorchvisionJpegDecoder(device)
        return self.model

    @property
    def channels_last(self) -> bool:
        """Whether the model and its batches are NHWC: asked for, or auto on a GPU for a convolutional net."""
        if self.memory_format == "auto":
            return self.channels_last_on_gpu and str(self.device).startswith("cuda")
        return self.memory_format == "channels_last"

    def set_serving_batch(self, max_batch_size: int | None):
        """On a CUDA device, capture the forward as graphs for batches up to the served size, so a batch
        costs the host one launch instead of one per operator; None lets them go before a measurement
        (the tuner times the eager forward, and the graphs' pool would count against its memory)."""
        from .cuda_graphs import GraphedForward, GraphReport, TorchCudaGraphs

        if max_batch_size is None or self.model is None:
            if self.graphs is not None:
                self.graphs.release()
                self.graphs = None
            return None
        if not str(self.device).startswith("cuda"):
            return GraphReport("off", f"the device is {self.device}, not CUDA")
        if self.cuda_graphs in ("false", "off"):
            return GraphReport("off", "the model's options set cuda_graphs: false")
        if self.graphs is not None and self.graphs.max_batch_size == max_batch_size and self.graphs.buckets:
            return self.graphs.report
        import torch

        if self.graphs is not None:
            self.graphs.release()
        self.graphs = GraphedForward(self.model, (3, self.crop_size, self.crop_size), torch_dtype(self.dtype_name),
                                     max_batch_size, TorchCudaGraphs(self.device),
                                     torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.inference_mode():
            report = self.graphs.capture()
        if report.state != "captured":
            self.graphs = None
        return report  # live: its replay counts grow as batches are served

    def example_batch(self, n: int) -> list:
        """What `decode` hands to `predict` on this pipeline: on the device pipeline n copies of a
        photo-like JPEG of `tuning_image_size` (decode, resize and transfer are timed with the
        forward); on the host pipeline the transformed crops (the CPU's decode runs per request)."""
        import torch

        if self.pipeline == "device":
            width, height = self.tuning_image_size
            jpeg = example_jpeg((width, height))
            return [ImageInput(height, width, jpeg=jpeg) for _ in range(n)]
        generator = torch.Generator().manual_seed(n)
        return list(torch.randn(n, 3, self.crop_size, self.crop_size, generator=generator))

    def decode(self, payload: bytes, content_type: str | None = None):
        if self.pipeline == "device":
            return image_input(payload, content_type, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        image = decode_image(payload, content_type, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        return self.transform(crop_extreme_aspect(image))

    def overlaps(self) -> bool:
        """On a GPU with the device pipeline: the next batch's copy and JPEG decode (nvJPEG's
        hardware engine) run beside this batch's forward."""
        return overlap_for(self.overlap, self.pipeline, self.device)

    def predict(self, samples: list) -> list:
        """One output per sample; on the device pipeline a sample whose JPEG no decoder could read
        gets its PayloadError in its place (serve answers it alone) and the rest are computed."""
        return self.forward(self.prepare(samples))

    def prepare(self, samples: list) -> DeviceBatch:
        """The batch on the device, normalised in the model's dtype: on the device pipeline the
        JPEG bytes (or pixels) decoded and transformed there, on the prepare stream; on the host
        pipeline the CPU's crops stacked and copied."""
        import torch

        dtype = torch_dtype(self.dtype_name)
        with torch.inference_mode():
            if not (samples and isinstance(samples[0], ImageInput)):
                return DeviceBatch(torch.stack(samples).to(self.device, dtype=dtype, non_blocking=True), [None] * len(samples))
            if self._stream is None:
                self._stream = PrepareStream(self.device)
            t = self.transform
            return prepare_on_device(samples, self.jpeg_decoder, self._stream, lambda good: classifier_batch(
                good, resize_size=int(t.resize_size[0]), crop_size=self.crop_size, mean=t.mean, std=t.std, dtype=dtype,
                max_aspect=MAX_ASPECT))

    def forward(self, prepared: DeviceBatch) -> list:
        import torch

        with torch.inference_mode():
            batch = prepared.wait_ready()
            if batch is None:
                return prepared.answers([])
            if self.graphs is not None:
                logits = self.graphs(batch)
            else:
                logits = self.model(batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch)
            probabilities = torch.softmax(logits.float(), dim=-1).cpu()
        return prepared.answers(top_k(probabilities, self.top_k, self.categories))

    def encode(self, output: list[dict]) -> dict:
        return {"model": self.name, "weights": "local" if self.weights_path else "synthetic", "top_k": output}

    # --- many samples per request (Open Inference Protocol tensors), on top of decode and encode
    def decode_tensors(self, inputs: dict, parameters: dict) -> list:
        return image_tensor_samples(inputs, self.decode, self.decode_pixels, self.max_image_pixels)

    def decode_pixels(self, pixels):
        """An RGB uint8 array (height x width x 3) as decode makes it from an image's bytes."""
        import numpy as np
        import torch
        from PIL import Image

        if self.pipeline == "device":  # the pixels go to the device as they are, transformed there
            return ImageInput(int(pixels.shape[0]), int(pixels.shape[1]), pixels=torch.from_numpy(np.ascontiguousarray(pixels)))
        return self.transform(crop_extreme_aspect(Image.fromarray(pixels, "RGB")))

    def encode_tensors(self, encoded: list[dict]) -> dict:
        import numpy as np

        rows = [answer["top_k"] for answer in encoded]
        return {"scores": np.array([[c["score"] for c in row] for row in rows], dtype=np.float32).reshape(len(rows), -1),
                "class_ids": np.array([[c["class_id"] for c in row] for row in rows], dtype=np.int64).reshape(len(rows), -1)}
