"""`serve.app:build(args)`: the Ray Serve application builder for one model.

In serve_config.yaml:

    applications:
      - name: resnet50
        route_prefix: /resnet50
        import_path: serve.app:build
        args: {model: resnet50, latency_budget_ms: 500, max_batch: 64, num_cpus: 0.25, num_gpus: 0.25}

or from a shell: `serve run serve.app:build model=resnet50 device=cpu`.

With device auto the replica asks for `num_gpus` (a share of one card) when the cluster has GPUs
and for CPUs only otherwise, so one config serves on both. On a GPU cluster an app gets one replica
per card by default (its share of every card: apps whose shares fit one card fit all of them), k per
card with `replicas_per_gpu: k`; elsewhere one. max_ongoing_requests defaults to twice the largest
batch the tuning may choose (one batch computing, the next filling): Ray's default of 5 would
silently cap every batch at 5.

`num_replicas: auto` (or an `autoscaling_config`) scales the app with Ray Serve's autoscaler between
min_replicas (1) and max_replicas (default: the per-card count above, which fills the cards this
app has a share of), by the target its tuned replicas derive (serve/replica/autoscaling.py) unless the
autoscaling_config sets target_ongoing_requests.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from deployments.registry import model_names

from .replica.autoscaling import autoscaling_config as deployment_autoscaling_config
from .cluster.deployment import AutobatchDeployment
from .replica.settings import ReplicaSettings, parse_user_config

log = logging.getLogger("ray.serve")

BACKPRESSURE_RETRY_AFTER_S = 1.0
# A replica whose process died is noticed by the controller's health check (Ray's default period is
# 10 s: a killed replica's route then waited ~15 s for its replacement); the check is a cheap call.
HEALTH_CHECK_PERIOD_S = 2.0


class AppArgs(ReplicaSettings):
    """The builder's arguments: the replica's settings (serve/replica/settings.py's ReplicaSettings) and where
    the replicas go; an unknown key is an error that lists the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    max_queued_requests: int | None = Field(None, ge=-1, description="requests Ray Serve's proxy holds for this app "
                                            "while every replica is at max_ongoing_requests (starting, restarting); "
                                            "past it: 503 with Retry-After. Default: max_ongoing_requests; -1: no bound")
    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(None, description=(
        "replicas; default: one per card on a GPU cluster (replicas_per_gpu per card when given), else 1; "
        "auto: Ray Serve's autoscaler, the target derived from the tuning (serve/replica/autoscaling.py)"))
    autoscaling_config: dict | None = Field(None, description=(
        "Ray Serve autoscaling_config keys (min_replicas, max_replicas, upscale_delay_s, downscale_delay_s, "
        "look_back_period_s, target_ongoing_requests, ...): implies num_replicas auto; target_ongoing_requests "
        "left out is derived from each replica's tuning, max_replicas left out fills the cards"))
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (fractions allowed)")
    num_gpus: float = Field(1.0, gt=0, le=1, description="share of one GPU per replica, used when it runs on a GPU")
    replicas_per_gpu: int | None = Field(None, ge=1, le=16, description=(
        "on a GPU cluster: k replicas of this model per card, each asking 1/k of a GPU (num_gpus) and "
        "tuning within 1/k of its memory, so all k share one cached tuning (the same key: the same "
        "device, model and budget); num_replicas defaults to k per card of the cluster (the max_replicas "
        "of num_replicas auto). For a model whose per-request host "
        "work (HTTP, decode) keeps one replica from feeding the card"))
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per replica, to place "
                                        "replicas on a kind of node (e.g. {\"gpu_type_h200\": 1}); see docs/cluster.md")
    user_config: dict | None = Field(None, description="initial user_config (see serve/replica/settings.py)")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in model_names():
            raise ValueError(f"unknown model {value!r}; choose one of: {', '.join(model_names())}")
        return value

    @model_validator(mode="after")
    def _one_gpu_share(self):
        if self.replicas_per_gpu is not None and "num_gpus" in self.model_fields_set \
                and abs(self.num_gpus * self.replicas_per_gpu - 1) > 1e-9:
            raise ValueError(f"num_gpus {self.num_gpus} and replicas_per_gpu {self.replicas_per_gpu} disagree; "
                             f"give one of them (replicas_per_gpu k means num_gpus 1/k)")
        return self

    @model_validator(mode="after")
    def _fixed_or_auto(self):
        if self.autoscaling_config is not None and self.num_replicas not in (None, "auto"):
            raise ValueError(f"num_replicas {self.num_replicas} and an autoscaling_config disagree; "
                             f"give num_replicas auto (or leave it out) to autoscale, or drop the autoscaling_config")
        deployment_autoscaling_config(self.autoscaling_config, 1)  # validates its keys
        return self

    @property
    def autoscales(self) -> bool:
        return self.num_replicas == "auto" or self.autoscaling_config is not None

    @field_validator("user_config")
    @classmethod
    def _valid_user_config(cls, value):
        parse_user_config(value)
        return value


def cluster_gpus(resources: dict | None = None) -> float:
    """GPUs in the Ray cluster, counting only the nodes that have every custom resource in
    `resources` (the kind of node the app is placed on); 0 when Ray is not running here."""
    import ray

    if not ray.is_initialized():
        return 0.0
    try:
        if not resources:
            return float(ray.cluster_resources().get("GPU", 0))
        return float(sum(n["Resources"].get("GPU", 0) for n in ray.nodes()
                         if n.get("Alive") and all(key in n["Resources"] for key in resources)))
    except Exception:  # noqa: BLE001
        return 0.0


@dataclass(frozen=True)
class Placement:
    """Where an app's replicas go: `actor_options` for one replica, `replicas` the fixed count (the
    default max_replicas under autoscaling), `cards` the GPUs they may use (0 off GPU)."""

    actor_options: dict
    replicas: int
    cards: int
    per_card: int

    def describe(self, model: str) -> str:
        if not self.cards:
            return f"{model}: {self.replicas} replica(s) on CPUs ({self.actor_options['num_cpus']:g} CPU each)"
        return (f"{model}: {self.replicas} replica(s), {self.per_card} per card on {self.cards} card(s), "
                f"{self.actor_options['num_gpus']:g} GPU each")


def placement(args: AppArgs) -> Placement:
    """A GPU share per replica where the replica will run on a GPU, and the replicas that put this
    app on every card: one per card, or replicas_per_gpu k per card of 1/k each."""
    gpus = cluster_gpus(args.resources)
    if args.device == "cuda" and gpus == 0 and __import__("ray").is_initialized():
        raise ValueError(f"{args.model}: device cuda was asked for, but the Ray cluster has no GPUs"
                         f"{' on the nodes with resources ' + str(sorted(args.resources)) if args.resources else ''}; "
                         f"use device auto or cpu")
    on_gpu = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    options: dict = {"num_cpus": args.num_cpus, "num_gpus": 0}
    if args.resources:
        options["resources"] = dict(args.resources)
    if not on_gpu:
        fixed = args.num_replicas if isinstance(args.num_replicas, int) else 1
        return Placement(options, fixed, 0, 0)
    cards = max(1, math.floor(gpus + 1e-9))
    per_card = args.replicas_per_gpu or 1
    options["num_gpus"] = 1.0 / per_card if args.replicas_per_gpu else args.num_gpus
    fixed = args.num_replicas if isinstance(args.num_replicas, int) else cards * per_card
    return Placement(options, fixed, cards, per_card)


def build(args: AppArgs):
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args or {}))
    where = placement(args)
    actor_options = where.actor_options
    max_ongoing = args.max_ongoing_requests or max(8, 2 * args.max_batch)
    cache_path = os.path.expanduser(args.cache_path) if args.cache_path else None
    scaling = deployment_autoscaling_config(args.autoscaling_config, where.replicas) if args.autoscales else None
    if scaling:
        target = scaling.get("target_ongoing_requests")
        log.info("autobatch: %s; autoscaling %d..%d replicas, target %s", where.describe(args.model),
                 scaling["min_replicas"], scaling["max_replicas"],
                 f"target_ongoing_requests {target:g} (autoscaling_config)" if target else
                 "derived from each replica's tuning (served batch x device slots)")
    else:
        log.info("autobatch: %s", where.describe(args.model))
    deployment = AutobatchDeployment.options(
        name=args.model,
        **({"autoscaling_config": scaling} if scaling else {"num_replicas": where.replicas}),
        max_ongoing_requests=max_ongoing,
        # The replicas bound their own queues once tuned (serve/replica/admission.py); this bound is the proxy's,
        # fixed before any tuning exists. Ray answers past it with a plain-text 503 and this Retry-After.
        max_queued_requests=args.max_queued_requests if args.max_queued_requests is not None else max_ongoing,
        backpressure_config={"status_code": 503, "retry_after_s": BACKPRESSURE_RETRY_AFTER_S},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options=actor_options,
        user_config=args.user_config,
    )
    settings = ReplicaSettings(**{**{name: getattr(args, name) for name in ReplicaSettings.model_fields},
                                  "cache_path": cache_path, "max_ongoing_requests": max_ongoing})
    return deployment.bind(settings, gpu_share=actor_options["num_gpus"] or 1.0)
