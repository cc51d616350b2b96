"""Image payloads: bytes in, a validated RGB PIL image out, or a PayloadError that says what to send."""
from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from wire import PayloadError

from .base import TensorSpec, decode_each


def _pillow_open():
    """Pillow's own Image.open, even when a library has replaced it.

    Importing ultralytics monkey-patches PIL.Image.open process-wide: on bytes Pillow cannot
    identify it calls check_requirements("pi-heif"), which pip-installs a package (network, seconds)
    unless YOLO_AUTOINSTALL=False, and otherwise raises ModuleNotFoundError. A request body must
    never trigger either, so decoding uses the original function."""
    opener = Image.open
    if getattr(opener, "__module__", None) != Image.__name__:
        opener = getattr(sys.modules.get(opener.__module__), "_image_open", opener)
    return opener


_PIL_OPEN = _pillow_open()

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
# Per image, checked from its header before a pixel is decoded (413 past either): room for a phone
# photo as phones save them (12-24 MP, 3-8 MB); a full-resolution 48 MP one is over it (send it
# downscaled, or raise the model option max_image_pixels). One decode at the limit holds 40 M x 3
# bytes of RGB (120 MB) in a decode thread, which a replica's memory share affords. README, "Limits".
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

# The inputs of every image model here: one image per sample, encoded or as pixels.
IMAGE_INPUTS = (
    TensorSpec("images", "BYTES", (-1,), "one encoded image per sample: JPEG, PNG or WebP file bytes; "
               "send this or `pixels`", optional=True),
    TensorSpec("pixels", "UINT8", (-1, -1, -1, 3), "decoded images as height x width x RGB, one per "
               "sample, every sample of a request the same size; send this or `images`", optional=True),
)


def _describe(payload: bytes, content_type: str | None) -> str:
    kind = content_type or "unknown content type"
    return f"{len(payload)} bytes of {kind}"


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels (PIL opens lazily)."""

    format: str  # JPEG, PNG or WEBP
    width: int
    height: int


def _payload_error(exc: Exception, payload: bytes, content_type: str | None) -> PayloadError:
    if isinstance(exc, UnidentifiedImageError):
        return PayloadError(f"image could not be decoded (got {_describe(payload, content_type)}); "
                            f"send JPEG, PNG or WebP bytes", 415)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return PayloadError(f"image is too large to decode safely ({exc}); send a smaller image", 413)
    # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError...
    return PayloadError(f"image is truncated or corrupt ({type(exc).__name__}: {exc}; got {_describe(payload, content_type)}); "
                        f"send a complete JPEG, PNG or WebP file", 422)


def _open_checked(payload: bytes, content_type: str | None, max_bytes: int, max_pixels: int) -> Image.Image:
    """The lazily opened image after the cheap checks (size, format, pixel count); pixels not read."""
    if not payload:
        raise PayloadError("empty request body; send the image as JPEG, PNG or WebP bytes", 400)
    if len(payload) > max_bytes:
        raise PayloadError(
            f"image is {len(payload)} bytes, over the limit of {max_bytes} bytes; send a smaller image", 413
        )
    image = _PIL_OPEN(io.BytesIO(payload))
    fmt = image.format
    if fmt not in ACCEPTED_FORMATS:
        raise PayloadError(
            f"image format {fmt} is not accepted ({_describe(payload, content_type)}); send JPEG, PNG or WebP bytes",
            415,
        )
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadError(
            f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels; send a smaller image",
            413,
        )
    return image


# The start-of-frame markers that carry a JPEG's size (not DHT C4, JPG C8, DAC CC)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) of an ordinary JPEG read from its markers, as PIL's open reads them (its
    segments up to the start of scan), in a few microseconds where PIL's open takes ~25 (the
    per-sample host cost of a GPU replica, docs/benchmarks.md); None for anything unusual (no SOF
    before the scan, a segment past the end, not 8 bits, not 1, 3 or 4 components, a multi-picture
    file PIL names MPO), which PIL then reads and answers as it always did."""
    if payload[:3] != b"\xff\xd8\xff":
        return None
    n, i, size = len(payload), 2, None
    while i + 4 <= n:
        if payload[i] != 0xFF:
            return None
        marker = payload[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        length = (payload[i + 2] << 8) | payload[i + 3]
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01 or length < 2 or i + 2 + length > n:
            return None
        if marker == 0xDA:  # start of scan: the header ends here
            return size
        if marker in _JPEG_SOF:
            if size is not None or length < 8:
                return None
            precision, components = payload[i + 4], payload[i + 9]
            height, width = (payload[i + 5] << 8) | payload[i + 6], (payload[i + 7] << 8) | payload[i + 8]
            if precision != 8 or components not in (1, 3, 4) or not width or not height:
                return None
            size = (width, height)
        elif marker == 0xE2 and payload[i + 4:i + 8] == b"MPF\x00":
            return None
        i += 2 + length
    return None


def check_image_header(
    payload: bytes,
    content_type: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageHeader:
    """The CPU part of decoding for a replica that decodes on its device: reject what is not an
    accepted image of an accepted size here, so a bad payload gets its own 4xx before batching.
    Reads only the header (microseconds); a JPEG whose body is corrupt passes and is caught by the
    batch decoder, which fails that sample alone (deployments/device_images.py)."""
    size = jpeg_size(payload) if payload and len(payload) <= max_bytes else None
    bomb = Image.MAX_IMAGE_PIXELS
    if size is not None and size[0] * size[1] <= max_pixels and (bomb is None or size[0] * size[1] <= bomb):
        return ImageHeader("JPEG", size[0], size[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_checked(payload, content_type, max_bytes, max_pixels)
            return ImageHeader(image.format, image.size[0], image.size[1])
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the header parser raises is the payload's fault
        raise _payload_error(exc, payload, content_type) from None


def decode_image(
    payload: bytes,
    content_type: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """The whole decode on the CPU: a validated RGB PIL image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_checked(payload, content_type, max_bytes, max_pixels)
            image.load()
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _payload_error(exc, payload, content_type) from None
    return image.convert("RGB")


def example_jpeg(size: tuple[int, int] = (640, 480), seed: int = 0) -> bytes:
    """A real JPEG made in code: gradients plus noise, so it compresses like a photo, not like a
    flat colour. 640x480 by default, the size `autobatch bench` has always sent."""
    import numpy as np

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    pixels = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), (x + y) % 256], -1).astype(np.uint8)
    pixels = np.clip(pixels.astype(int) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_tensor_samples(inputs: dict, decode_bytes, decode_pixels, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list:
    """A request's IMAGE_INPUTS -> per sample the decoded sample or its PayloadError (see
    ModelSpec.decode_tensors): `images` elements go to decode_bytes(bytes), `pixels` rows (height x
    width x 3, uint8) to decode_pixels(array) after the same pixel limit the encoded path keeps."""
    if "images" in inputs and "pixels" in inputs:
        raise PayloadError("the request sends both `images` and `pixels`; send the images one way: encoded "
                           "(`images`, BYTES) or decoded (`pixels`, UINT8 [N, height, width, 3])")
    if "images" in inputs:
        return decode_each(lambda element: decode_bytes(bytes(element)), inputs["images"])
    if "pixels" not in inputs:
        raise PayloadError("missing input: send `images` (BYTES [N], one JPEG, PNG or WebP file per sample) or "
                           "`pixels` (UINT8 [N, height, width, 3], RGB)")

    def one(pixels):
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        if width * height > max_pixels:
            raise PayloadError(f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels; "
                               f"send a smaller image", 413)
        return decode_pixels(pixels)

    return decode_each(one, inputs["pixels"])
