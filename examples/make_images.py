"""Write the example images README.md's commands send: examples/cat.jpg, dog.png and people.jpg.

    python examples/make_images.py            # (re)write them next to this file
    python examples/make_images.py --out DIR  # somewhere else

They are drawn in code (gradients, shapes, a little noise), small, and shipped in the repository so
the README's examples run on a fresh clone. The served models run synthetic weights (nothing is
downloaded), so what the pictures show does not change the answers' meaning: the names only say
which route each is meant for (a classifier, the pose detector). Needs only Pillow and NumPy.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def _canvas(size: tuple[int, int], seed: int, noise: int = 12) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 200 // w + 30, y * 180 // h + 40, (x + y) * 120 // (w + h) + 60], -1)
    if noise:
        pixels = pixels + rng.integers(-noise, noise, pixels.shape)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def cat(size=(320, 240)) -> Image.Image:
    img = _canvas(size, 1)
    d = ImageDraw.Draw(img)
    d.ellipse((90, 70, 230, 200), fill=(200, 140, 60))  # head
    d.polygon([(100, 95), (120, 30), (150, 80)], fill=(190, 130, 50))  # ears
    d.polygon([(170, 80), (200, 30), (220, 95)], fill=(190, 130, 50))
    d.ellipse((125, 115, 145, 135), fill=(30, 90, 30))
    d.ellipse((175, 115, 195, 135), fill=(30, 90, 30))
    return img


def dog(size=(240, 180)) -> Image.Image:
    img = _canvas(size, 2, noise=0)  # no noise: a PNG of noise is large
    d = ImageDraw.Draw(img)
    d.ellipse((60, 40, 180, 160), fill=(120, 80, 40))
    d.ellipse((40, 50, 80, 130), fill=(80, 50, 20))  # ears
    d.ellipse((160, 50, 200, 130), fill=(80, 50, 20))
    d.ellipse((105, 100, 135, 125), fill=(20, 20, 20))  # nose
    return img


def people(size=(640, 480)) -> Image.Image:
    img = _canvas(size, 3)
    d = ImageDraw.Draw(img)
    for i, x in enumerate((140, 320, 500)):  # three stick figures
        colour = ((200, 60, 60), (60, 60, 200), (60, 160, 60))[i]
        d.ellipse((x - 30, 90, x + 30, 150), fill=(230, 190, 160))
        d.rectangle((x - 35, 150, x + 35, 300), fill=colour)
        d.line((x - 35, 170, x - 90, 260), fill=colour, width=18)
        d.line((x + 35, 170, x + 90, 260), fill=colour, width=18)
        d.line((x - 20, 300, x - 45, 440), fill=(40, 40, 40), width=22)
        d.line((x + 20, 300, x + 45, 440), fill=(40, 40, 40), width=22)
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE), help="folder to write into (default: examples/)")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    cat().save(out / "cat.jpg", "JPEG", quality=85)
    dog().save(out / "dog.png", "PNG", optimize=True)
    people().save(out / "people.jpg", "JPEG", quality=85)
    for name in ("cat.jpg", "dog.png", "people.jpg"):
        print(f"{out / name}: {(out / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
