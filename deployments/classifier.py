"""Shared by the torchvision image classifiers (ResNet-50, ViT-B/16): the weights' own transforms
(resize, centre crop, normalise), a forward pass, top-k with scores."""
from __future__ import annotations

import os
from typing import Any, ClassVar

from .base import ModelSpec, SpecConfigError, TensorSpec, torch_dtype
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

    def __init__(self, weights_path: str | None = None, top_k: int = 5,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, **options: Any):
        super().__init__(weights_path, **options)
        if not 1 <= int(top_k) <= 1000:
            raise SpecConfigError(f"top_k must be between 1 and 1000, got {top_k}")
        if self.weights_path and not os.path.isfile(self.weights_path):
            raise SpecConfigError(f"weights file {self.weights_path!r} does not exist; give a local state_dict "
                                  f"(.pth) of {self.builder_name}, or omit it for synthetic weights")
        self.top_k = int(top_k)
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self._transform = None
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

    def input_signature(self) -> dict:
        return {"image": [3, self.crop_size, self.crop_size]}

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
        self.model = model.eval().to(device=device, dtype=torch_dtype(dtype))
        return self.model

    def example_batch(self, n: int) -> list:
        import torch

        generator = torch.Generator().manual_seed(n)
        return list(torch.randn(n, 3, self.crop_size, self.crop_size, generator=generator))

    def decode(self, payload: bytes, content_type: str | None = None):
        image = decode_image(payload, content_type, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        return self.transform(crop_extreme_aspect(image))

    def predict(self, samples: list) -> list:
        import torch

        with torch.inference_mode():
            batch = torch.stack(samples).to(self.device, dtype=torch_dtype(self.dtype_name), non_blocking=True)
            probabilities = torch.softmax(self.model(batch).float(), dim=-1).cpu()
        return top_k(probabilities, self.top_k, self.categories)

    def encode(self, output: list[dict]) -> dict:
        return {"model": self.name, "weights": "local" if self.weights_path else "synthetic", "top_k": output}

    # --- many samples per request (Open Inference Protocol tensors), on top of decode and encode
    def decode_tensors(self, inputs: dict, parameters: dict) -> list:
        from PIL import Image

        return image_tensor_samples(inputs, self.decode,
                                    lambda pixels: self.transform(crop_extreme_aspect(Image.fromarray(pixels, "RGB"))),
                                    self.max_image_pixels)

    def encode_tensors(self, encoded: list[dict]) -> dict:
        import numpy as np

        rows = [answer["top_k"] for answer in encoded]
        return {"scores": np.array([[c["score"] for c in row] for row in rows], dtype=np.float32).reshape(len(rows), -1),
                "class_ids": np.array([[c["class_id"] for c in row] for row in rows], dtype=np.int64).reshape(len(rows), -1)}
