"""One tuning per GPU type across a Ray cluster: the lease service of optimizer/flight.py as a
named, detached Ray actor that every replica of every app finds by name.

Replicas that miss the cache for one key (the same GPU model, software, model and budgets) ask the
coordinator; the first measures, the others wait and take its answer, and each stores it in its own
cache. A new GPU type is another key: it misses and tunes. The actor lives on the head node (it must
outlive worker nodes coming and going), takes no CPU, and is detached so that it outlives the app
that created it (`ray kill` it by name to drop what it holds, or let the answers expire).
"""
from __future__ import annotations

import logging
import os

import ray

from optimizer.flight import DEFAULT_LEASE_S, LeasedFlights, LeaseTable

log = logging.getLogger("ray.serve")

COORDINATOR_NAME = "autobatch-tuning-coordinator"
COORDINATOR_NAMESPACE = "autobatch"
CALL_TIMEOUT_S = 30.0


@ray.remote(num_cpus=0, max_restarts=-1)
class TuningCoordinator:
    """LeaseTable behind an actor: calls are short and run one at a time."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S):
        self._table = LeaseTable(lease_s=lease_s)

    def acquire(self, key: str, holder: str) -> dict:
        return self._table.acquire(key, holder)

    def renew(self, key: str, holder: str) -> bool:
        return self._table.renew(key, holder)

    def publish(self, key: str, holder: str, answer: dict) -> None:
        self._table.publish(key, holder, answer)

    def release(self, key: str, holder: str) -> None:
        self._table.release(key, holder)

    def state(self) -> dict:
        return self._table.state()


def coordinator():
    """The cluster's coordinator: created by the first replica that asks, found by name after."""
    return TuningCoordinator.options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
    ).remote()


class _CoordinatorClient:
    """LeaseTable's methods, called on the actor (from the replica's worker thread, never its event loop)."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, method):
        remote = getattr(self._actor, method)
        return lambda *args: ray.get(remote.remote(*args), timeout=CALL_TIMEOUT_S)


def holder_name() -> str:
    """Who holds a lease, as the waiters' logs name it."""
    try:
        context = ray.get_runtime_context()
        return f"actor {context.get_actor_id()} (node {context.get_node_id()[:12]}, pid {os.getpid()})"
    except Exception:  # noqa: BLE001
        return f"pid {os.getpid()}"


def cluster_single_flight(say=log.info) -> LeasedFlights | None:
    """The single-flight hook for `autobatch()` in this Ray cluster; None outside Ray (tune alone)."""
    if not ray.is_initialized():
        return None
    try:
        actor = coordinator()
    except Exception as exc:  # noqa: BLE001 - without it every replica tunes on its own, as before
        log.warning("autobatch: no tuning coordinator (%s: %s); each replica tunes on its own", type(exc).__name__, exc)
        return None
    return LeasedFlights(_CoordinatorClient(actor), holder=holder_name(), say=say)


__all__ = ["COORDINATOR_NAME", "COORDINATOR_NAMESPACE", "TuningCoordinator", "cluster_single_flight"]
