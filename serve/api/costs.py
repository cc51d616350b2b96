"""What a request costs a replica's memory before it is decoded, and giving that memory back after.

Decoded bytes: a request's samples are all decoded before its first batch runs (serve/api/tensor_routes.py),
so a small body can grow into gigabytes (10,000 `pixels` samples of 2x2 become 10,000 crops of
3x224x224 floats). Admission charges each sample, before decoding, at the size of one decoded
sample in the form serving hands to `predict`: `spec.example_batch(1)`, the worst case the tuning
measured (serve/replica/admission.py).

Giving it back: CPython frees a request's buffers to glibc's malloc, which keeps them in the
process (its mmap threshold rises to the largest block freed, up to 32 MiB, so a 6 MB body's
successors live on the heap), and the replica's RSS stays where the largest request took it. After
requests holding at least TRIM_MIN_BYTES are released (answered, refused or cancelled),
`malloc_trim(0)` returns the free pages, in a thread of its own so no request waits on it.

The trim collects cycles first (a request's buffers may hang on a traceback's frames). A full
collection walks every object of the process, and with torch loaded that is ~0.2 s of a core
(docs/benchmarks.md, host cost): run every 32 MiB of 23 KB JPEGs it was most of a replica's host
time. So the full collection runs at most FULL_GC_SHARE of the time (its last duration / the share
since the previous one), and the young generations, where a just-answered request's cycles are,
are collected on every trim.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("ray.serve")

TRIM_MIN_BYTES = 32 * 2**20  # released request memory that is worth a trim
FULL_GC_SHARE = 0.02  # of the wall time, at most, spent in full collections before trims
_MAX_DEPTH = 6


def nbytes(value: Any, _depth: int = 0) -> int:
    """The bytes a decoded sample holds in its buffers: tensors and arrays by their elements, bytes
    by length, containers and dataclasses by their parts (small scalars count 0)."""
    if _depth > _MAX_DEPTH or value is None:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # a torch tensor (a view: its elements)
        return int(value.element_size()) * int(value.nelement())
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):  # numpy
        return size
    if isinstance(value, dict):
        return sum(nbytes(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v, _depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__"):
        return sum(nbytes(v, _depth + 1) for v in vars(value).values())
    return 0


_MEASURED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def decoded_sample_bytes(spec, model_name: str) -> int:
    """One decoded sample's bytes for this spec (0 where its example cannot be made: not charged),
    measured once per spec (both the simple routes and the tensor routes ask)."""
    try:
        return _MEASURED[spec]
    except (KeyError, TypeError):
        pass
    size = _measure(spec, model_name)
    try:
        _MEASURED[spec] = size
    except TypeError:  # not weakly referenceable: measured again next time
        pass
    return size


def _measure(spec, model_name: str) -> int:
    try:
        size = nbytes(spec.example_batch(1)[0])
    except Exception as exc:  # noqa: BLE001 - a spec without a cheap example still serves, uncharged
        log.warning("autobatch: %s: could not size a decoded sample (%s: %s); decoded bytes are not charged "
                    "at admission", model_name, type(exc).__name__, exc)
        return 0
    log.info("autobatch: %s: a decoded sample holds %d bytes; admission charges each request's samples at that "
             "before decoding them", model_name, size)
    return size


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """`released(n)` after a request holding n bytes is done; every TRIM_MIN_BYTES released, one
    gc + malloc_trim runs in a background thread (never two at once)."""

    def __init__(self, min_bytes: int = TRIM_MIN_BYTES):
        self._min_bytes = int(min_bytes)
        self._lock = threading.Lock()
        self._released_bytes = 0
        self._running = False
        self.trims = 0
        self.full_collections = 0
        self._next_full_at = 0.0  # time.monotonic() from which a trim may collect all generations again

    def released(self, released_bytes: int) -> None:
        with self._lock:
            self._released_bytes += max(0, int(released_bytes))
            if self._running or self._released_bytes < self._min_bytes:
                return
            self._released_bytes, self._running = 0, True
        threading.Thread(target=self._run, name="autobatch-heap-trim", daemon=True).start()

    def trim_now(self) -> None:
        """Collect cycles (a request's buffers may hang on a traceback's frames) and trim the heap."""
        started = time.monotonic()
        if started >= self._next_full_at:
            gc.collect()
            self.full_collections += 1
            self._next_full_at = started + (time.monotonic() - started) / FULL_GC_SHARE
        else:
            gc.collect(1)
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        self.trims += 1

    def _run(self) -> None:
        try:
            self.trim_now()
        except Exception:  # noqa: BLE001 - a trim is an optimisation, never a failure
            log.exception("autobatch: heap trim failed")
        finally:
            with self._lock:
                self._running = False


_TRIMMER: HeapTrimmer | None = None  # one per process (the heap is the process's), made on first use


def released(released_bytes: int) -> None:
    """A request holding `released_bytes` is done: trim the heap once enough has been released.
    (A function, not a module-level object: Ray pickles the deployments that call it, and a lock or
    a ctypes function cannot be pickled.)"""
    global _TRIMMER
    if _TRIMMER is None:
        _TRIMMER = HeapTrimmer()
    _TRIMMER.released(released_bytes)
