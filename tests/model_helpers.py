"""Test support for model specs (used by tests/test_models_*.py; lives in tests/, not the shipped package).

- `image_bytes`: real JPEG/PNG/WebP/GIF files made with Pillow, with a pattern so images differ.
- `run_tune`: `autobatch tune MODEL --device cpu --json` in a fresh process (own temp dir, so its
  device lock is private), with a network guard:
  a sitecustomize that records (and refuses) every DNS lookup and internet socket connection, so
  a test can assert that loading, tuning and predicting never reached for the network.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

NETWORK_GUARD = textwrap.dedent('''
    """Installed by run_tune: refuse and record any network access."""
    import os
    import socket

    _LOG = os.environ["AUTOBATCH_NETWORK_LOG"]
    _LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost"}

    def _refuse(what, detail):
        with open(_LOG, "a") as f:
            f.write(f"{what} {detail!r}\\n")
        raise OSError(f"network access refused by the test guard: {what} {detail!r}")

    _getaddrinfo = socket.getaddrinfo
    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)
    socket.getaddrinfo = getaddrinfo

    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            _refuse("connect", address)
        return _connect(self, address)
    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            _refuse("connect_ex", address)
        return _connect_ex(self, address)
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
''')


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (320, 240), seed: int = 0, mode: str = "RGB") -> bytes:
    """A real encoded image (width, height) with a seed-dependent pattern."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    array = np.stack([(base[c] + (c + 1) * (xx + 2 * yy) * (seed + 1)) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    image = Image.fromarray(array, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def autobatch_executable() -> str:
    return os.path.join(os.path.dirname(sys.executable), "autobatch")


def guarded_env(tmp_path, env: dict | None = None, offline_env: bool = True) -> tuple[dict, str]:
    """An environment for a child process whose network access is refused and logged.

    Returns (env, path of the log of attempts). With offline_env=False the HF/YOLO offline
    variables are removed, to show that a spec keeps itself offline."""
    guard_dir = os.path.join(str(tmp_path), "network-guard")
    os.makedirs(guard_dir, exist_ok=True)
    with open(os.path.join(guard_dir, "sitecustomize.py"), "w") as f:
        f.write(NETWORK_GUARD)
    log = os.path.join(str(tmp_path), "network-attempts.log")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items()
            if offline_env or k not in ("HF_HUB_OFFLINE", "YOLO_OFFLINE", "YOLO_AUTOINSTALL", "TRANSFORMERS_OFFLINE")}
    if offline_env:
        base.update({"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"})
    full_env = {**base, **(env or {}),
                "AUTOBATCH_NETWORK_LOG": log,
                # the tuner's per-device lock lives in the temp dir: a private one keeps a test from
                # queueing behind other tunings on the same machine
                "TMPDIR": str(tmp_path),
                "PYTHONPATH": os.pathsep.join([guard_dir, root, os.environ.get("PYTHONPATH", "")])}
    return full_env, log


def network_attempts(log: str) -> list[str]:
    return open(log).read().splitlines() if os.path.exists(log) else []


def run_guarded_python(tmp_path, code: str, offline_env: bool = False, timeout: float = 300) -> tuple[str, list[str]]:
    """Run Python code in a fresh guarded process; returns (stdout, network attempts)."""
    full_env, log = guarded_env(tmp_path, offline_env=offline_env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=root)
    assert done.returncode == 0, f"guarded python failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done.stdout, network_attempts(log)


def run_tune(model: str, tmp_path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[dict, str, list[str]]:
    """Run `autobatch tune MODEL --device cpu --json` under the network guard.

    Returns (result JSON, stderr, network attempts). Raises AssertionError with stderr on failure."""
    full_env, log = guarded_env(tmp_path, env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [autobatch_executable(), "tune", model, "--device", "cpu", "--cache", os.path.join(str(tmp_path), "tuning.json"),
               "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=root)
    attempts = network_attempts(log)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"stdout is not one JSON object:\n{done.stdout[:2000]}\nstderr:\n{done.stderr[-2000:]}") from None
    return result, done.stderr, attempts
