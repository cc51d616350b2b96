"""What a replica runs under, and the batch settings it hands to its batcher (serve/replica/batcher.py). Ray-free.

`ReplicaSettings` declares, once, every setting the app builder hands a replica: the builder's
arguments (serve/app.py's AppArgs is ReplicaSettings plus where the replicas go) and the
deployment's constructor argument (serve/cluster/deployment.py) are this one model; `tuning_settings`
is where they reach the optimizer. A new setting is one field here plus its use.

Two layers make a replica's configuration (`ReplicaConfig`): the app builder's settings, fixed for
the replica's life, and the deployment's user_config, which Ray may change at any time
(`reconfigure`). A user_config key overrides the builder argument of the same name; a key it leaves
out falls back to the builder's value, never to an earlier user_config's. The builder arguments a
user_config may override are the fields marked `LIVE` (they change what a tuning measures).

`effective_settings` is the one place that decides the batch size and wait Ray Serve really uses,
from the tuning and what overrides it, and says why in `reasons` (GET /tuning's `serving.notes`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.registry import model_names
from optimizer.tune import TuningSettings
from optimizer.tuning import Tuning
from optimizer.served import ServedBatch
from optimizer.wait import LearntWait

from .budgets import default_memory_fraction
from .faults import Faults

log = logging.getLogger("ray.serve")

# A ReplicaSettings field a user_config key of the same name may override; a change re-tunes.
LIVE = {"user_config": "re-tunes"}


class ReplicaSettings(BaseModel):
    """The settings the app builder gives every replica of an app, each declared once: the builder's
    arguments (less placement) and what the deployment's constructor takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model name: " + ", ".join(model_names()))
    weights: str | None = Field(None, description="local weights path; default: synthetic weights")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    latency_budget_ms: float | None = Field(None, gt=0, json_schema_extra=LIVE, description="per batch; default: the model's")
    memory_fraction: float | None = Field(None, gt=0, le=1, json_schema_extra=LIVE,
                                          description="of the device; default 0.9 of the GPU share, 0.5 of CPU RAM")
    max_batch: int = Field(256, ge=1, json_schema_extra=LIVE, description="largest batch the tuning may try")
    cache_path: str | None = Field(None, description="tuning cache: a file, or a URL every node reads (s3://, gs://, file://...; see docs/cluster.md); default $AUTOBATCH_CACHE or ~/.cache/autobatch/tuning.json")
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 2 * max_batch")
    repeats: int = Field(3, ge=1, description="timed runs per tuning probe")
    warmup: int = Field(1, ge=0, description="untimed runs per tuning probe")
    warm_sizes_budget_s: float = Field(120.0, ge=0, description="seconds a replica may spend before traffic running each batch "
                                       "size it may serve once (a size's first run pays its set-up; see serve/replica/warmup.py); 0: off")
    options: dict = Field(default_factory=dict, description="model-specific options passed to the spec")
    tuning_group: str | None = Field(None, description="a label added to the device fingerprint, so nodes it cannot tell "
                                     "apart (same GPU model, other host) tune and cache apart; default $AUTOBATCH_TUNING_GROUP")
    single_flight: bool = Field(True, description="replicas of one GPU type across the cluster tune once: one measures, "
                                "the others wait for its answer (serve/replica/single_flight.py)")
    profile_dir: str | None = Field(None, description="a folder for POST <route>/profile's torch.profiler traces "
                                    "(serve/api/profiling.py); default $AUTOBATCH_PROFILE_DIR; unset: the route is off")
    share_cap: Literal["serve", "tune", "off"] = Field("serve", description="a replica with a share of a GPU caps its "
                                                       "allocator at its budget: after tuning (serve), before it (tune), or not (off)")


# Keys a deployment's user_config may carry; TUNING_KEYS change what is measured (a re-tune).
TUNING_KEYS = tuple(name for name, f in ReplicaSettings.model_fields.items() if f.json_schema_extra == LIVE)
USER_CONFIG_KEYS = TUNING_KEYS + ("batch_size", "batch_wait_timeout_ms", "retune", "faults")


def parse_user_config(user_config: dict | None) -> dict:
    """Validate a user_config; the message of any error says what to change."""
    if user_config is None:
        return {}
    if not isinstance(user_config, dict):
        raise ValueError(f"user_config must be a mapping with keys among {', '.join(USER_CONFIG_KEYS)}; got {user_config!r}")
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown user_config key(s) {unknown}; use: {', '.join(USER_CONFIG_KEYS)}")
    cfg = dict(user_config)

    def positive(key, kind=float, upper=None):
        value = cfg.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value):
            raise ValueError(f"user_config {key} must be a positive {'whole number' if kind is int else 'number'}, got {value!r}")
        if upper is not None and value > upper:
            raise ValueError(f"user_config {key} must be at most {upper}, got {value!r}")
        cfg[key] = kind(value)

    positive("latency_budget_ms")
    positive("memory_fraction", upper=1.0)
    positive("max_batch", int)
    positive("batch_size", int)
    positive("batch_wait_timeout_ms")
    Faults.from_config(cfg.get("faults"))  # validates
    return cfg


def memory_fraction_for(kind: str, fraction: float | None, gpu_share: float,
                        cpu_share: float | None = None) -> float | None:
    """The memory fraction (of the whole device) a replica tunes within: the app's, else its share of
    the device as Ray placed it (serve/replica/budgets.py: num_gpus of a card, num_cpus of the node's CPUs),
    so that replicas sharing a device each tune within their own part of it; None: the optimizer's
    default for the device (a CPU replica whose share is unknown)."""
    if fraction is None:
        return default_memory_fraction(kind, cpu_share, gpu_share)
    if kind == "cuda" and fraction > gpu_share:
        log.warning("autobatch: memory_fraction %.2f is more than this replica's GPU share %.2f; "
                    "its neighbours on the card may run out of memory", fraction, gpu_share)
    return fraction


@dataclass(frozen=True)
class Pins:
    """What an operator fixed through user_config; None: the tuned value."""

    batch_size: int | None = None
    batch_wait_timeout_ms: float | None = None


class ReplicaConfig(ReplicaSettings):
    """A replica's configuration: the builder's settings (max_ongoing_requests is what the builder
    set; Ray's own value wins where readable), where Ray placed the replica, and the user_config's
    overrides when built by `with_user_config`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    gpu_share: float = 1.0  # the share of a card Ray gave this replica (num_gpus)
    cpu_share: float | None = None  # this replica's num_cpus / its node's CPUs, as Ray placed it
    # --- from user_config only ---
    pins: Pins = Pins()
    retune: Any = None  # a new truthy value re-tunes the running replicas, skipping the cache
    faults: Faults = Faults()

    @classmethod
    def placed(cls, settings: ReplicaSettings, gpu_share: float = 1.0, cpu_share: float | None = None) -> "ReplicaConfig":
        """The builder's settings as one replica runs them: on `gpu_share` of a card, `cpu_share` of its node's CPUs."""
        return cls(**dict(settings), gpu_share=gpu_share, cpu_share=cpu_share)

    def with_user_config(self, user_config: dict | None) -> "ReplicaConfig":
        """This (the builder's) configuration overlaid by a user_config, validated."""
        cfg = parse_user_config(user_config)
        return self.model_copy(update={
            **{key: cfg[key] for key in TUNING_KEYS if key in cfg},
            "pins": Pins(cfg.get("batch_size"), cfg.get("batch_wait_timeout_ms")),
            "retune": cfg.get("retune"),
            "faults": Faults.from_config(cfg.get("faults")),
        })

    def tuning_changes(self, other: "ReplicaConfig") -> list[str]:
        """The user_config keys that change what a tuning measures, where `other` differs from this."""
        return [key for key in TUNING_KEYS if getattr(self, key) != getattr(other, key)]

    def tuning_settings(self, device_kind: str) -> TuningSettings:
        latency = self.latency_budget_ms
        return TuningSettings(
            device=device_kind,
            device_index=0,
            dtype=self.dtype,
            memory_fraction=memory_fraction_for(device_kind, self.memory_fraction, self.gpu_share, self.cpu_share),
            latency_budget_s=latency / 1e3 if latency else None,
            max_batch=self.max_batch,
            warmup=self.warmup,
            repeats=self.repeats,
        )


@dataclass(frozen=True)
class BatchSettings:
    """What the batcher is given: a max batch size and a wait, and why they differ from the tuning."""

    size: int
    wait_s: float
    reasons: tuple[str, ...] = ()


def effective_settings(tuning: Tuning, pins: Pins, oom_cap: int | None, max_ongoing: int | None,
                       served_wait: LearntWait | None, served_batch: ServedBatch | None = None) -> BatchSettings:
    """The size: pinned > re-decided from served batches' times (`served_batch`, optimizer/served.py)
    > tuned, never above what an out-of-memory while serving taught (`oom_cap`), never above
    max_ongoing_requests (Ray never has more requests to put in one batch). The wait: pinned >
    re-derived from served batches (`served_wait`) > tuned."""
    reasons = []
    size = pins.batch_size or tuning.batch_size
    if pins.batch_size:
        reasons.append(f"pinned by user_config batch_size={size}")
    elif served_batch is not None and served_batch.size < size:
        size = served_batch.size
        reasons.append(f"batch re-decided from served batches: {served_batch.reason}")
    if oom_cap is not None and size > oom_cap:
        size = oom_cap
        reasons.append(f"lowered to {size} after an out-of-memory while serving")
    if max_ongoing and size > max_ongoing:
        reasons.append(f"capped at max_ongoing_requests={max_ongoing} (a batch cannot be larger); raise it to serve {size}")
        size = max_ongoing
    if pins.batch_wait_timeout_ms:
        wait_s = pins.batch_wait_timeout_ms / 1e3
        reasons.append(f"wait pinned by user_config batch_wait_timeout_ms={pins.batch_wait_timeout_ms}")
    elif served_wait is not None:
        wait_s = served_wait.wait_s
        reasons.append(f"wait re-derived from served batches: {served_wait.reason}")
    else:
        wait_s = float(tuning.batch_wait_timeout_s)
    return BatchSettings(int(size), float(wait_s), tuple(reasons))
