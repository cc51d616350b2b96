"""Autoscaling that knows the batch: Ray Serve's autoscaler, with the target a replica's tuning gives.

Ray Serve scales a deployment by `target_ongoing_requests`, a number users guess. A tuned replica
knows what it can hold: its served batch times its batcher's slots (one batch computing and,
where the stages overlap, the next one being prepared) is the work that keeps its device busy
without a queue; more than that waits. And its admission bound (serve/replica/admission.py) is the most it
takes in before it sheds: the `max_ongoing_requests` worth giving it.

The order problem: Ray fixes a deployment's autoscaling_config when the app is deployed, before any
replica has tuned, and a replica cannot change its deployment's config. So the config that the
builder (serve/app.py) deploys names a policy, `BatchAwarePolicy`, instead of a number, and every
replica reports its derived target through Ray's custom autoscaling metrics (the deployment's
`record_autoscaling_stats`). The policy runs in Ray's controller on every autoscaling tick and
scales by the samples the replicas hold against the samples they can hold. No redeploy, no guess:
until the first replica has tuned and reported, the policy keeps the replica count it has (a cache
hit at start-up reports within seconds). Ray's own wrapper around any policy still applies the
user's `upscale_delay_s`, `downscale_delay_s`, scaling factors and the min/max bounds.

A user's `target_ongoing_requests` (in autoscaling_config) wins: the policy then is Ray's own rule,
requests against that target. `max_ongoing_requests` is a deployment option Ray fixes at deploy
time too, and Ray re-applies it to running replicas without a restart; the derived value is shown
(GET /tuning, `serving.autoscaling`) and logged, with how to set it.

Ray's controller unpickles this module: stdlib only, no torch, no optimizer.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("ray.serve")

# the custom autoscaling metrics each replica reports (record_autoscaling_stats)
TARGET_SAMPLES_METRIC = "autobatch_target_ongoing_samples"
PENDING_SAMPLES_METRIC = "autobatch_ongoing_samples"

# Ray pickles the policy's module by value into its controller: this module needs no install there.
POLICY_PATH = "serve.replica.autoscaling:BatchAwarePolicy"
DEFAULTS = {"min_replicas": 1}  # the delays, look-back and factors are Ray's own defaults
# the keys a user's autoscaling_config may carry (Ray's AutoscalingConfig, its public ones)
USER_KEYS = ("min_replicas", "initial_replicas", "max_replicas", "target_ongoing_requests", "metrics_interval_s",
             "look_back_period_s", "upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s",
             "upscaling_factor", "downscaling_factor", "aggregation_function")


@dataclass(frozen=True)
class AutoscalingTargets:
    """What one tuned replica says about scaling; GET /tuning's `serving.autoscaling`."""

    target_ongoing_samples: int  # served batch x batcher slots
    max_ongoing_requests_derived: int  # the admission bound, in samples (a request is at least one)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def derive_targets(batch_size: int, slots: int, bound_s: float, batch_time_s: float, wait_s: float) -> AutoscalingTargets:
    """The replica's target (samples that keep its device busy without a queue) and its admission
    bound in samples: as many whole batches as the bound's time holds after the wait, never fewer
    than the target and one more batch (the target is then a queue the replica still admits)."""
    size, slots = max(1, int(batch_size)), max(1, int(slots))
    target = size * slots
    if batch_time_s > 0 and math.isfinite(bound_s):
        batches = max(1, math.floor((bound_s - wait_s) / batch_time_s + 1e-9))
    else:  # no batch time known: admission's own rule then is one batch computing, one filling
        batches = 2
    bound_samples = max(batches * size, target + size)
    reason = (f"target {target} ongoing samples = served batch {size} x {slots} device slot(s); "
              f"max_ongoing_requests {bound_samples} = the admission bound ({bound_s:.2f} s: {batches} batch(es) "
              f"of {batch_time_s * 1e3:.0f} ms after a {wait_s * 1e3:.0f} ms wait) in samples")
    return AutoscalingTargets(target, bound_samples, reason)


def continuous_targets(max_sequences: int, kv_queue_factor: float) -> AutoscalingTargets:
    """The same for the Llama's continuous scheduler (serve/replica/llm.py), which has no batches to count:
    its target is the concurrent sequences the tuning sized it for, and its bound what its KV-block
    admission takes, that cache plus `kv_queue_factor` caches' worth waiting (at the worst length)."""
    target = max(1, int(max_sequences))
    bound = max(target + 1, math.floor(target * (1.0 + max(0.0, float(kv_queue_factor))) + 1e-9))
    reason = (f"target {target} ongoing requests = the continuous scheduler's concurrent sequences; "
              f"max_ongoing_requests {bound} = those + {kv_queue_factor:g}x waiting (its KV-block admission)")
    return AutoscalingTargets(target, bound, reason)


def autoscaling_config(user: dict | None, max_replicas_default: int) -> dict:
    """The autoscaling_config a deployment is given for `num_replicas: auto`: the user's keys over
    DEFAULTS, max_replicas defaulting to `max_replicas_default`, and the batch-aware policy (which
    uses the user's target_ongoing_requests when one is given)."""
    user = dict(user or {})
    unknown = sorted(set(user) - set(USER_KEYS))
    if unknown:
        raise ValueError(f"unknown autoscaling_config key(s) {unknown}; use: {', '.join(USER_KEYS)} "
                         f"(the policy is autobatch's; target_ongoing_requests left out is derived from the tuning)")
    config = {**DEFAULTS, "max_replicas": max(int(max_replicas_default), int(user.get("min_replicas", 1)), 1), **user}
    target = config.pop("target_ongoing_requests", None)
    config["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"target_ongoing_requests": target}}
    if target is not None:
        config["target_ongoing_requests"] = target  # Ray shows it; the policy uses it as given
    return config


class BatchAwarePolicy:
    """A Ray Serve autoscaling policy (a class: Ray builds it once with policy_kwargs and calls it on
    every tick with an AutoscalingContext); returns (desired replicas, state). Ray's wrapper then
    applies the delays, the scaling factors and the bounds."""

    def __init__(self, target_ongoing_requests: float | None = None):
        self.user_target = float(target_ongoing_requests) if target_ongoing_requests else None
        self._last: tuple | None = None

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        if replicas == 0:  # Ray's cold start path scales 0 -> n on the first request
            return ctx.target_num_replicas, {}
        if self.user_target:
            desired = ctx.total_num_requests / self.user_target
            return desired, self._state(ctx, desired, f"{ctx.total_num_requests:.1f} ongoing requests against the "
                                                      f"user's target_ongoing_requests {self.user_target:g}")
        metrics = ctx.aggregated_metrics or {}
        targets = {r: v for r, v in (metrics.get(TARGET_SAMPLES_METRIC) or {}).items() if v and v > 0}
        if not targets:  # no replica has tuned yet: nothing to scale by, hold
            return ctx.target_num_replicas, self._state(ctx, ctx.target_num_replicas, "no tuned replica has reported yet")
        pending = metrics.get(PENDING_SAMPLES_METRIC) or {}
        held = sum(float(pending.get(r, 0.0)) for r in targets)
        running = float(ctx.total_running_requests)
        queued = float(ctx.total_queued_requests or 0.0)  # requests no replica took yet (at the proxies' handles)
        per_request = max(1.0, held / running) if running >= 1 else 1.0
        load = held + queued * per_request
        target = sum(targets.values()) / len(targets)
        desired = load / target
        return desired, self._state(ctx, desired, f"{held:.0f} samples held + {queued:.0f} queued requests x "
                                                  f"{per_request:.1f} samples against {target:.0f} per replica")

    def _state(self, ctx, desired: float, why: str) -> dict:
        decision = (ctx.current_num_replicas, math.ceil(desired))
        if decision != self._last:  # a line when the decision moves, not every tick
            self._last = decision
            log.info("autobatch: autoscaling %s: %d replica(s), wants %d: %s", ctx.deployment_name,
                     ctx.current_num_replicas, math.ceil(desired), why)
        return {"autobatch_desired_replicas": desired, "autobatch_reason": why}




def describe_config(config) -> dict | None:
    """A deployment's autoscaling config (Ray's AutoscalingConfig, or None: a fixed count) as GET /tuning
    shows it: the bounds, and whose target is in force."""
    if config is None:
        return None
    policy = getattr(config, "policy", None)
    kwargs = dict(getattr(policy, "policy_kwargs", None) or {})
    ours = str(getattr(policy, "policy_function", "")) == POLICY_PATH
    user_target = kwargs.get("target_ongoing_requests") if ours else config.target_ongoing_requests
    return {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "policy": str(getattr(policy, "policy_function", "")),
            "target_ongoing_requests": user_target,
            "target_from": "autoscaling_config" if user_target else "tuning"}


def replica_report(targets: AutoscalingTargets | None, config, max_ongoing: int | None) -> dict | None:
    """GET /tuning's `serving.autoscaling`: what this replica derives, the config in force, and what to
    set for the derived max_ongoing_requests to apply (Ray fixes that option at deploy time)."""
    if targets is None:
        return None
    out = {**targets.to_dict(), "config": describe_config(config), "max_ongoing_requests": max_ongoing}
    if max_ongoing and max_ongoing != targets.max_ongoing_requests_derived:
        out["note"] = (f"max_ongoing_requests is {max_ongoing}; the admission bound is "
                       f"{targets.max_ongoing_requests_derived}: set max_ongoing_requests: "
                       f"{targets.max_ongoing_requests_derived} in the app's args and redeploy (Ray applies it "
                       f"without restarting replicas) so that Ray's router holds what a replica would shed")
    return out


__all__ = ["AutoscalingTargets", "BatchAwarePolicy", "autoscaling_config", "derive_targets", "describe_config",
           "replica_report", "PENDING_SAMPLES_METRIC", "TARGET_SAMPLES_METRIC", "POLICY_PATH"]


def targets_now(settings, batcher, admission) -> AutoscalingTargets | None:
    """A replica's targets as of now (the served batch time moves its admission bound); None untuned."""
    if settings is None:
        return None
    described = admission.describe()
    return derive_targets(settings.size, batcher.describe()["slots"], described["bound_s"],
                          described["batch_time_s"], settings.wait_s)


def autoscaling_metrics(targets: AutoscalingTargets | None, pending_samples: int) -> dict:
    """The custom autoscaling metrics Ray's controller hands BatchAwarePolicy: nothing before the tuning."""
    if targets is None:
        return {}
    return {TARGET_SAMPLES_METRIC: float(targets.target_ongoing_samples), PENDING_SAMPLES_METRIC: float(pending_samples)}
