"""The CPU meter, and a real `autobatch tune resnet50 --device cpu` checked against independent
measurements in fresh processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from optimizer.devices import CpuMeter
from optimizer.tuning import Tuning

# `python -m autobatch` runs the CLI of the tree under test (the `autobatch` console script runs
# whatever tree was last installed); test_layering checks that the script names the same main().
AUTOBATCH = [sys.executable, "-m", "autobatch"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}


def test_cpu_meter_sees_a_peak_and_resets_it():
    import numpy as np

    meter = CpuMeter()
    meter.cleanup()
    meter.reset_peak()
    before = meter.peak_bytes()
    block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched
    del block
    meter.cleanup()
    peak = meter.peak_bytes()
    assert peak - before >= 290 * 2**20
    meter.reset_peak()  # the high-water mark falls back to what is resident now
    assert meter.peak_bytes() < peak - 250 * 2**20


# Peak RSS of a fresh process that loads ResNet-50 and runs a batch of b: measured with
# getrusage, independently of the tuner's clear_refs/VmHWM meter and of its search.
INDEPENDENT = """
import resource, sys
from deployments.registry import create_spec
b = int(sys.argv[1])
spec = create_spec("resnet50")
spec.load("cpu", "float32")
samples = spec.example_batch(b)
for _ in range(2):
    spec.predict(samples)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def independent_peak_bytes(batch_size: int) -> int:
    done = subprocess.run([sys.executable, "-c", INDEPENDENT, str(batch_size)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def tune(cache, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOBATCH, "tune", "resnet50", "--device", "cpu", "--cache", str(cache), *args],
                          capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def small_budget_mb():
    """A budget that admits roughly ten samples on this machine, from two independent measurements."""
    one, nine = independent_peak_bytes(1), independent_peak_bytes(9)
    per_sample = max((nine - one) / 8, 2**20)
    return int((one + 10 * per_sample) / 2**20)


def test_tune_resnet50_on_cpu_with_a_small_memory_budget(tmp_path, small_budget_mb):
    cache = tmp_path / "tuning.json"
    done = tune(cache, "--memory-budget-mb", str(small_budget_mb), "--latency-budget-ms", "30000",
                "--max-batch", "64", "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = Tuning.from_dict(json.loads(done.stdout))
    assert result.cache == "miss" and result.stopped_by in ("memory", "oom")
    assert "batch     1" in done.stderr  # progress: one line per probe while it runs
    budget = small_budget_mb * 2**20
    found = result.max_safe_batch
    assert 2 <= found < 64
    assert 1 <= result.batch_size <= found
    assert all(p.peak_bytes <= budget for p in result.probes if p.outcome == "ok")
    # Independent check in fresh processes: the answer fits (allowing 5% for the difference between
    # two processes' resident overheads), and the next size up is at the edge of the budget: within
    # the tuner's 10% guard margin (a size predicted over the guarded budget is not run) and the
    # same 5% between processes. CPU peaks also move by a few percent from run to run (oneDNN picks
    # kernels and workspaces per shape); 0.90 failed 1 run in 9 at 0.2 MiB under it.
    at_found, at_next = independent_peak_bytes(found), independent_peak_bytes(found + 1)
    assert at_found <= budget * 1.05
    assert at_next >= budget * 0.85
    # The search closed the bracket around its answer, unless a note says why the answer is lower
    # than what it measured (memory that jitters size by size makes a smaller batch the limit:
    # optimizer/jitter.py; a knee probe under the max that failed: optimizer/tune.py). CPU peaks
    # differ run to run, so either can happen on any run; the failures above are then not its bracket.
    probes = "; ".join(f"{p.batch_size}:{p.outcome}:{(p.peak_bytes or 0) / 2**20:.0f}MiB" for p in result.probes)
    measured_ok = max(p.batch_size for p in result.probes if p.outcome == "ok")
    if result.notes:
        assert found <= measured_ok, f"{result.notes}; {probes}"
    else:
        assert found == measured_ok, probes
        first_bad = min(p.batch_size for p in result.probes if p.outcome in ("over_memory", "oom", "predicted")
                        and p.batch_size > found)
        assert first_bad <= max(found + 1, found * 1.05), probes

    again = tune(cache, "--memory-budget-mb", str(small_budget_mb), "--latency-budget-ms", "30000",
                 "--max-batch", "64", "--repeats", "1", "--json")
    assert Tuning.from_dict(json.loads(again.stdout)).cache == "hit"
    other_budget = tune(cache, "--memory-budget-mb", str(small_budget_mb - 20), "--latency-budget-ms", "30000",
                        "--max-batch", "4", "--repeats", "1", "--json")
    assert Tuning.from_dict(json.loads(other_budget.stdout)).cache == "miss"

    show = subprocess.run([*AUTOBATCH, "show", "--cache", str(cache)], capture_output=True, text=True, env=ENV)
    assert show.returncode == 0 and show.stdout.count("resnet50") == 2
    png = tmp_path / "resnet50.png"
    plot = subprocess.run([*AUTOBATCH, "plot", "resnet50", "--out", str(png), "--cache", str(cache)],
                          capture_output=True, text=True, env=ENV)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["tune", "no_such_model", "--device", "cpu"], "unknown model 'no_such_model'; choose one of"),
    (["tune", "resnet50", "--memory-budget-mb", "-5"], "must be positive"),
    (["tune", "resnet50", "--memory-fraction", "1.5"], "must be in (0, 1]"),
    (["tune", "resnet50", "--device", "cuda"], "no NVIDIA GPU is visible here"),
    (["tune", "resnet50", "--device", "cpu", "--memory-budget-mb", "300"], "batch 1 does not fit the memory budget of 300 MiB"),
    (["plot", "resnet50", "--out", "x.png"], "no cached tuning for 'resnet50'"),
])
def test_bad_arguments_exit_non_zero_and_say_what_to_change(tmp_path, args, message):
    done = subprocess.run([*AUTOBATCH, *args, *(["--cache", str(tmp_path / "c.json")] if args[0] != "cache" else [])],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
