"""Devices: who are we running on (the fingerprint that keys the cache) and how much memory a batch
took (the meter that the probe reads).

Three meters share one small interface so the search never knows which it talks to:
- CUDA: torch's allocator peak (what batches cost) plus what NVML sees beyond torch on the card
  (the CUDA context, cuBLAS/cuDNN workspaces outside the caching allocator), measured once.
- CPU: the process's peak resident set (VmHWM), which Linux lets us reset by writing 5 to
  /proc/self/clear_refs, so each probe sees its own peak rather than the largest since start.
- Simulated (optimizer/simulated.py, for tests): a memory and latency curve given as functions,
  with a real capacity that raises an out-of-memory error, so search and selection can be tested
  fast and exhaustively.

The fingerprint is built without importing torch (NVML, /proc, package metadata), so a cache hit
answers in well under a second.
"""
from __future__ import annotations

import ast
import gc
import importlib.metadata
import importlib.util
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import psutil

log = logging.getLogger("autobatch")


class DeviceUnavailable(RuntimeError):
    """The device that was asked for is not here (e.g. --device cuda on a machine without a GPU)."""


class SimulatedOutOfMemory(MemoryError):
    """Raised by the simulated device when a batch needs more than its capacity, like a CUDA OOM."""


@dataclass(frozen=True)
class DeviceFingerprint:
    """What makes tuning results transferable: same kind of card, same memory, same software."""

    kind: str  # "cuda", "cpu" or "sim"
    name: str
    total_memory_bytes: int
    index: int = 0
    uuid: str = ""  # identifies this one card (used for the per-GPU tuning lock, not the cache)
    driver_version: str = ""
    cuda_version: str = ""
    torch_version: str = ""
    cpu_threads: int = 0
    extra: dict = field(default_factory=dict)

    def cache_fields(self) -> dict:
        """Fields that decide whether a cached answer applies: a card of the same model with the
        same memory and software gives the same answer, whichever slot or host it sits in."""
        d = asdict(self)
        d.pop("index")
        d.pop("uuid")
        return d

    @property
    def label(self) -> str:
        """Short name for metrics tags and logs, e.g. 'cuda:NVIDIA H100 80GB HBM3'."""
        return f"{self.kind}:{self.name}"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _torch_cuda_version() -> str:
    """torch.version.cuda without importing torch (importing it costs ~1 s, too slow for a cache hit)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        tree = ast.parse(open(path).read())
    except OSError:
        return ""
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "cuda":
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return ""


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def cuda_device_count() -> int:
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return nvml.nvmlDeviceGetCount()
    except Exception:
        return 0


def _visible_cuda_index(index: int) -> int:
    """NVML numbers every card on the host; CUDA (and torch) only the visible ones."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return index
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if index < len(entries) and entries[index].isdigit():
        return int(entries[index])
    return index


def cuda_fingerprint(index: int = 0) -> DeviceFingerprint:
    nvml = _nvml()
    if nvml is None or cuda_device_count() == 0:
        raise DeviceUnavailable(
            "no NVIDIA GPU is visible here (NVML found none); use --device cpu, or run where a GPU is"
        )
    handle = nvml.nvmlDeviceGetHandleByIndex(_visible_cuda_index(index))
    name = nvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    uuid = nvml.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    driver = nvml.nvmlSystemGetDriverVersion()
    driver = driver.decode() if isinstance(driver, bytes) else driver
    return DeviceFingerprint(
        kind="cuda",
        name=name,
        total_memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        index=index,
        uuid=uuid,
        driver_version=driver,
        cuda_version=_torch_cuda_version(),
        torch_version=package_version("torch"),
    )


def cpu_model_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_fingerprint() -> DeviceFingerprint:
    return DeviceFingerprint(
        kind="cpu",
        name=cpu_model_name(),
        total_memory_bytes=int(psutil.virtual_memory().total),
        uuid=f"cpu-{platform.node()}",
        torch_version=package_version("torch"),
        cpu_threads=cpu_threads(),
    )


def resolve_device_kind(requested: str) -> str:
    """'auto' means a GPU when one is visible, else the CPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    if requested == "cuda" and cuda_device_count() == 0:
        raise DeviceUnavailable(
            "--device cuda was asked for, but no NVIDIA GPU is visible here; use --device cpu or auto"
        )
    return requested


def fingerprint(kind: str, index: int = 0) -> DeviceFingerprint:
    return cuda_fingerprint(index) if kind == "cuda" else cpu_fingerprint()


class MemoryMeter:
    """What the probe needs from a device: reset the peak, run, read the peak, clean up."""

    fingerprint: DeviceFingerprint
    torch_device: str = "cpu"

    def reset_peak(self) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int:
        """Highest memory in use since the last reset_peak, as the budget counts it."""
        raise NotImplementedError

    def current_bytes(self) -> int:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def cleanup(self) -> None:
        """After an OOM or between probes: give cached blocks back so the next probe starts clean."""
        gc.collect()

    def now(self) -> float:
        return time.perf_counter()

    def is_oom(self, exc: BaseException) -> bool:
        if isinstance(exc, MemoryError):
            return True
        text = str(exc).lower()
        return isinstance(exc, RuntimeError) and (
            "out of memory" in text or "cuda error: out of memory" in text or "can't allocate memory" in text
        )


class CpuMeter(MemoryMeter):
    """Peak RSS of this process. Linux resets VmHWM when 5 is written to /proc/self/clear_refs."""

    def __init__(self, fingerprint: DeviceFingerprint | None = None):
        self.fingerprint = fingerprint or cpu_fingerprint()
        self.torch_device = "cpu"
        self._process = psutil.Process()
        self._can_reset = self._probe_reset()

    @staticmethod
    def _read_status_kib(field_name: str) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def _probe_reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return self._read_status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset_peak(self) -> None:
        gc.collect()
        if self._can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:  # no reset: poll instead (coarser, but never under-reports the start)
            self._polled_peak = self.current_bytes()

    def peak_bytes(self) -> int:
        if self._can_reset:
            hwm = self._read_status_kib("VmHWM")
            if hwm is not None:
                return hwm * 1024
        self._polled_peak = max(getattr(self, "_polled_peak", 0), self.current_bytes())
        return self._polled_peak

    def current_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def cleanup(self) -> None:
        """Free memory must leave the resident set, or the next probe's peak starts from the
        last (larger) probe's high-water mark: glibc keeps freed heap unless asked to trim."""
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class CudaMeter(MemoryMeter):
    """torch's allocator peak (reserved: what the caching allocator really holds from the driver)
    plus the bytes NVML sees on the card beyond torch: the CUDA context and library workspaces.
    That second term is measured once at start and counted in every peak, so a budget means what
    the card really gives up, not just what torch's tensors take."""

    def __init__(self, index: int = 0, fingerprint: DeviceFingerprint | None = None):
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailable("torch sees no CUDA device; use --device cpu")
        self.fingerprint = fingerprint or cuda_fingerprint(index)
        self.index = index
        self.torch_device = f"cuda:{index}"
        self._torch = torch
        card_used_before = None if torch.cuda.is_initialized() else self._card_used_bytes()
        torch.cuda.init()
        torch.zeros(1, device=self.torch_device)  # create the context so NVML sees it
        torch.cuda.synchronize(self.index)
        self.outside_torch_bytes = self._outside_torch_bytes(card_used_before)

    def _card_used_bytes(self) -> int | None:
        """Memory in use on the whole card, as NVML sees it (no CUDA context needed)."""
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(_visible_cuda_index(self.index))).used)
        except Exception:
            return None

    def _nvml_used_bytes(self) -> int | None:
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(_visible_cuda_index(self.index))
            pid = os.getpid()
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
        except Exception:
            return None
        return None  # in a container the pid namespace hides us; see below

    def _outside_torch_bytes(self, card_used_before: int | None) -> int:
        """This process's memory on the card that torch's allocator does not account for (the CUDA
        context, mostly). Per-process NVML accounting when the pid namespace lets us see it; else
        what the card's usage grew by while this process created its context. Never the card's
        whole usage: replicas sharing a card would each count the others' memory as their own."""
        reserved = self._torch.cuda.memory_reserved(self.index)
        used = self._nvml_used_bytes()
        if used is not None:
            return max(0, int(used) - int(reserved))
        card_used_now = self._card_used_bytes()
        if card_used_before is not None and card_used_now is not None:
            return max(0, card_used_now - card_used_before - int(reserved))
        log.warning("autobatch: cannot tell this process's CUDA context size (per-process NVML hidden and the "
                    "context already existed); counting 500 MiB for it")
        return 500 * 2**20

    def reset_peak(self) -> None:
        self._torch.cuda.synchronize(self.index)
        self._torch.cuda.reset_peak_memory_stats(self.index)

    def peak_bytes(self) -> int:
        return int(self._torch.cuda.max_memory_reserved(self.index)) + self.outside_torch_bytes

    def current_bytes(self) -> int:
        return int(self._torch.cuda.memory_reserved(self.index)) + self.outside_torch_bytes

    def synchronize(self) -> None:
        self._torch.cuda.synchronize(self.index)

    def cleanup(self) -> None:
        gc.collect()
        self._torch.cuda.synchronize(self.index)
        self._torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, self._torch.cuda.OutOfMemoryError) or super().is_oom(exc)


def make_meter(kind: str, index: int = 0) -> MemoryMeter:
    if kind == "cuda":
        return CudaMeter(index)
    if kind == "cpu":
        return CpuMeter()
    raise DeviceUnavailable(f"unknown device kind {kind!r}; use cpu or cuda")
