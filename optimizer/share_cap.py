"""An enforced share of a GPU: a replica that holds part of a card caps its own allocator there.

Without a cap the replicas packed on a card share it on trust: each tunes within its budget, but
nothing stops one from growing past it while serving (a long prompt, a fragmenting allocator) and
taking memory its neighbours measured as theirs. With `torch.cuda.set_per_process_memory_fraction`
the caching allocator frees its cache and retries before it reserves past the cap, and raises an
out-of-memory (which serving handles: split the batch, lower the max) instead of taking more.

The cap is the replica's memory budget less what the process holds outside torch's allocator (the
CUDA context, which the budget counts and the cap does not see), as a fraction of the card.

When: `serve` (the default) sets it after tuning, so the answer is the uncapped measurement (the
reserved peak, which counts cache the allocator could give back) and the cap only enforces it;
`tune` sets it before tuning, so the search measures under the cap and may find larger batches
(the allocator then frees and re-reserves around each batch: benchmarks/share_cap.py measures
whether that costs throughput); `off` leaves the allocator uncapped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("autobatch")

MODES = ("serve", "tune", "off")


def allocator_cap_fraction(budget_bytes: int, outside_allocator_bytes: int, total_bytes: int) -> float:
    """The fraction of the card torch's allocator may reserve so that it plus the context stay
    within the budget."""
    if total_bytes <= 0:
        raise ValueError(f"the device reports {total_bytes} bytes of memory; cannot cap a share of it")
    allowed = budget_bytes - max(0, outside_allocator_bytes)
    if allowed <= 0:
        raise ValueError(f"the memory budget ({budget_bytes / 2**20:.0f} MiB) is smaller than this process's CUDA "
                         f"context ({outside_allocator_bytes / 2**20:.0f} MiB); raise num_gpus or memory_fraction")
    return min(1.0, allowed / total_bytes)


def cap_allocator(torch_cuda, device_index: int, budget_bytes: int, outside_allocator_bytes: int,
                  total_bytes: int) -> float:
    """Cap torch's allocator on `device_index` (torch_cuda is `torch.cuda`); returns the fraction set."""
    fraction = allocator_cap_fraction(budget_bytes, outside_allocator_bytes, total_bytes)
    torch_cuda.set_per_process_memory_fraction(fraction, device_index)
    log.info("autobatch: allocator capped at %.4f of the card (%.2f GiB): the budget %.2f GiB less the CUDA "
             "context's %.2f GiB", fraction, fraction * total_bytes / 2**30, budget_bytes / 2**30,
             outside_allocator_bytes / 2**30)
    return fraction


def share_cap_applies(mode: str, device_kind: str, gpu_share: float) -> bool:
    """A cap only where the card is shared: a replica alone on a card has no neighbour to guard."""
    if mode not in MODES:
        raise ValueError(f"share_cap must be one of {', '.join(MODES)}, got {mode!r}")
    return mode != "off" and device_kind == "cuda" and gpu_share < 1


@dataclass(frozen=True)
class Exclusive:
    """Whether a tuning takes the device's lock (optimizer/tune.py tuning_lock), and why."""

    needed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.needed


def exclusive_tuning(device_kind: str, mode: str, gpu_share: float, share_of_card: float | None = None) -> Exclusive:
    """Whether co-located replicas must tune one at a time.

    The lock exists so that probes do not disturb each other. On a GPU each replica's meter reads
    its own process's allocator and context (optimizer/devices.py CudaMeter), never the card's
    whole usage, so a neighbour's probes cannot enter its measurement; what they could do is take
    memory the neighbour needs, and a replica whose allocator is capped at its share of the card
    (`share_cap_applies`) cannot. Those tune at the same time; their latencies are measured while
    the others compute, as they will be served. On a CPU the replicas share the cores that every
    probe's latency is timed on (and the knee there is a handful of samples), and a replica alone
    on its card has no cap: they keep the lock. `share_of_card` (the Ray share the allocator is
    capped at while tuning, when the mode caps it only after) is only reported."""
    if device_kind != "cuda":
        return Exclusive(True, "a CPU's cores time every probe: one tuning at a time")
    if not share_cap_applies(mode, device_kind, gpu_share):
        why = "share_cap is off" if mode == "off" else "the replica has the whole card (no cap)"
        return Exclusive(True, f"{why}: one tuning at a time on the card")
    cap = f" (allocator capped at {share_of_card:.2f} of the card while tuning)" if share_of_card else ""
    return Exclusive(False, f"each replica's meter sees only its own process and its allocator is capped "
                            f"at its share{cap}: the replicas on this card tune at the same time")


__all__ = ["MODES", "Exclusive", "allocator_cap_fraction", "cap_allocator", "exclusive_tuning", "share_cap_applies"]
