"""`serve.app:build(args)`: the Ray Serve application builder for one model.

In serve_config.yaml:

    applications:
      - name: resnet50
        route_prefix: /resnet50
        import_path: serve.app:build
        args: {model: resnet50, latency_budget_ms: 500, max_batch: 64, num_cpus: 0.25, num_gpus: 0.25}

or from a shell: `serve run serve.app:build model=resnet50 device=cpu`.

With device auto the replica asks for `num_gpus` (a share of one card) when the cluster has GPUs
and for CPUs only otherwise, so one config serves on both. max_ongoing_requests defaults to twice
the largest batch the tuning may choose (one batch computing, the next filling): Ray's default of 5
would silently cap every batch at 5.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.registry import model_names

from .deployment import AutobatchDeployment
from .settings import parse_user_config

BACKPRESSURE_RETRY_AFTER_S = 1.0
# A replica whose process died is noticed by the controller's health check (Ray's default period is
# 10 s: a killed replica's route then waited ~15 s for its replacement); the check is a cheap call.
HEALTH_CHECK_PERIOD_S = 2.0


class AppArgs(BaseModel):
    """The builder's arguments; an unknown key is an error that lists the known ones."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model name: " + ", ".join(model_names()))
    weights: str | None = Field(None, description="local weights path; default: synthetic weights")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory_fraction: float | None = Field(None, gt=0, le=1, description="of the device; default 0.9 of the GPU share, 0.5 of CPU RAM")
    latency_budget_ms: float | None = Field(None, gt=0, description="per batch; default: the model's")
    max_batch: int = Field(256, ge=1, description="largest batch the tuning may try")
    cache_path: str | None = Field(None, description="tuning cache: a file, or a URL every node reads (s3://, gs://, file://...; see docs/cluster.md); default $AUTOBATCH_CACHE or ~/.cache/autobatch/tuning.json")
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 2 * max_batch")
    max_queued_requests: int | None = Field(None, ge=-1, description="requests Ray Serve's proxy holds for this app "
                                            "while every replica is at max_ongoing_requests (starting, restarting); "
                                            "past it: 503 with Retry-After. Default: max_ongoing_requests; -1: no bound")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (fractions allowed)")
    num_gpus: float = Field(1.0, gt=0, le=1, description="share of one GPU per replica, used when it runs on a GPU")
    replicas_per_gpu: int | None = Field(None, ge=1, le=16, description=(
        "on a GPU cluster: k replicas of this model per card, each asking 1/k of a GPU (num_gpus) and "
        "tuning within 1/k of its memory, so all k share one cached tuning (the same key: the same "
        "device, model and budget); num_replicas defaults to k. For a model whose per-request host "
        "work (HTTP, decode) keeps one replica from feeding the card"))
    repeats: int = Field(3, ge=1, description="timed runs per tuning probe")
    warmup: int = Field(1, ge=0, description="untimed runs per tuning probe")
    warm_sizes_budget_s: float = Field(120.0, ge=0, description="seconds a replica may spend before traffic running each batch "
                                       "size it may serve once (a size's first run pays its set-up; see serve/warmup.py); 0: off")
    options: dict = Field(default_factory=dict, description="model-specific options passed to the spec")
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per replica, to place "
                                        "replicas on a kind of node (e.g. {\"gpu_type_h200\": 1}); see docs/cluster.md")
    tuning_group: str | None = Field(None, description="a label added to the device fingerprint, so nodes it cannot tell "
                                     "apart (same GPU model, other host) tune and cache apart; default $AUTOBATCH_TUNING_GROUP")
    single_flight: bool = Field(True, description="replicas of one GPU type across the cluster tune once: one measures, "
                                "the others wait for its answer (serve/single_flight.py)")
    share_cap: Literal["serve", "tune", "off"] = Field("serve", description="a replica with a share of a GPU caps its "
                                                       "allocator at its budget: after tuning (serve), before it (tune), or not (off)")
    user_config: dict | None = Field(None, description="initial user_config (see serve/settings.py)")

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

    @field_validator("user_config")
    @classmethod
    def _valid_user_config(cls, value):
        parse_user_config(value)
        return value


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when Ray is not running here)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    try:
        return float(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001
        return 0.0


def placement(args: AppArgs) -> tuple[dict, int]:
    """(ray_actor_options for one replica, the number of replicas): a GPU share where the replica
    will run on a GPU; replicas_per_gpu k there means k replicas of 1/k of a card."""
    gpus = cluster_gpus()
    if args.device == "cuda" and gpus == 0 and __import__("ray").is_initialized():
        raise ValueError(f"{args.model}: device cuda was asked for, but the Ray cluster has no GPUs; "
                         f"use device auto or cpu")
    on_gpu = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    options: dict = {"num_cpus": args.num_cpus, "num_gpus": 0}
    if args.resources:
        options["resources"] = dict(args.resources)
    replicas = args.num_replicas
    if on_gpu and args.replicas_per_gpu is None:
        options["num_gpus"] = args.num_gpus
    elif on_gpu:
        k = args.replicas_per_gpu
        replicas = args.num_replicas if "num_replicas" in args.model_fields_set else k
        options["num_gpus"] = 1.0 / k
    return options, replicas


def build(args: AppArgs):
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args or {}))
    actor_options, num_replicas = placement(args)
    max_ongoing = args.max_ongoing_requests or max(8, 2 * args.max_batch)
    cache_path = os.path.expanduser(args.cache_path) if args.cache_path else None
    deployment = AutobatchDeployment.options(
        name=args.model,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing,
        # The replicas bound their own queues once tuned (serve/admission.py); this bound is the proxy's,
        # fixed before any tuning exists. Ray answers past it with a plain-text 503 and this Retry-After.
        max_queued_requests=args.max_queued_requests if args.max_queued_requests is not None else max_ongoing,
        backpressure_config={"status_code": 503, "retry_after_s": BACKPRESSURE_RETRY_AFTER_S},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options=actor_options,
        user_config=args.user_config,
    )
    return deployment.bind(
        model=args.model,
        weights=args.weights,
        device=args.device,
        dtype=args.dtype,
        memory_fraction=args.memory_fraction,
        latency_budget_ms=args.latency_budget_ms,
        max_batch=args.max_batch,
        cache_path=cache_path,
        repeats=args.repeats,
        warmup=args.warmup,
        warm_sizes_budget_s=args.warm_sizes_budget_s,
        gpu_share=actor_options["num_gpus"] or 1.0,
        max_ongoing_requests=max_ongoing,
        options=args.options,
        tuning_group=args.tuning_group,
        single_flight=args.single_flight,
        share_cap=args.share_cap,
    )
