"""Images to the device as bytes, not floats.

A vision replica on a GPU is fed, not computed, into a corner: PIL decode + resize per image on
the CPU, and a batch of pageable fp32 crops crossing to the card, each run far below what the card
computes (docs/benchmarks.md §5, §16). So on the device pipeline the CPU part of decoding is a header check
(deployments/images.py `check_image_header`), and what crosses is the JPEG file itself (decoded on
the device in batches: nvJPEG through `torchvision.io.decode_jpeg(list, device="cuda")`) or, for
PNG/WebP, uint8 pixels packed into one pinned buffer and copied once, without blocking. Resizing,
cropping, letterboxing and normalising then run on the device, one call per distinct image size.

The JPEG decoder is a strategy (`JpegDecoder`): the same dispatch runs with nvJPEG on a card and
with libjpeg-turbo on the CPU, which is how the CPU tests check it. A JPEG that passes the header
check but that the decoder rejects fails only itself: the batch is retried one by one, a sample the
device decoder still rejects is decoded by PIL on the CPU, and one PIL cannot decode either becomes
that sample's PayloadError; its batch-mates are answered.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from wire import PayloadError

from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, check_image_header, decode_image

log = logging.getLogger("autobatch")

PIPELINES = ("auto", "host", "device")


def pipeline_for(option: str, device: str) -> str:
    """`image_pipeline` resolved for a device: auto decodes on the device where it is a GPU. The host
    pipeline (PIL decode and the weights' transforms per request, on the CPU) is the faster one on a
    CPU replica: there the 'device' is the same cores, and per-request work overlaps batching."""
    if option not in PIPELINES:
        raise ValueError(f"image_pipeline must be one of {', '.join(PIPELINES)}, got {option!r}")
    if option != "auto":
        return option
    return "device" if str(device).startswith("cuda") else "host"


def overlap_for(option, pipeline: str, device: str) -> bool:
    """`overlap` resolved: auto overlaps the device pipeline on a GPU (the JPEG engine and copies
    beside the compute units); true overlaps anywhere (on a CPU the stages share the cores, which
    tests use to run the two-stage path), false never."""
    if option in ("auto", None):
        return pipeline == "device" and str(device).startswith("cuda")
    if isinstance(option, bool):
        return option
    raise ValueError(f"overlap must be auto, true or false, got {option!r}")


@dataclass(frozen=True)
class ImageInput:
    """One image on its way to the device: its JPEG file bytes (decoded there, in a batch) or its
    pixels decoded on the CPU (uint8 [H, W, 3]; PNG and WebP). Height and width come from the
    header, so geometry (YOLO's letterbox gain) is known before any pixel is decoded."""

    height: int
    width: int
    jpeg: bytes | None = None
    pixels: Any = None

    def __post_init__(self):
        if (self.jpeg is None) == (self.pixels is None):
            raise ValueError("an ImageInput carries either jpeg bytes or pixels, not both or neither")


def host_pixels(payload: bytes, content_type: str | None = None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """PIL's full decode as a uint8 [H, W, 3] tensor (PayloadError for what PIL cannot decode)."""
    import numpy as np
    import torch

    image = decode_image(payload, content_type, max_bytes=max_bytes, max_pixels=max_pixels)
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def image_input(payload: bytes, content_type: str | None = None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInput:
    """The device pipeline's `decode`: a header check, then the JPEG as it came, or PNG/WebP pixels."""
    header = check_image_header(payload, content_type, max_bytes=max_bytes, max_pixels=max_pixels)
    if header.format == "JPEG":
        return ImageInput(header.height, header.width, jpeg=bytes(payload))
    pixels = host_pixels(payload, content_type, max_bytes=max_bytes, max_pixels=max_pixels)
    return ImageInput(int(pixels.shape[0]), int(pixels.shape[1]), pixels=pixels)


class JpegDecoder(Protocol):
    """Decodes JPEG files to RGB uint8 [3, H, W] tensors on its device, all or nothing: raises
    when any of them fails (as nvJPEG's batched decode does)."""

    device: str

    def decode(self, jpegs: Sequence[bytes]) -> list: ...


class TorchvisionJpegDecoder:
    """torchvision.io.decode_jpeg on a list: nvJPEG's batched decode on a CUDA device, libjpeg-turbo
    on the CPU."""

    def __init__(self, device: str):
        self.device = str(device)

    def decode(self, jpegs: Sequence[bytes]) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))


class PrepareStream:
    """Where a replica's `prepare` queues its device work: on a CUDA device a stream of its own, so
    that the next batch's copies and JPEG decode are not queued behind this batch's forward on the
    default stream and can run beside it; on a CPU nothing (the work is done when prepare returns).

        with stream.active():   # the calling thread's current stream, until the block ends
            ...                 # queue the copies, the decode, the transforms
        batch = DeviceBatch(tensor, errors, ready=stream.done_event())
    """

    def __init__(self, device: str):
        import torch

        self._stream = torch.cuda.Stream(device=device) if str(device).startswith("cuda") else None

    def active(self):
        import contextlib

        import torch

        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def done_event(self):
        """An event the forward's stream waits on before reading what was queued here (None on a CPU)."""
        import torch

        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event


@dataclass
class DeviceBatch:
    """A prepared batch: `tensor` holds the samples that decoded, in order ([n_ok, ...] on the
    device; None when none did); `errors` has, per sample, its PayloadError or None; `extra` what
    the forward needs per kept sample (YOLO's letterbox geometry). `ready` is the prepare stream's
    event; the forward waits on it (`wait_ready`) before it reads the tensor."""

    tensor: Any
    errors: list
    extra: list | None = None
    ready: Any = None

    def wait_ready(self) -> Any:
        """Make the calling thread's current stream wait for the prepare's work, and tell the
        caching allocator the tensor is in use there too (it was allocated on the prepare stream,
        which could otherwise reuse its memory for the next batch while this forward reads it)."""
        if self.ready is not None and self.tensor is not None:
            import torch

            current = torch.cuda.current_stream(self.tensor.device)
            current.wait_event(self.ready)
            self.tensor.record_stream(current)
        return self.tensor

    def answers(self, outputs: list) -> list:
        """The kept samples' outputs back in the request order, each failed sample's error in its place."""
        expected = sum(error is None for error in self.errors)
        if len(outputs) != expected:
            raise RuntimeError(f"{len(outputs)} outputs for {expected} prepared samples")
        kept = iter(outputs)
        return [error if error is not None else next(kept) for error in self.errors]


def _decoded_ok(tensor, image: ImageInput) -> bool:
    return tuple(tensor.shape) == (3, image.height, image.width)


def decode_jpegs_isolated(decoder: JpegDecoder, images: Sequence[ImageInput],
                          fallback: Callable[[ImageInput], Any]) -> list:
    """Each image's [3, H, W] uint8 tensor on the decoder's device, or its PayloadError, in order.

    The whole batch first (one call); when that raises, each image alone; an image the decoder
    still rejects, or decodes to a size its header did not say, goes to `fallback` (PIL on the CPU,
    then copied), whose PayloadError is that image's answer."""
    results: list = [None] * len(images)
    try:
        decoded = decoder.decode([image.jpeg for image in images])
        if len(decoded) == len(images):
            results = list(decoded)
    except Exception as exc:  # noqa: BLE001 - some JPEG of the batch is bad; find it below
        log.info("autobatch: batched JPEG decode of %d images failed (%s: %s); decoding them one by one",
                 len(images), type(exc).__name__, exc)
    for i, image in enumerate(images):
        if results[i] is not None and _decoded_ok(results[i], image):
            continue
        try:
            (results[i],) = decoder.decode([image.jpeg])
            if _decoded_ok(results[i], image):
                continue
        except Exception:  # noqa: BLE001 - the device decoder rejects it; the CPU may not
            pass
        try:
            results[i] = fallback(image)
        except PayloadError as exc:
            results[i] = exc
    return results


def pixels_to_device(pixels: Sequence, device: str, pin: bool | None = None) -> list:
    """uint8 [H, W, 3] CPU tensors -> [3, H, W] views on `device`: packed into one (pinned, for a
    GPU) buffer and copied in one non-blocking transfer. The caching host allocator keeps the
    pinned block until the copy that reads it has run, so a buffer per batch is safe."""
    import torch

    if not pixels:
        return []
    pin = str(device).startswith("cuda") if pin is None else pin
    sizes = [int(p.numel()) for p in pixels]
    staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    offset = 0
    for p, n in zip(pixels, sizes):
        staging[offset:offset + n].copy_(p.reshape(-1))
        offset += n
    on_device = staging.to(device, non_blocking=True)
    views, offset = [], 0
    for p, n in zip(pixels, sizes):
        views.append(on_device[offset:offset + n].view(p.shape).permute(2, 0, 1))
        offset += n
    return views


def images_to_device(images: Sequence[ImageInput], decoder: JpegDecoder) -> list:
    """Every image as [3, H, W] uint8 on the decoder's device, or its PayloadError, in order."""
    device = decoder.device
    results: list = [None] * len(images)
    jpeg_at = [i for i, image in enumerate(images) if image.jpeg is not None]
    host_at = [i for i, image in enumerate(images) if image.jpeg is None]
    for i, tensor in zip(host_at, pixels_to_device([images[i].pixels for i in host_at], device)):
        results[i] = tensor

    def on_cpu(image: ImageInput):
        return pixels_to_device([host_pixels(image.jpeg, "image/jpeg")], device)[0]

    if jpeg_at:
        for i, out in zip(jpeg_at, decode_jpegs_isolated(decoder, [images[i] for i in jpeg_at], on_cpu)):
            results[i] = out
    return results


def prepare_on_device(images: Sequence[ImageInput], decoder: JpegDecoder, stream: PrepareStream,
                      to_batch: Callable[[list], Any]) -> DeviceBatch:
    """A vision spec's `prepare`: on the prepare stream, every image put on the device (decoded
    there when it is a JPEG), `to_batch(images that decoded)` making the model's batch of them, and
    each image that did not decode its PayloadError in its place."""
    with stream.active():
        decoded = images_to_device(images, decoder)
        errors = [d if isinstance(d, PayloadError) else None for d in decoded]
        good = [d for d in decoded if not isinstance(d, PayloadError)]
        return DeviceBatch(to_batch(good) if good else None, errors, ready=stream.done_event())


def map_by_shape(images: Sequence, transform: Callable) -> list:
    """transform(uint8 or float [N, C, H, W] of one size) -> N outputs, applied once per distinct
    image size (a kernel launch per size, not per image); outputs come back in the input order."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: list = [None] * len(images)
    for indices in groups.values():
        for i, result in zip(indices, transform(torch.stack([images[i] for i in indices]))):
            out[i] = result
    return out


# ---------------------------------------------------------------- the classifiers' transform
def crop_extreme_aspect_tensor(image, max_aspect: int):
    """classifier.crop_extreme_aspect for a [3, H, W] tensor: the same centre crop, same pixels."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    short = min(width, height)
    if max(width, height) <= max_aspect * short:
        return image
    keep = max_aspect * short
    if width > height:
        left = (width - keep) // 2
        return image[..., :, left:left + keep]
    top = (height - keep) // 2
    return image[..., top:top + keep, :]


def classifier_batch(images: Sequence, *, resize_size: int, crop_size: int, mean, std, dtype, max_aspect: int):
    """torchvision's ImageClassification on the device: resize the short side (bilinear,
    antialiased, as PIL does), round to whole levels as PIL's uint8 output is, centre-crop,
    normalise; returns [N, 3, crop, crop] in `dtype`. Float32 until the end, so fp16 rounds once."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    def transform(group):
        x = F.resize(group.float(), [resize_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(x.round_().clamp_(0, 255), [crop_size, crop_size])

    crops = map_by_shape([crop_extreme_aspect_tensor(im, max_aspect) for im in images], transform)
    batch = torch.stack(crops).div_(255.0)
    mean_t = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t).to(dtype)


# ---------------------------------------------------------------- YOLO's letterbox
@dataclass(frozen=True)
class LetterboxGeometry:
    """Ultralytics' LetterBox arithmetic (center=True, auto=False, scaleup=True) for one image size."""

    new_w: int
    new_h: int
    gain: tuple[float, float]  # (x, y) letterboxed pixels per original pixel
    left: int
    top: int
    right: int
    bottom: int

    @classmethod
    def of(cls, height: int, width: int, size: int) -> "LetterboxGeometry":
        gain = min(size / height, size / width)
        new_w, new_h = min(max(int(round(width * gain)), 1), size), min(max(int(round(height * gain)), 1), size)
        dw, dh = (size - new_w) / 2, (size - new_h) / 2
        return cls(new_w, new_h, (new_w / width, new_h / height), int(round(dw - 0.1)), int(round(dh - 0.1)),
                   int(round(dw + 0.1)), int(round(dh + 0.1)))


def letterbox_batch(images: Sequence, size: int, pad_value: int, dtype):
    """[N, 3, size, size] in [0, 1] and `dtype`: each image resized like cv2.INTER_LINEAR (bilinear,
    half-pixel centres, no antialias), rounded to whole levels, centred on `pad_value` grey."""
    import torch
    import torch.nn.functional as nnf

    def transform(group):
        height, width = int(group.shape[-2]), int(group.shape[-1])
        g = LetterboxGeometry.of(height, width, size)
        x = group.float()
        if (g.new_h, g.new_w) != (height, width):
            x = nnf.interpolate(x, size=(g.new_h, g.new_w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        return nnf.pad(x, (g.left, g.right, g.top, g.bottom), value=float(pad_value))

    return torch.stack(map_by_shape(images, transform)).div_(255.0).to(dtype)
