"""Several GPUs in one host (issue 21, item 2), checked on this CPU with GPU counts Ray is told.

serve_config.yaml as it is, built by serve.app:build on a cluster of N cards: every model app gets
one replica per card of its share (num_gpus 0.25), so the four apps fill every card, and their
memory budgets add up per card (serve/replica/budgets.py). `replicas_per_gpu: k` gives k replicas of 1/k
per card. Ray itself then places them: a local Ray started with `num_gpus=2` (no card behind it;
the actors only ask for the shares and report the GPU ids Ray gave them) puts the replicas of the
config on both cards, each card's shares summing to one. All the replicas of one GPU type have one
tuning key (the card's index and uuid are not in it), so one tunes and the others take its answer
(serve/replica/single_flight.py; tests/test_cluster_single_flight.py runs that across two nodes).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

import serve.app as app_module
from serve.replica.budgets import MAX_TOTAL_FRACTION, app_replicas, check_memory_shares

pytestmark = pytest.mark.timeout(300)

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve_config.yaml").read_text())
MODEL_APPS = [a for a in CONFIG["applications"] if a["import_path"] == "serve.app:build"]


def built(args: dict, cards: float, monkeypatch):
    monkeypatch.setattr(app_module, "cluster_gpus", lambda resources=None: cards)
    return app_module.build(dict(args))._bound_deployment


@pytest.mark.parametrize("cards", [1, 2, 8])
def test_serve_config_puts_every_model_app_on_every_card(cards, monkeypatch):
    for app in MODEL_APPS:
        d = built(app["args"], cards, monkeypatch)
        assert d.num_replicas == cards, app["name"]
        assert d.ray_actor_options["num_gpus"] == app["args"]["num_gpus"] == 0.25
    total_share = sum(app["args"]["num_gpus"] * cards for app in MODEL_APPS)
    assert total_share == pytest.approx(cards)  # the four apps' replicas fill the cards, no more
    fractions = check_memory_shares(CONFIG["applications"], "cuda", 16, devices=cards)
    assert sum(fractions.values()) <= MAX_TOTAL_FRACTION * cards + 1e-9
    assert fractions["resnet50"] == pytest.approx(0.22 * cards)


def test_replicas_per_gpu_fills_each_card_and_budgets_count_them(monkeypatch):
    args = {"model": "resnet50", "replicas_per_gpu": 2}
    d = built(args, 4, monkeypatch)
    assert d.num_replicas == 8 and d.ray_actor_options["num_gpus"] == 0.5
    assert app_replicas(args, "cuda", devices=4) == 8 and app_replicas(args, "cpu", devices=4) == 1
    assert check_memory_shares([{"name": "r", "args": args}], "cuda", 16, devices=4) == {"r": pytest.approx(0.9 * 4)}
    auto = {**args, "num_replicas": "auto"}
    d = built(auto, 4, monkeypatch)
    assert d._deployment_config.autoscaling_config.max_replicas == 8  # scales up to filling every card
    assert app_replicas(auto, "cuda", devices=4) == 8
    assert app_replicas({**auto, "autoscaling_config": {"max_replicas": 3}}, "cuda", devices=4) == 3
    assert built({**args, "num_replicas": 3}, 4, monkeypatch).num_replicas == 3  # a fixed count wins


def test_all_cards_of_one_gpu_type_share_one_tuning_key():
    from deployments.registry import create_spec
    from optimizer.devices import DeviceFingerprint
    from optimizer.tune import resolve
    from serve.replica.settings import ReplicaConfig

    spec = create_spec("resnet50")
    settings = ReplicaConfig(model="resnet50", gpu_share=0.25, memory_fraction=0.22).tuning_settings("cuda")

    def card(index: int, name: str = "NVIDIA H100 80GB HBM3"):
        fp = DeviceFingerprint(kind="cuda", name=name, total_memory_bytes=85_045_379_072, index=index,
                               uuid=f"GPU-{index}", driver_version="580", cuda_version="13.0", torch_version="2.14.1")
        return resolve(spec, settings, fp).key_fields(spec)

    assert card(0) == card(1) == card(7)  # one tuning for the host's eight cards
    assert card(0) != card(0, name="NVIDIA H200")  # another type tunes once more


def test_ray_places_the_config_on_every_card_of_a_two_gpu_host():
    """The replicas' actor options as the builder makes them, placed by a real Ray told of 2 GPUs."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, resources={"gpu_h100": 2}, include_dashboard=False)
    try:
        assert app_module.cluster_gpus() == 2 and app_module.cluster_gpus({"gpu_h100": 1}) == 2
        assert app_module.cluster_gpus({"gpu_h200": 1}) == 0  # no node of that kind: no cards to place on

        @ray.remote
        class Replica:
            def where(self):
                return [str(i) for i in ray.get_gpu_ids()]

        def place(apps: list[dict]) -> dict[str, list[tuple[str, float]]]:
            actors, shares = [], []
            for app in apps:
                where = app_module.placement(app_module.AppArgs.model_validate({**app["args"], "num_cpus": 0}))
                for _ in range(where.replicas):
                    actors.append((app["name"], Replica.options(**where.actor_options).remote()))
                    shares.append(where.actor_options["num_gpus"])
            cards = defaultdict(list)
            for (name, actor), share in zip(actors, shares):
                ids = ray.get(actor.where.remote(), timeout=60)
                assert len(ids) == 1, ids  # a share of one card, never of two
                cards[ids[0]].append((name, share))
            for _, actor in actors:
                ray.kill(actor)
            return cards

        cards = place(MODEL_APPS)
        assert sorted(cards) == ["0", "1"], cards  # every card is used
        assert all(sum(share for _, share in held) == pytest.approx(1.0) for held in cards.values()), cards
        assert sorted(name for held in cards.values() for name, _ in held) == sorted([a["name"] for a in MODEL_APPS] * 2)
    finally:
        ray.shutdown()
