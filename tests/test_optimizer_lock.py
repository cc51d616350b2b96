"""Which tunings wait for the device's lock, and what runs outside it (issue 22, item 3), on the CPU:
another process holds the simulated device's tuning lock (optimizer/tune.py tuning_lock) while this
one tunes. The model loads before the lock either way, so one replica measures while the others
load; a tuning that need not be exclusive (co-located GPU replicas whose meters see only their own
process and whose allocators are capped at their share) does not wait at all."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

import pytest

from optimizer.share_cap import exclusive_tuning
from optimizer.simulated import SimulatedDevice
from optimizer.tune import TuningSettings, autobatch

MiB = 2**20


@pytest.mark.parametrize("kind, mode, share, needed", [
    ("cpu", "serve", 0.25, True),      # the cores time every probe
    ("cuda", "serve", 1.0, True),      # alone on the card: no cap, nothing to share
    ("cuda", "off", 0.25, True),       # uncapped neighbours could take each other's memory
    ("cuda", "serve", 0.25, False),    # capped at its share while tuning, its meter its own process
    ("cuda", "tune", 0.25, False),     # capped at its budget before tuning
])
def test_which_tunings_take_the_device_lock(kind, mode, share, needed):
    decision = exclusive_tuning(kind, mode, share, share if mode == "serve" else None)
    assert bool(decision) is needed
    assert decision.reason


class SimulatedModel:
    """A TunableModel on the simulated device; `load` records that it ran."""

    name = "simulated_model"
    library_packages = ()
    default_latency_budget_s = 1.0
    probe_batch = None

    def __init__(self, device: SimulatedDevice):
        self.device = device
        self.loaded = threading.Event()

    def signature(self) -> dict:
        return {"model": self.name}

    def default_dtype(self, kind: str) -> str:
        return "float32"

    def weights_description(self) -> str:
        return "simulated"

    def load(self, device: str, dtype: str):
        self.loaded.set()

    def example_batch(self, n: int) -> list:
        return [0] * n

    def predict(self, samples: list) -> list:
        self.device.run(len(samples))
        return samples

    def overlaps(self) -> bool:
        return False


HOLDER = """
import sys
from optimizer.devices import DeviceFingerprint
from optimizer.tune import tuning_lock
with tuning_lock(DeviceFingerprint(kind="sim", name="simulated", total_memory_bytes={total})):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@pytest.fixture
def device():
    return SimulatedDevice(lambda b: 100 * MiB + 10 * MiB * b, lambda b: 0.01 + 0.001 * b, capacity_bytes=2000 * MiB)


@pytest.fixture
def lock_held_elsewhere(device, tmp_path, monkeypatch):
    """A process holding the simulated device's lock (in a lock folder of this test's own)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(total=device.capacity_bytes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    assert holder.stdout.readline().strip() == "held"
    yield holder
    if holder.poll() is None:
        holder.stdin.write("\n")
        holder.stdin.flush()
    holder.wait(30)


def settings() -> TuningSettings:
    return TuningSettings(memory_budget_bytes=1000 * MiB, latency_budget_s=1.0, max_batch=64, repeats=1)


def test_a_tuning_that_need_not_be_exclusive_runs_while_another_process_holds_the_lock(device, lock_held_elsewhere):
    model = SimulatedModel(device)
    lines: list[str] = []
    tuning = autobatch(model, settings(), meter=device, say=lines.append, exclusive=False)
    assert lock_held_elsewhere.poll() is None  # tuned while the other process still held the lock
    assert tuning.max_safe_batch == 64 and model.loaded.is_set()
    assert any("without the device's lock" in line for line in lines)


def test_an_exclusive_tuning_loads_its_model_but_probes_only_once_the_lock_is_free(device, lock_held_elsewhere):
    model = SimulatedModel(device)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(autobatch(model, settings(), meter=device,
                                                                   say=lambda line: None)))
    worker.start()
    assert model.loaded.wait(60)  # the model loads while another process measures
    worker.join(1.0)
    assert not done and device.runs == []  # ...but no probe ran while the lock was held there
    lock_held_elsewhere.stdin.write("\n")
    lock_held_elsewhere.stdin.flush()
    assert lock_held_elsewhere.stdout.readline().strip() == "released"
    worker.join(60)
    assert done and done[0].max_safe_batch == 64 and device.runs
