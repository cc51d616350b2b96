"""Memory budgets add up (issue 15, item 5): serve_config.yaml's apps together stay within the
device, a config that does not is refused with what to change, and a replica left without a
memory_fraction budgets its CPU or GPU share, not half the machine."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.replica.budgets import MAX_TOTAL_FRACTION, BudgetError, check_memory_shares
from serve.replica.settings import ReplicaConfig, memory_fraction_for

CONFIG_PATH = Path(__file__).resolve().parent.parent / "serve_config.yaml"


@pytest.mark.parametrize("kind,node_cpus", [("cpu", 2), ("cpu", 64), ("cuda", 16)])
def test_serve_config_budgets_add_up_on_any_machine(kind, node_cpus):
    apps = yaml.safe_load(CONFIG_PATH.read_text())["applications"]
    fractions = check_memory_shares(apps, kind, node_cpus)
    assert set(fractions) == {app["name"] for app in apps}
    assert 0 < sum(fractions.values()) <= MAX_TOTAL_FRACTION
    assert fractions["oip"] == 0  # the router holds no model


def test_the_make_serve_launcher_refuses_a_config_over_the_machine(tmp_path):
    from serve.local import check_budgets, main

    config = yaml.safe_load(CONFIG_PATH.read_text())
    resnet = next(a for a in config["applications"] if a["name"] == "resnet50")
    resnet["args"]["num_replicas"] = 3  # 3 x 0.22 + 3 x 0.22 = 1.32
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(BudgetError, match="lower their memory_fraction"):
        check_budgets(str(path), 2)
    assert main([str(path)]) == 2  # refused before Ray starts


def test_default_shares_follow_ray_placement():
    apps = [{"name": f"a{i}", "args": {"model": "resnet50", "num_cpus": 0.5}} for i in range(4)]
    assert sum(check_memory_shares(apps, "cpu", 2).values()) == pytest.approx(0.9)
    with pytest.raises(BudgetError, match="num_cpus 0"):
        check_memory_shares([{"name": "z", "args": {"model": "resnet50", "num_cpus": 0}}], "cpu", 2)
    over = [{"name": n, "args": {"model": "resnet50", "memory_fraction": 0.5}} for n in ("big", "big2")]
    with pytest.raises(BudgetError, match="1.00 of the machine's RAM"):
        check_memory_shares(over, "cpu", 2)
    router = {"name": "oip", "args": {"models": ["big"], "num_cpus": 0.1}}  # tunes nothing: no budget
    assert check_memory_shares([router, over[0]], "cpu", 2) == {"oip": 0.0, "big": 0.5}


def test_replicas_per_gpu_count_as_k_replicas_on_a_card():
    """serve/app.py places replicas_per_gpu k as k replicas of 1/k of a card each: the card's budget
    counts all k, and a replica without a memory_fraction budgets 0.9 of its 1/k."""
    shared = [{"name": "r", "args": {"model": "resnet50", "replicas_per_gpu": 4, "memory_fraction": 0.3}}]
    with pytest.raises(BudgetError, match="1.20 of 1 GPU"):
        check_memory_shares(shared, "cuda", 16)
    default = [{"name": "r", "args": {"model": "resnet50", "replicas_per_gpu": 4}}]
    assert check_memory_shares(default, "cuda", 16) == {"r": pytest.approx(0.9)}
    # on a CPU machine replicas_per_gpu places nothing: one replica, as serve/app.py does there
    assert check_memory_shares([{"name": "r", "args": {**shared[0]["args"], "num_cpus": 1}}], "cpu", 2) == {"r": 0.3}


def test_a_replica_budgets_its_share_of_the_device():
    assert memory_fraction_for("cpu", None, 1.0, cpu_share=0.125) == pytest.approx(0.9 * 0.125)
    assert memory_fraction_for("cpu", 0.22, 1.0, cpu_share=0.125) == 0.22  # the app's own wins
    assert memory_fraction_for("cpu", None, 1.0, cpu_share=None) is None  # unknown: the optimizer's default
    settings = ReplicaConfig(model="resnet50", cpu_share=0.25).tuning_settings("cpu")
    assert settings.memory_fraction == pytest.approx(0.225)
