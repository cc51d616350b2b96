"""The Tuning: JSON round trips, what the cache keeps, and from_dict refusing anything it cannot
trust (the cache turns a refusal into a re-tune). Plus tune_on, the pure core, against autobatch()."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from tuning_samples import MiB, SimulatedModel, simulated_tuning

from optimizer.simulated import SimulatedDevice
from optimizer.probe import OK, PREDICTED, ProbeResult
from optimizer.tuning import CACHED, MEASURED, TUNING_FIELDS, DeviceInfo, MemoryFit, Tuning, TuningFormatError

TUNING = simulated_tuning()


def data(**changes) -> dict:
    """TUNING as JSON would hand it back, with fields replaced."""
    return {**json.loads(json.dumps(TUNING.to_dict())), **changes}


def test_the_sample_is_a_real_decision():
    assert TUNING.max_safe_batch == 196 and TUNING.stopped_by == "latency"
    assert 1 <= TUNING.batch_size <= TUNING.max_safe_batch
    assert isinstance(TUNING.device, DeviceInfo) and isinstance(TUNING.memory_fit, MemoryFit)
    assert all(isinstance(p, ProbeResult) for p in TUNING.probes)


def test_round_trip_through_json_is_exact():
    for tuning in (TUNING, TUNING.with_source(CACHED, "abc123"), dataclasses.replace(TUNING, memory_fit=None,
                                                                                       batch1_throughput=None,
                                                                                       latency_budget_s=None)):
        assert Tuning.from_dict(json.loads(json.dumps(tuning.to_dict()))) == tuning


def test_to_dict_has_every_field_and_the_derived_ones():
    out = TUNING.with_source(CACHED, "abc123").to_dict()
    assert set(TUNING_FIELDS) | {"probe_count", "from_cache"} == set(out)
    assert out["probe_count"] == sum(p.outcome != PREDICTED for p in TUNING.probes) == TUNING.probe_count
    assert out["from_cache"] is True and out["cache"] == "hit" and out["key"] == "abc123"
    assert out["device"] == {"kind": "sim", "name": TUNING.device.name, "total_memory_bytes": 16000 * MiB,
                             "label": TUNING.device.label}
    assert out["probes"][0] == TUNING.probes[0].to_dict()


def test_stored_drops_where_this_copy_came_from():
    stored = TUNING.with_source(CACHED, "abc123").stored()
    assert not {"cache", "key", "probe_count", "from_cache"} & set(stored)
    back = Tuning.from_dict(stored)
    assert back == TUNING.with_source(MEASURED, "") and not back.from_cache


def test_source_and_derived_properties():
    hit = TUNING.with_source(CACHED, "k")
    assert hit.from_cache and not TUNING.from_cache and hit.key == "k"
    assert hit.batch_size == TUNING.batch_size  # with_source changes nothing else
    assert TUNING.ok_sizes() == [p.batch_size for p in TUNING.probes if p.outcome == OK]


def test_a_tuning_and_its_probes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TUNING.batch_size = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TUNING.probes[0].outcome = "oom"  # type: ignore[misc]


REQUIRED = [name for name in TUNING_FIELDS if name not in ("cache", "key")]


@pytest.mark.parametrize("name", REQUIRED)
def test_from_dict_refuses_a_missing_field(name):
    broken = data()
    del broken[name]
    with pytest.raises(TuningFormatError, match=f"'{name}' is missing"):
        Tuning.from_dict(broken)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 7.5}, "batch_size must be a whole number"),
    ({"max_safe_batch": "196"}, "max_safe_batch must be a number"),
    ({"batch_size": True}, "batch_size must be a number"),
    ({"latency_budget_s": False}, "latency_budget_s must be a number"),
    ({"serve_throughput": float("nan")}, "serve_throughput must be finite"),
    ({"batch_wait_timeout_s": float("inf")}, "batch_wait_timeout_s must be finite"),
    ({"memory_budget_bytes": None}, "memory_budget_bytes must be a number"),
    ({"model": 50}, "model must be a string"),
    ({"decision": None}, "decision must be a string"),
    ({"device": "cpu"}, "device must be an object"),
    ({"memory_fit": [1, 2]}, "expected an object"),
    ({"probes": {"1": {}}}, "probes and notes must be lists"),
    ({"notes": "one note"}, "probes and notes must be lists"),
    ({"notes": [1]}, "notes must be strings"),
])
def test_from_dict_refuses_wrong_types(changes, message):
    with pytest.raises(TuningFormatError, match=message):
        Tuning.from_dict(data(**changes))


def test_from_dict_refuses_a_nan_that_came_through_json_text():
    text = json.dumps(TUNING.to_dict()).replace(f'"tuning_s": {json.dumps(TUNING.tuning_s)}', '"tuning_s": NaN')
    assert "NaN" in text
    with pytest.raises(TuningFormatError, match="tuning_s must be finite"):
        Tuning.from_dict(json.loads(text))


@pytest.mark.parametrize("probe_changes, message", [
    ({"batch_size": 7.5}, "batch_size must be a whole number"),
    ({"batch_size": True}, "batch_size must be a number"),
    ({"outcome": "fine"}, "probe outcome must be one of"),
    ({"latency_s": float("nan")}, "latency_s must be finite"),
    ({"peak_bytes": "1 GiB"}, "peak_bytes must be a number"),
])
def test_from_dict_refuses_a_malformed_probe(probe_changes, message):
    broken = data()
    broken["probes"][0] = {**broken["probes"][0], **probe_changes}
    with pytest.raises(TuningFormatError, match=message):
        Tuning.from_dict(broken)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ProbeResult) if f.name != "period_s"])
def test_from_dict_refuses_a_probe_missing_a_field(name):
    broken = data()
    del broken["probes"][0][name]
    with pytest.raises(TuningFormatError, match=f"'{name}' is missing"):
        Tuning.from_dict(broken)


def test_a_probe_stored_before_batches_overlapped_reads_as_not_overlapped():
    old = data()
    del old["probes"][0]["period_s"]
    assert Tuning.from_dict(old).probes[0].period_s is None


def test_from_dict_refuses_what_is_not_an_object():
    for value in (None, [], "tuning", 3):
        with pytest.raises(TuningFormatError, match="must be a JSON object"):
            Tuning.from_dict(value)
    broken = data()
    broken["device"] = {**broken["device"], "total_memory_bytes": 1.5}
    with pytest.raises(TuningFormatError, match="total_memory_bytes must be a whole number"):
        Tuning.from_dict(broken)


def test_from_dict_accepts_ints_for_floats_and_whole_floats_for_ints():
    back = Tuning.from_dict(data(latency_budget_s=1, batch_size=4.0))
    assert back.latency_budget_s == 1.0 and isinstance(back.latency_budget_s, float)
    assert back.batch_size == 4 and isinstance(back.batch_size, int)


def test_tune_on_decides_what_autobatch_decides_and_logs_every_number(tmp_path):
    """autobatch() is tune_on plus cache, lock and loading: on the same simulated device both
    reach the same sizes, and the log names the budgets, the decision and the counts."""
    from optimizer.cache import TuningCache
    from optimizer.tune import TuningSettings, autobatch


    device = SimulatedDevice(lambda b: 1000 * MiB + 4 * MiB * b, lambda b: 0.004 + 0.001 * b, capacity_bytes=16000 * MiB)
    lines: list[str] = []
    settings = TuningSettings(memory_budget_bytes=2000 * MiB, max_batch=256, repeats=1)
    tuned = autobatch(SimulatedModel(default_latency_budget_s=0.2), settings, cache=TuningCache(tmp_path / "c.json"), meter=device,
                      run_batch=device.run, say=lines.append)
    assert (tuned.max_safe_batch, tuned.batch_size, tuned.stopped_by) == (
        TUNING.max_safe_batch, TUNING.batch_size, TUNING.stopped_by)
    assert [p.batch_size for p in tuned.probes] == [p.batch_size for p in TUNING.probes]
    assert tuned.cache == MEASURED and tuned.key and tuned.model == "sim-model" and tuned.weights == "simulated"
    text = "\n".join(lines)
    assert "memory budget 1.95 GiB" in text and "latency budget 200 ms per batch" in text
    assert f"max safe batch {tuned.max_safe_batch} (bounded by latency)" in text
    assert f"serving batch {tuned.batch_size}" in text and "batch wait" in text
    assert f"{tuned.probe_count} probes ({tuned.search_probe_count} in the search)" in text
    assert math.isclose(tuned.latency_budget_s, 0.2) and tuned.tuning_s > 0
