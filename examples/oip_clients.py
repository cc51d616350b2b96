"""README's tritonclient script, for every model, over HTTP and gRPC, one and many samples per request.

Stock `tritonclient` only (`pip install tritonclient[http]`; the gRPC client needs grpcio and
protobuf, which Ray already brings). Against `make serve` (HTTP 8000, gRPC 9000):

    python examples/oip_clients.py                         # serve_config.yaml's four models
    python examples/oip_clients.py --models resnet50 --samples 1 32 --images cat.jpg dog.png

Each model's inputs and outputs come from its metadata (`GET /v2/models/<model>`), so a new model
family needs no change here. A sample is an image (JPEG bytes: the files given, or generated ones)
for a model whose input is `images`, a prompt for one whose input is `text_input`. Prints one line
per (transport, model, samples) with the outputs' shapes and the seconds the request took; exits 1
if any answer is missing a sample or any call failed.
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np

SERVE_CONFIG_MODELS = ["resnet50", "vit_b_16", "yolo11n_pose", "llama_int4"]
PROMPTS = [b"Once upon a time", b"The batch", b"In a hole in the ground", b"It was a bright cold day"]


def generated_jpeg(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples_for(input_name: str, n: int, images: list[bytes]) -> np.ndarray:
    if input_name == "images":
        return np.array([images[i % len(images)] for i in range(n)], dtype=object)
    if input_name == "text_input":
        return np.array([PROMPTS[i % len(PROMPTS)] for i in range(n)], dtype=object)
    raise SystemExit(f"this script sends `images` or `text_input`; the model wants {input_name!r}")


def call(client_module, client, model: str, n: int, images: list[bytes], max_tokens: int) -> tuple[dict, float]:
    """One request of n samples: the outputs' shapes and the seconds it took."""
    meta = client.get_model_metadata(model)
    meta = meta if isinstance(meta, dict) else {"inputs": [{"name": i.name} for i in meta.inputs],
                                                  "outputs": [{"name": o.name} for o in meta.outputs]}
    required = [i["name"] for i in meta["inputs"] if i["name"] in ("images", "text_input")]
    if not required:
        raise SystemExit(f"{model}: no `images` or `text_input` input in its metadata: {meta['inputs']}")
    data = samples_for(required[0], n, images)
    tensor = client_module.InferInput(required[0], [n], "BYTES")
    tensor.set_data_from_numpy(data)
    params = {"max_tokens": max_tokens} if required[0] == "text_input" else None
    started = time.perf_counter()
    result = client.infer(model, [tensor], parameters=params)
    elapsed = time.perf_counter() - started
    shapes = {o["name"]: tuple(result.as_numpy(o["name"]).shape) for o in meta["outputs"]
              if result.as_numpy(o["name"]) is not None}
    return shapes, elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", default="localhost:8000", help="host:port of the HTTP ingress ('' to skip)")
    p.add_argument("--grpc", default="localhost:9000", help="host:port of the gRPC ingress ('' to skip)")
    p.add_argument("--models", nargs="+", default=SERVE_CONFIG_MODELS, help="default: serve_config.yaml's four")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 8], help="samples per request")
    p.add_argument("--images", nargs="*", default=[], help="image files to send (default: generated JPEGs)")
    p.add_argument("--max-tokens", type=int, default=8, help="for a text model")
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)

    images = [open(path, "rb").read() for path in args.images] or [generated_jpeg(seed) for seed in range(4)]
    failures = 0
    for transport, url in (("http", args.http), ("grpc", args.grpc)):
        if not url:
            continue
        if transport == "http":
            import tritonclient.http as module
            client = module.InferenceServerClient(url, connection_timeout=args.timeout_s,
                                                  network_timeout=args.timeout_s)
        else:
            import tritonclient.grpc as module
            client = module.InferenceServerClient(url)
        try:
            for model in args.models:
                if not client.is_model_ready(model):
                    print(f"{transport:4} {model:14} not ready")
                    failures += 1
                    continue
                for n in args.samples:
                    try:
                        shapes, elapsed = call(module, client, model, n, images, args.max_tokens)
                    except Exception as exc:  # noqa: BLE001 - report every call, then exit 1
                        print(f"{transport:4} {model:14} x{n:<3} FAILED: {exc}")
                        failures += 1
                        continue
                    short = [name for name, shape in shapes.items() if not shape or shape[0] != n]
                    failures += bool(short)
                    print(f"{transport:4} {model:14} x{n:<3} {elapsed:7.3f} s  "
                          + "  ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
                          + (f"  MISSING SAMPLES in {short}" if short else ""))
        finally:
            client.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
