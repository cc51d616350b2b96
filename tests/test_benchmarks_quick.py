"""Each benchmark script's --quick mode, run the way the GPU machine runs them (`python benchmarks/x.py`,
the repo on PYTHONPATH, no console scripts), so the scripts do not rot. Benchmarks are not tests: the
checks are that they finish, print their table and write JSON with the fields the docs use."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(400)


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.join("benchmarks", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-results")


def test_tuning_vs_peers_quick(results):
    out = results / "tuning.json"
    stdout = run_script("tuning_vs_peers.py", "--quick", "--out", str(out))
    assert "brute force" in stdout and "accelerate" in stdout and f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    assert data["environment"]["packages"]["torch"] and data["environment"]["command"].startswith("python benchmarks/")
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"autobatch", "brute force", "ultralytics AutoBatch", "accelerate (start 8)"}
    true_max = rows["brute force"]["found"]
    assert isinstance(true_max, int) and 1 <= true_max <= 8 and rows["brute force"]["fits"] == "yes"
    assert isinstance(rows["autobatch"]["found"], int) and rows["autobatch"]["probes"] >= 2
    assert isinstance(rows["accelerate (start 8)"]["found"], int)
    assert rows["ultralytics AutoBatch"]["found"] == "n/a" and "YOLO models only" in rows["ultralytics AutoBatch"]["note"]
    for r in data["rows"]:
        if isinstance(r["found"], int):
            assert r["ratio"] == pytest.approx(r["found"] / true_max) and r["fits"] in ("yes", "no (over_memory)")


def test_serving_vs_plain_quick(results):
    out = results / "serving.json"
    stdout = run_script("serving_vs_plain.py", "--quick", "--out", str(out))
    assert "autobatch / plain batched" in stdout and f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["serving"]}
    assert set(rows) == {"autobatch", "plain batched", "unbatched"}
    for r in rows.values():
        assert r["ok"] > 0 and r["errors"] == 0 and r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["mean_batch"] >= 1
    assert rows["unbatched"]["largest_batch"] == 1
    assert rows["plain batched"]["largest_batch"] <= 5  # max_ongoing_requests=5 caps Ray's default batch of 10
    tuned = data["variants"]["autobatch"]
    assert 1 <= tuned["batch_size"] <= tuned["max_safe_batch"] <= 4 and tuned["cache"] == "miss"
    assert rows["autobatch"]["largest_batch"] <= tuned["batch_size"]
    assert [r["batch"] for r in data["raw"]] == [1, 4] and all(r["samples_per_s"] > 0 for r in data["raw"])


def test_plots_quick(results, tmp_path):
    serving, tuning = results / "serving.json", results / "tuning.json"
    if not (serving.exists() and tuning.exists()):
        pytest.skip("needs the two quick runs above")
    stdout = run_script("plots.py", "--quick", "--serving", str(serving), "--tuning", str(tuning), "--out-dir", str(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["resnet50-cpu-batch.png", "resnet50-cpu-concurrency.png", "tuning-cpu.png"], stdout
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)


def test_tune_vs_bruteforce_quick(tmp_path):
    out = tmp_path / "rows.json"
    stdout = run_script("tune_vs_bruteforce.py", "--quick", "--out", str(out))
    assert "true max" in stdout
    (row,) = json.loads(out.read_text())
    assert 1 <= row["found"] <= 8 and 1 <= row["true_max"] <= 8


def test_new_shape_cost_quick(tmp_path):
    out = tmp_path / "shapes.json"
    stdout = run_script("new_shape_cost.py", "--quick", "--out", str(out))
    assert "first / later" in stdout and f"wrote {out}" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["first_ms"] > 0 and r["later_ms"] > 0 and r["ratio"] == pytest.approx(r["first_ms"] / r["later_ms"])


def test_new_shape_cost_parses_size_ranges_in_order():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from new_shape_cost import parse_sizes

    assert parse_sizes(["1-3", "8", "2", "16"]) == [1, 2, 3, 8, 16]
    with pytest.raises(SystemExit, match="positive batch sizes"):
        parse_sizes(["0-2"])


def test_feed_gpu_quick(tmp_path):
    out = tmp_path / "feed.json"
    stdout = run_script("feed_gpu.py", "--quick", "--out", str(out))
    assert "new / forward" in stdout and "header check" in stdout and f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    measured = data["models"]["resnet50"]
    assert [r["batch"] for r in measured["rows"]] == [1, 2]
    for r in measured["rows"]:
        assert r["forward_only"] > 0 and r["old_path"] > 0 and r["new_path"] > 0 and r["device_decode"] > 0
        assert r["overlapped"] > 0  # the two stages in two threads, as a GPU replica runs them
    assert [t["curve"] for t in measured["tuner"]] == ["forward alone", "old path", "new path, overlapped"]
    assert all(t["probes"] and 1 <= t["batch_size"] <= 2 for t in measured["tuner"])


def test_the_brute_force_scan_finds_the_true_maximum_from_any_hint():
    """benchmarks/bruteforce.py, which both tuning benchmarks judge against, on the simulated device:
    from a hint below, at or above the answer it lands exactly on the largest size that fits."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bruteforce import Measurer, brute_force

    from optimizer.simulated import SimulatedDevice

    MiB = 2**20
    device = SimulatedDevice(lambda b: 1000 * MiB + 10 * MiB * b, lambda b: 0.01, capacity_bytes=64000 * MiB)

    class SimulatedModel:
        def example_batch(self, n):
            return [0] * n

        def predict(self, samples):
            device.run(len(samples))
            return samples

    budget = 1000 * MiB + 10 * MiB * 137  # batch 137 fits exactly, 138 does not
    for hint in (1, 100, 137, 200, 1024):
        scan = brute_force(Measurer(SimulatedModel(), device, budget, repeats=1), hint, limit=1024)
        assert scan["found"] == 137, (hint, scan)
        assert scan["ooms"] == 0 and scan["probes"] >= 2
    assert brute_force(Measurer(SimulatedModel(), device, budget, repeats=1), 90, limit=100)["found"] == 100


def test_soak_quick(results):
    out = results / "soak.json"
    stdout = run_script("soak.py", "--quick", "--out", str(out))
    assert "requests by status" in stdout and f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    windows, summary = data["windows"], data["summary"]
    assert len(windows) == 2 and all(w["requests"] > 0 for w in windows)
    statuses = summary["statuses"]
    # every malformed case is a 4xx, never a 5xx other than admission's 503; the good ones are served
    assert statuses.get("200", 0) > 0 and not set(statuses) - {"200", "400", "413", "415", "422", "503"}, statuses
    assert sum(v for k, v in statuses.items() if k.startswith("4")) > 0
    assert summary["rss_after_warmup_mib"] > 0 and summary["same_replica_throughout"]
    assert set(summary["malformed_cases"]) >= {"empty", "1 byte", "truncated JPEG", "text as JPEG", "GIF", "bad JSON"}


def test_device_queue_quick(tmp_path):
    """benchmarks/device_queue.py serves its stand-in device from a tree and measures batch formation."""
    out = tmp_path / "device_queue.json"
    stdout = run_script("device_queue.py", "--trees", "after=.", "--concurrency", "6", "--duration", "1",
                        "--warmup-s", "0.5", "--fixed-ms", "20", "--per-sample-ms", "1", "--max-batch", "8",
                        "--latency-budget-ms", "500", "--out", str(out))
    assert "mean device batch" in stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tree"] == "after" and row["clients"] == 6 and row["errors"] == 0 and row["requests_per_s"] > 0
    assert row["device_batches"] > 0 and 1 <= row["mean_batch"] <= row["largest_batch"] <= 8
    assert row["coalesced_batches"] is not None  # this tree's replica reports its device queue


def test_host_cost_quick(tmp_path):
    """benchmarks/host_cost.py runs a replica in-process (no Ray) and prints host CPU per sample."""
    out = tmp_path / "host_cost.json"
    stdout = run_script("host_cost.py", "--quick", "--out", str(out))
    assert "| stand-in | samples/request |" in stdout and f"wrote {out}" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stand_in"], r["samples_per_request"]) for r in rows] == [("number", 1), ("number", 32)]
    assert all(r["us_per_sample"] > 0 and r["requests"] >= 8 for r in rows)
