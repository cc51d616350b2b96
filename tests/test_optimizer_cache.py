"""The tuning cache: hits, misses on any changed key field, corrupt and foreign files, and
several processes writing at once."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from dataclasses import replace

from tuning_samples import simulated_tuning

from optimizer.cache import TuningCache, cache_key
from optimizer.devices import DeviceFingerprint
from optimizer.tune import Resolved, TuningSettings
from optimizer.tuning import Tuning

KEY = {"device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 85 * 2**30},
       "model": {"model": "resnet50"}, "dtype": "float16", "memory_budget_bytes": 2**31}
RESULT = simulated_tuning("resnet50", max_safe_batch=256, batch_size=64)


class Spec:
    """What Resolved.key_fields reads of a model."""

    name = "resnet50"
    library_packages = ("torch",)
    default_latency_budget_s = 0.5

    def signature(self):
        return {"model": "resnet50"}

    def default_dtype(self, kind):
        return "float16"


def test_hit_after_put_and_miss_on_any_changed_field(tmp_path):
    cache = TuningCache(tmp_path / "c.json")
    assert cache.get(KEY) is None
    cache.put(KEY, RESULT)
    assert cache.get(KEY) == RESULT
    assert TuningCache(tmp_path / "c.json").get(json.loads(json.dumps(KEY))) == RESULT  # survives a restart
    for field, value in [("dtype", "float32"), ("memory_budget_bytes", 2**30)]:
        assert cache.get({**KEY, field: value}) is None
    other_card = {**KEY, "device": {**KEY["device"], "name": "NVIDIA H200"}}
    assert cache.get(other_card) is None


def test_key_fields_change_with_device_dtype_budget_and_library_versions():
    h100 = DeviceFingerprint("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, driver_version="580", torch_version="2.9")
    h200 = DeviceFingerprint("cuda", "NVIDIA H200", 141 * 2**30, driver_version="580", torch_version="2.9")
    base = Resolved("cuda", h100, "float16", 2**31, 0.1, TuningSettings())
    keys = {
        "base": base.key_fields(Spec()),
        "gpu": Resolved("cuda", h200, "float16", 2**31, 0.1, TuningSettings()).key_fields(Spec()),
        "dtype": Resolved("cuda", h100, "bfloat16", 2**31, 0.1, TuningSettings()).key_fields(Spec()),
        "budget": Resolved("cuda", h100, "float16", 2**30, 0.1, TuningSettings()).key_fields(Spec()),
        "latency": Resolved("cuda", h100, "float16", 2**31, 0.2, TuningSettings()).key_fields(Spec()),
        "torch": Resolved("cuda", DeviceFingerprint("cuda", h100.name, h100.total_memory_bytes, driver_version="580",
                                                    torch_version="2.10"), "float16", 2**31, 0.1,
                          TuningSettings()).key_fields(Spec()),
    }
    assert len({cache_key(k) for k in keys.values()}) == len(keys)
    # The same model of card in another slot or host is the same key: its answer transfers.
    same_model = DeviceFingerprint("cuda", h100.name, h100.total_memory_bytes, index=3, uuid="GPU-other",
                                   driver_version="580", torch_version="2.9")
    assert cache_key(Resolved("cuda", same_model, "float16", 2**31, 0.1, TuningSettings()).key_fields(Spec())) == cache_key(keys["base"])


def test_the_cache_key_of_given_settings_is_the_one_caches_already_hold(monkeypatch):
    """The key of one fixed tuning, as the code before TuningSettings marked its key fields wrote it:
    a change of how the key is built must not turn every cache entry written so far into a miss."""
    import optimizer.tune as tune

    monkeypatch.setattr(tune, "package_version", lambda name: "1.0")
    h100 = DeviceFingerprint("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, driver_version="580", torch_version="2.9")
    fields = Resolved("cuda", h100, "float16", 2**31, 0.1, TuningSettings(max_batch=512, margin=0.2)).key_fields(Spec())
    assert {k: v for k, v in fields.items() if k not in ("device", "libraries", "model")} == {
        "autobatch": "1.0", "dtype": "float16", "memory_budget_bytes": 2**31, "latency_budget_s": 0.1,
        "max_batch": 512, "margin": 0.2, "knee_fraction": 0.95}
    assert cache_key(fields) == "e7c6aa713014020850f9"


def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text('{"format": "autobatch-tuning-cache", "version": 1, "entries": {tru')
    cache = TuningCache(path)
    with caplog.at_level(logging.WARNING, logger="autobatch.cache"):
        assert cache.get(KEY) is None
    assert "corrupt" in caplog.text
    cache.put(KEY, RESULT)
    assert json.loads(path.read_text())["format"] == "autobatch-tuning-cache"
    assert cache.get(KEY) == RESULT


def test_foreign_format_is_ignored_and_rewritten(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"resnet50": 64}))  # somebody else's JSON
    cache = TuningCache(path)
    with caplog.at_level(logging.WARNING, logger="autobatch.cache"):
        assert cache.get(KEY) is None
    assert "not an autobatch cache" in caplog.text
    cache.put(KEY, RESULT)
    assert cache.get(KEY) == RESULT and "resnet50" not in json.loads(path.read_text())


def test_an_entry_whose_stored_fields_differ_is_never_returned(tmp_path):
    """Even under the right hash, an entry written for another device is not handed out."""
    path = tmp_path / "c.json"
    cache = TuningCache(path)
    cache.put(KEY, RESULT)
    data = json.loads(path.read_text())
    entry = data["entries"][cache_key(KEY)]
    entry["key_fields"]["device"]["name"] = "NVIDIA A10G"
    path.write_text(json.dumps(data))
    assert cache.get(KEY) is None


def _writer(path: str, worker: int, count: int) -> None:
    cache = TuningCache(path)
    for i in range(count):
        cache.put({**KEY, "worker": worker, "i": i}, replace(RESULT, tuned_at=f"worker {worker} write {i}"))


def test_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "c.json")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    cache = TuningCache(path)
    assert len(cache.entries()) == 60
    for w in range(4):
        for i in range(15):
            assert cache.get({**KEY, "worker": w, "i": i}).tuned_at == f"worker {w} write {i}"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tuning-")]  # no temporary files left


def test_cache_hit_from_the_cli_imports_no_torch(tmp_path):
    """A second identical `autobatch tune` answers from the cache without loading anything heavy."""
    from optimizer.devices import cpu_fingerprint
    from optimizer.simulated import SimulatedDevice
    from optimizer.tune import autobatch
    from deployments.registry import create_spec

    spec = create_spec("resnet50")
    settings = TuningSettings(device="cpu", memory_budget_bytes=3 * 2**30, latency_budget_s=0.5, max_batch=8)
    # A whole tuning under this CPU's key, measured in milliseconds on a simulated device wearing the
    # CPU's fingerprint: a cache hit is checked against its key and its own probes before it is served.
    device = SimulatedDevice(lambda b: 2**30 + 2**20 * b, lambda b: 0.1 + 0.001 * b,
                             capacity_bytes=cpu_fingerprint().total_memory_bytes)
    device.fingerprint = cpu_fingerprint()
    autobatch(spec, settings, cache=TuningCache(tmp_path / "c.json"), meter=device, run_batch=device.run,
              say=lambda line: None)
    script = (
        "import sys, json\n"
        "from autobatch.cli import main\n"
        f"rc = main(['tune', 'resnet50', '--device', 'cpu', '--memory-budget-mb', '3072', '--latency-budget-ms', '500',"
        f" '--max-batch', '8', '--cache', {str(tmp_path / 'c.json')!r}, '--json'])\n"
        "print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = Tuning.from_dict(json.loads(done.stdout))
    assert answer.cache == "hit" and answer.batch_size == 8
    assert "TORCH_IMPORTED False" in done.stderr


def test_an_entry_this_version_cannot_read_is_a_miss_with_one_warning(tmp_path, caplog):
    """An older shape (a plain result dict) or a hand edit: tune again, never crash, warn once."""
    path = tmp_path / "c.json"
    cache = TuningCache(path)
    cache.put(KEY, RESULT)
    data = json.loads(path.read_text())
    data["entries"][cache_key(KEY)]["result"] = {"model": "resnet50", "max_safe_batch": 256, "batch_size": 64}
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="autobatch.cache"):
        assert cache.get(KEY) is None
        assert cache.get(KEY) is None
    warnings = [r for r in caplog.records if "not a tuning this version can use" in r.getMessage()]
    assert len(warnings) == 1 and "is missing" in warnings[0].getMessage()
    cache.put(KEY, RESULT)  # the re-tuned answer replaces it
    assert cache.get(KEY) == RESULT


def test_a_cache_file_of_the_previous_version_is_tuned_again_not_an_error(tmp_path, caplog):
    path = tmp_path / "c.json"
    old = {"format": "autobatch-tuning-cache", "version": 1, "entries": {cache_key(KEY): {
        "key_fields": KEY, "result": {"model": "resnet50", "max_safe_batch": 256, "batch_size": 64}}}}
    path.write_text(json.dumps(old))
    cache = TuningCache(path)
    with caplog.at_level(logging.WARNING, logger="autobatch.cache"):
        assert cache.get(KEY) is None
    assert "not an autobatch cache of version 2" in caplog.text
    cache.put(KEY, RESULT)
    assert cache.get(KEY) == RESULT and json.loads(path.read_text())["version"] == 2


def test_the_file_holds_the_tuning_without_where_this_copy_came_from(tmp_path):
    path = tmp_path / "c.json"
    cache = TuningCache(path)
    cache.put(KEY, RESULT.with_source("hit", "somekey"))
    stored = json.loads(path.read_text())["entries"][cache_key(KEY)]["result"]
    assert stored == json.loads(json.dumps(RESULT.stored()))
    assert not {"cache", "key", "probe_count", "from_cache"} & set(stored)
    assert cache.get(KEY) == RESULT and cache.get(KEY).cache == "miss"
