"""The batch settings a replica hands to @serve.batch and the layers of its configuration, without Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest
from serve_helpers import make_tuning

from optimizer.wait import LearntWait
from serve.replica.faults import TEST_SWITCH, Faults
from serve.replica.settings import TUNING_KEYS, Pins, ReplicaConfig, ReplicaSettings, effective_settings, parse_user_config

TUNED = make_tuning(batch_size=8, batch_wait_timeout_s=0.010)
LEARNT = LearntWait(0.003, "the requests of a batch arrived within 1.0 ms of each other")


def test_the_tuning_holds_when_nothing_overrides_it():
    s = effective_settings(TUNED, Pins(), oom_cap=None, max_ongoing=16, served_wait=None)
    assert (s.size, s.wait_s, s.reasons) == (8, 0.010, ())


def test_a_pinned_size_wins_over_the_tuned_one():
    s = effective_settings(TUNED, Pins(batch_size=12), None, 16, None)
    assert s.size == 12 and s.reasons == ("pinned by user_config batch_size=12",)


def test_an_oom_while_serving_caps_the_size_even_a_pinned_one():
    s = effective_settings(TUNED, Pins(batch_size=12), oom_cap=6, max_ongoing=16, served_wait=None)
    assert s.size == 6
    assert s.reasons == ("pinned by user_config batch_size=12", "lowered to 6 after an out-of-memory while serving")
    assert effective_settings(TUNED, Pins(), oom_cap=10, max_ongoing=16, served_wait=None).size == 8  # above: no cap


def test_max_ongoing_requests_caps_the_size_and_says_how_to_lift_it():
    s = effective_settings(TUNED, Pins(), None, max_ongoing=5, served_wait=None)
    assert s.size == 5
    assert s.reasons == ("capped at max_ongoing_requests=5 (a batch cannot be larger); raise it to serve 8",)
    assert effective_settings(TUNED, Pins(), None, max_ongoing=None, served_wait=None).size == 8  # unknown: no cap


def test_the_wait_is_pinned_over_served_over_tuned():
    pinned = effective_settings(TUNED, Pins(batch_wait_timeout_ms=25.0), None, 16, LEARNT)
    assert pinned.wait_s == pytest.approx(0.025)
    assert pinned.reasons == ("wait pinned by user_config batch_wait_timeout_ms=25.0",)
    served = effective_settings(TUNED, Pins(), None, 16, LEARNT)
    assert served.wait_s == 0.003
    assert served.reasons == ("wait re-derived from served batches: the requests of a batch arrived within 1.0 ms "
                              "of each other",)
    assert effective_settings(TUNED, Pins(), None, 16, None).wait_s == 0.010


def test_a_user_config_overrides_the_builder_and_falls_back_to_it_not_to_an_earlier_user_config():
    builder = ReplicaConfig(model="resnet50", latency_budget_ms=400, max_batch=4)
    first = builder.with_user_config({"latency_budget_ms": 250, "batch_size": 3, "retune": 1})
    assert (first.latency_budget_ms, first.max_batch, first.pins, first.retune) == (250, 4, Pins(3, None), 1)
    assert first.tuning_changes(builder) == ["latency_budget_ms"]
    second = builder.with_user_config({"max_batch": 8.0})
    assert (second.latency_budget_ms, second.max_batch, second.pins, second.retune) == (400, 8, Pins(), None)
    assert second.tuning_changes(first) == ["latency_budget_ms", "max_batch"]
    settings = second.tuning_settings("cpu")
    assert settings.latency_budget_s == pytest.approx(0.4) and settings.max_batch == 8 and settings.device == "cpu"
    with pytest.raises(ValueError, match="unknown user_config key"):
        builder.with_user_config({"batchsize": 4})


def test_the_replica_settings_are_declared_once_and_placed_per_replica():
    """ReplicaSettings is the builder's declaration; a replica adds where it runs and the user_config
    layer. The user_config keys that re-tune are the fields marked LIVE, in the order they always had."""
    assert TUNING_KEYS == ("latency_budget_ms", "memory_fraction", "max_batch")
    settings = ReplicaSettings(model="resnet50", max_batch=16, options={"overlap": False})
    config = ReplicaConfig.placed(settings, gpu_share=0.5, cpu_share=0.25)
    assert isinstance(config, ReplicaSettings) and {**dict(config), **dict(settings)} == dict(config)
    assert (config.gpu_share, config.cpu_share, config.max_batch, config.options) == (0.5, 0.25, 16, {"overlap": False})
    with pytest.raises(ValueError, match="max_batch"):
        ReplicaSettings(model="resnet50", max_batch=0)


def test_faults_are_refused_unless_the_test_switch_is_on(monkeypatch):
    monkeypatch.delenv(TEST_SWITCH, raising=False)
    with pytest.raises(ValueError, match=f"only where the replica's environment sets {TEST_SWITCH}=1"):
        parse_user_config({"faults": {"oom_above": 1}})
    assert parse_user_config({"batch_size": 2})["batch_size"] == 2 and Faults.from_config(None) == Faults()
    monkeypatch.setenv(TEST_SWITCH, "1")
    config = ReplicaConfig(model="resnet50").with_user_config({"faults": {"poison_header": "X-Poison"}})
    assert config.faults.describe() == {"poison_header": "x-poison"}
    with pytest.raises(ValueError, match="unknown fault"):
        parse_user_config({"faults": {"explode": 1}})


def test_the_settings_and_the_wait_controller_import_no_ray():
    code = "import sys, serve.replica.settings, optimizer.wait; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
