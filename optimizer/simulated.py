"""A simulated device for tests: memory and latency as functions of the batch size.

Not used when serving or tuning a real model; tests and the property-based search checks run the
whole optimizer on it (a search over thousands of sizes takes milliseconds).
"""
from __future__ import annotations

from typing import Callable

from .devices import DeviceFingerprint, MemoryMeter, SimulatedOutOfMemory


class SimulatedDevice(MemoryMeter):
    """A device whose memory and latency are functions of the batch size.

    `memory_bytes(b)` is the true peak a batch of b takes (it may be noisy: called once per run);
    `latency_s(b)` the time one batch takes. Running a batch whose memory exceeds `capacity_bytes`
    raises SimulatedOutOfMemory, as a real card would. The clock is simulated too, so a search over
    thousands of sizes takes milliseconds.
    """

    def __init__(
        self,
        memory_bytes: Callable[[int], float],
        latency_s: Callable[[int], float],
        capacity_bytes: int,
        base_bytes: int | None = None,
        name: str = "simulated",
    ):
        self.memory_bytes = memory_bytes
        self.latency_s = latency_s
        self.capacity_bytes = int(capacity_bytes)
        self.base_bytes = int(base_bytes if base_bytes is not None else memory_bytes(0))
        self.fingerprint = DeviceFingerprint(kind="sim", name=name, total_memory_bytes=self.capacity_bytes)
        self.torch_device = "cpu"
        self._clock = 0.0
        self._peak = self.base_bytes
        self.runs: list[int] = []  # batch sizes actually run (OOMs included)
        self.oom_count = 0

    def run(self, batch_size: int) -> None:
        """Stands in for one forward pass of a batch."""
        self.runs.append(batch_size)
        need = float(self.memory_bytes(batch_size))
        if need > self.capacity_bytes:
            self.oom_count += 1
            self._peak = max(self._peak, self.capacity_bytes)
            raise SimulatedOutOfMemory(
                f"simulated OOM: batch {batch_size} needs {need:.0f} bytes of {self.capacity_bytes}"
            )
        self._peak = max(self._peak, int(need))
        self._clock += float(self.latency_s(batch_size))

    def reset_peak(self) -> None:
        self._peak = self.base_bytes

    def peak_bytes(self) -> int:
        return self._peak

    def current_bytes(self) -> int:
        return self.base_bytes

    def now(self) -> float:
        return self._clock

    def cleanup(self) -> None:
        pass
