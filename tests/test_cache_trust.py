"""Nothing read from the tuning cache is trusted beyond what it can be (issue 15, item 3).

A poisoned entry is tuned again with a warning; an unreadable file is set aside and rebuilt; a
location that cannot be written or locked tunes in memory with one warning and never hangs. All on
the simulated device, so every tuning takes milliseconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from optimizer.cache import CacheUnavailable, TuningCache, cache_key
from optimizer.probe import OK, OVER_LATENCY
from optimizer.trust import check_against_key, check_tuning
from optimizer.tune import TuningSettings, autobatch, resolve
from optimizer.tuning import Tuning

try:
    from optimizer.simulated import SimulatedDevice
except ImportError:
    from optimizer.devices import SimulatedDevice

from tuning_samples import SimulatedModel  # noqa: E402

MiB = 2**20
SETTINGS = dict(memory_budget_bytes=2000 * MiB, latency_budget_s=0.2005, max_batch=256)


FakeSpec = SimulatedModel  # the tuner only needs a name, a signature and library versions


def field(result, name):
    """A field of what autobatch() returns, whether a result dict or a Tuning."""
    return result[name] if isinstance(result, dict) else getattr(result, name)


def as_tuning(result) -> Tuning:
    return Tuning.from_dict(result) if isinstance(result, dict) else result


def new_device(**curve):
    return SimulatedDevice(curve.get("memory", lambda b: 1000 * MiB + 4 * MiB * b),
                           curve.get("latency", lambda b: 0.004 + 0.001 * b), capacity_bytes=16000 * MiB)


def tune(cache, device=None, settings=None, **kw):
    device = device or new_device()
    return autobatch(FakeSpec(), settings or TuningSettings(**SETTINGS), cache=cache, meter=device,
                     run_batch=device.run, say=lambda line: None, **kw)


def key_fields(device=None, settings=None):
    device = device or new_device()
    return resolve(FakeSpec(), settings or TuningSettings(**SETTINGS), device.fingerprint).key_fields(FakeSpec())


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("autobatch") and text in r.getMessage()]


# -- a tuning the optimizer measured always passes ------------------------------------------------

CURVES = {
    "latency-bound": dict(),
    "memory-bound": dict(memory=lambda b: 1000 * MiB + 9 * MiB * b, latency=lambda b: 0.001 + 0.0001 * b),
    "oom-bound": dict(memory=lambda b: 1000 * MiB + 100 * MiB * b ** 1.5, latency=lambda b: 0.001 * b),
    "flat-cpu": dict(latency=lambda b: 0.02 * b),
    "batch-1-over-latency": dict(latency=lambda b: 0.5 + 0.1 * b),
    "max-batch-bound": dict(memory=lambda b: 1000 * MiB + MiB * b // 64, latency=lambda b: 0.001),
}


@pytest.mark.parametrize("curve", CURVES, ids=list(CURVES))
def test_every_tuning_the_optimizer_measures_is_trusted(tmp_path, curve):
    device = new_device(**CURVES[curve])
    capacity_settings = TuningSettings(memory_budget_bytes=2000 * MiB, latency_budget_s=0.2005, max_batch=256)
    tuning = as_tuning(tune(TuningCache(tmp_path / "c.json"), device, capacity_settings))
    assert check_against_key(tuning, key_fields(device, capacity_settings)) == []
    if curve == "batch-1-over-latency":  # the one answer with no size that ran within both budgets
        assert tuning.batch_size == tuning.max_safe_batch == 1 and tuning.probes[0].outcome == OVER_LATENCY


# -- poisoned entries: a warning and a re-tune, never served ---------------------------------------

def _poison(result: dict, poison: str) -> dict | str | None:
    r = json.loads(json.dumps(result))
    ok = [p["batch_size"] for p in r["probes"] if p["outcome"] == OK]
    changes = {
        "batch 10^9": {"batch_size": 10**9},
        "batch -5": {"batch_size": -5},
        "batch '7'": {"batch_size": "7"},
        "batch 7.5": {"batch_size": 7.5},
        "batch 0": {"batch_size": 0},
        "batch true": {"batch_size": True},
        "max safe 10^9": {"max_safe_batch": 10**9},
        "max safe above its probes": {"max_safe_batch": 250, "batch_size": 250},
        "batch not probed": {"batch_size": next(b for b in range(2, max(ok)) if b not in ok)},
        "batch above max safe": {"batch_size": r["max_safe_batch"] + 1},
        "wait 1e9": {"batch_wait_timeout_s": 1e9},
        "wait -1": {"batch_wait_timeout_s": -1.0},
        "wait NaN": {"batch_wait_timeout_s": float("nan")},
        "wait inf": {"batch_wait_timeout_s": float("inf")},
        "dtype": {"dtype": "float16"},
        "model": {"model": "resnet50"},
        "budget above the device": {"memory_budget_bytes": 10**15},
        "missing field": {"batch_size": None},
    }
    if poison == "probe over memory recorded ok":
        biggest = max(r["probes"], key=lambda p: p["batch_size"] if p["outcome"] == OK else 0)
        biggest["peak_bytes"] = 3 * r["memory_budget_bytes"]
        return r
    if poison == "probes say over latency":
        for p in r["probes"]:
            if p["batch_size"] == r["batch_size"]:
                p["outcome"] = OVER_LATENCY
        return r
    change = changes[poison]
    if change == {"batch_size": None}:
        del r["batch_size"]
        return r
    r.update(change)
    return r


POISONS = ["batch 10^9", "batch -5", "batch '7'", "batch 7.5", "batch 0", "batch true", "max safe 10^9",
           "max safe above its probes", "batch not probed", "batch above max safe", "wait 1e9", "wait -1",
           "wait NaN", "wait inf", "dtype", "model", "budget above the device",
           "missing field", "probe over memory recorded ok", "probes say over latency"]


@pytest.mark.parametrize("poison", POISONS)
def test_a_poisoned_entry_is_tuned_again_with_one_warning(tmp_path, caplog, poison):
    path = tmp_path / "c.json"
    first = tune(TuningCache(path))
    data = json.loads(path.read_text())
    entry = data["entries"][field(first, "key")]
    entry["result"] = _poison(entry["result"], poison)
    path.write_text(json.dumps(data))  # NaN and inf as JSON's NaN / Infinity, as a hand edit would

    cache, device = TuningCache(path), new_device()
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        again = tune(cache, device)
    assert field(again, "cache") == "miss" and device.runs, "the poisoned entry was served"
    assert len(warnings_of(caplog, "tuning again")) == 1, caplog.text
    assert field(again, "batch_size") == field(first, "batch_size")
    assert field(tune(cache), "cache") == "hit"  # the re-tuned entry replaced the poisoned one


def test_the_warning_lists_every_reason(tmp_path, caplog):
    path = tmp_path / "c.json"
    first = tune(TuningCache(path))
    data = json.loads(path.read_text())
    data["entries"][field(first, "key")]["result"].update(batch_size=10**9, batch_wait_timeout_s=1e9)
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        tune(TuningCache(path))
    [warning] = warnings_of(caplog, "tuning again")
    assert "batch_size 1000000000 is outside [1, max_batch 256]" in warning
    assert "batch_wait_timeout_s 1000000000.0 is outside [0, the latency budget" in warning


@pytest.mark.parametrize("entry", ["a string", "key_fields a string", "empty result", "no result"])
def test_a_malformed_entry_sets_the_file_aside_and_keeps_the_good_ones(tmp_path, caplog, entry):
    path = tmp_path / "c.json"
    cache = TuningCache(path)
    other_settings = TuningSettings(**{**SETTINGS, "max_batch": 64})
    tune(cache, settings=other_settings)  # a good entry under another key: it must survive
    first = tune(cache)
    data = json.loads(path.read_text())
    good = data["entries"][field(first, "key")]
    data["entries"][field(first, "key")] = {
        "a string": "a string", "key_fields a string": {**good, "key_fields": "KEY"},
        "empty result": {**good, "result": {}},
        "no result": {k: v for k, v in good.items() if k != "result"}}[entry]
    original = json.dumps(data)
    path.write_text(original)

    cache, device = TuningCache(path), new_device()
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert field(tune(cache, device), "cache") == "miss" and device.runs
    [warning] = warnings_of(caplog, "set aside as")
    aside = warning.split("set aside as ")[1].split(",")[0]
    assert os.path.basename(aside).startswith("c.json.corrupt-") and open(aside).read() == original
    assert field(tune(TuningCache(path), settings=other_settings), "cache") == "hit"
    assert field(tune(TuningCache(path)), "cache") == "hit"


UNREADABLE = {
    "binary": os.urandom(4096),
    "100k-deep JSON": b"[" * 100_000 + b"]" * 100_000,
    "100k-deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "truncated": b'{"format": "autobatch-tuning-cache", "version": 1, "entries": {tru',
    "a list": b"[1, 2, 3]",
    "a string": b'"autobatch"',
    "entries a list": json.dumps({"format": "autobatch-tuning-cache", "version": 1, "entries": []}).encode(),
    "foreign JSON": json.dumps({"resnet50": 64}).encode(),
    "empty": b"",
    "a 5000-digit number": b"1" * 5000,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content", UNREADABLE, ids=list(UNREADABLE))
def test_an_unreadable_file_is_set_aside_and_rebuilt(tmp_path, caplog, content):
    path = tmp_path / "c.json"
    path.write_bytes(UNREADABLE[content])
    cache = TuningCache(path)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert field(tune(cache), "cache") == "miss"
    [warning] = warnings_of(caplog, "set aside as")
    aside = warning.split("set aside as ")[1].split(",")[0]
    assert open(aside, "rb").read() == UNREADABLE[content]
    assert json.loads(path.read_text())["format"] == "autobatch-tuning-cache"  # rebuilt by the tuning's put
    assert field(tune(TuningCache(path)), "cache") == "hit"
    assert cache.unavailable is None


# -- locations that cannot be written or locked: in memory, one warning, no hang -------------------

def _locations(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "a-directory").mkdir()
    return {
        "/proc/x.json": f"/proc/autobatch-test-{os.getpid()}.json",
        "under /proc/self": "/proc/self/autobatch/tuning.json",
        "a directory": str(tmp_path / "a-directory"),
        "a parent that is a file": str(tmp_path / "a-file" / "tuning.json"),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["/proc/x.json", "under /proc/self", "a directory", "a parent that is a file"])
def test_an_unusable_location_tunes_in_memory_with_one_warning(tmp_path, caplog, where):
    path = _locations(tmp_path)[where]
    cache = TuningCache(path)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        first = tune(cache)
        second = tune(cache)  # the same process takes its own tuning from memory
    assert field(first, "cache") == "miss" and field(second, "cache") == "hit"
    assert len(warnings_of(caplog, "cannot be used")) == 1, caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1, caplog.text
    assert cache.unavailable
    assert list(cache.entries()) == [field(first, "key")]
    with pytest.raises(CacheUnavailable, match="cannot be changed.*AUTOBATCH_CACHE"):
        cache.delete()  # `autobatch cache clear` has nothing to change: it says so
    if where == "a directory":
        assert os.listdir(path) == [] and not os.path.exists(f"{path}.lock")  # nothing written in it or beside it


@pytest.mark.timeout(60)
def test_cache_show_and_clear_on_proc_answer_at_once(caplog):
    """`autobatch cache show|clear --cache /proc/x.json` used to wait on the lock file forever."""
    path = f"/proc/autobatch-test-{os.getpid()}.json"
    assert TuningCache(path).entries() == {}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        with pytest.raises(CacheUnavailable, match=r"lock file .*\.lock cannot be created"):
            TuningCache(path).delete()
    assert caplog.records == []  # the error is the one line `cache clear` prints


@pytest.mark.timeout(60)
def test_clear_on_a_directory_says_so_and_leaves_nothing_beside_it(tmp_path):
    with pytest.raises(CacheUnavailable, match="is a directory .name a file in it"):
        TuningCache(tmp_path).check_writable()
    assert not os.path.exists(f"{tmp_path}.lock")


_HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_a_lock_held_past_the_timeout_falls_back_to_memory(tmp_path, caplog):
    path = tmp_path / "c.json"
    tune(TuningCache(path))  # a valid entry: still read while the lock is held elsewhere
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cache = TuningCache(path, lock_timeout_s=0.2)
        with caplog.at_level(logging.WARNING, logger="autobatch"):
            assert field(tune(cache), "cache") == "hit"
            assert field(tune(cache, settings=TuningSettings(**{**SETTINGS, "max_batch": 64})), "cache") == "miss"
        [warning] = warnings_of(caplog, "cannot be used")
        assert "held by another process for over 0.2 s" in warning and "AUTOBATCH_CACHE_LOCK_TIMEOUT_S" in warning
    finally:
        holder.kill()
        holder.wait()
    assert len(json.loads(path.read_text())["entries"]) == 1  # nothing written without the lock


def test_the_lock_timeout_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOBATCH_CACHE_LOCK_TIMEOUT_S", "7.5")
    assert TuningCache(tmp_path / "c.json").lock_timeout_s == 7.5
    assert TuningCache(tmp_path / "c.json", lock_timeout_s=2).lock_timeout_s == 2


_READ_ONLY_CHILD = """
import logging, sys
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
from test_cache_trust import SETTINGS, TuningSettings, field, tune
from optimizer.cache import TuningCache
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("autobatch").addHandler(handler)
logging.getLogger("autobatch").setLevel(logging.WARNING)
cache = TuningCache(sys.argv[1])
other = TuningSettings(**{**SETTINGS, "max_batch": 64})
print(field(tune(cache), "cache"), field(tune(cache, settings=other), "cache"))
print(len(records), " | ".join(r.getMessage() for r in records))
"""


@pytest.mark.timeout(120)
def test_a_valid_cache_on_a_read_only_filesystem_still_hits(tmp_path):
    """A read-only bind mount in a private mount namespace (root only): nothing outside sees it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-o", "bind,ro", str(folder), str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip("needs unshare and mount (root) for a read-only bind mount")
    path = folder / "c.json"
    tune(TuningCache(path))
    os.unlink(f"{path}.lock")  # as shipped on a read-only image: the file, no lock file
    before = path.read_bytes()
    child = tmp_path / "child.py"
    child.write_text(_READ_ONLY_CHILD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"mount -o bind,ro {folder} {folder} || exit 2; touch {folder}/probe 2>/dev/null && exit 3; "
              f"exec {sys.executable} {child} {path} {root}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=100, cwd=root)
    assert done.returncode == 0, done.stderr
    caches, warnings = done.stdout.strip().splitlines()
    assert caches == "hit miss"  # the file's entry is served; a new key is tuned in memory
    count, text = warnings.split(" ", 1)
    assert count == "1" and "cannot be used" in text and "Read-only file system" in text, text
    assert path.read_bytes() == before


# -- check_tuning on its own ----------------------------------------------------------------------

def test_check_tuning_refuses_a_dict_it_cannot_parse():
    assert check_tuning({"batch_size": 7}, max_batch=8, latency_budget_s=0.1, memory_budget_bytes=1)
    assert check_tuning("7", max_batch=8, latency_budget_s=0.1, memory_budget_bytes=1) == [
        "a tuning must be a JSON object, got str"]


def test_check_tuning_compares_with_the_settings_asked_for(tmp_path):
    tuning = as_tuning(tune(TuningCache(tmp_path / "c.json")))
    args = dict(max_batch=256, latency_budget_s=0.2005, memory_budget_bytes=2000 * MiB)
    assert check_tuning(tuning, **args) == []
    assert tuning.max_safe_batch > 64  # so a max_batch of 64 is one the stored answer breaks
    expected = ["max_batch 256 is not the 64 asked for"]
    if tuning.batch_size > 64:  # the served size depends on where the knee fell
        expected.append(f"batch_size {tuning.batch_size} is outside [1, max_batch 64]")
    expected.append(f"max_safe_batch {tuning.max_safe_batch} is outside [1, max_batch 64]")
    assert check_tuning(tuning, **{**args, "max_batch": 64}) == expected
    assert any("memory budget" in r for r in check_tuning(tuning, **{**args, "memory_budget_bytes": 1000 * MiB}))
    assert check_tuning(tuning, **args, dtype="float16") == ["dtype 'float32' is not the 'float16' asked for"]


def test_cache_key_of_a_checked_hit_is_the_one_asked_for(tmp_path):
    """get_trusted checks against the key asked for, so a hand-copied entry under the right key is refused."""
    path = tmp_path / "c.json"
    small = TuningSettings(**{**SETTINGS, "max_batch": 64})
    tune(TuningCache(path), settings=small)
    data = json.loads(path.read_text())
    [entry] = data["entries"].values()
    big_key = key_fields()
    data["entries"][cache_key(big_key)] = {**entry, "key_fields": json.loads(json.dumps(big_key))}
    path.write_text(json.dumps(data))
    assert TuningCache(path).get_trusted(big_key) is None
