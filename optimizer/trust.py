"""Whether a cached tuning may be served: only as far as it agrees with its key, its budgets and its
own probes.

The cache is a JSON file anyone can edit, and what a replica reads from it goes straight into
`@serve.batch`: a batch of 10^9 took a route down for minutes, a wait of 1e9 s hung a lone request,
-5 silently served unbatched. `check_tuning` names every reason a stored tuning cannot be what the
tuner would have decided under these settings; a hit with any reason is tuned again, never served.
Each check is an invariant the tuner itself keeps (search.py, select.py), so a tuning it measured
always passes: the probes' outcomes follow from their peak and latency against the budgets, the
max safe batch is the largest size that ran within both, the batch to serve is one of those sizes,
and the wait is a share of the latency budget. What the device's memory allows is what the probes
measured: the max safe batch's own probe peaked within the budget, and the budget is within the
device. (The stored memory fit is not checked: nothing serves from it, and an affine fit may miss
step-shaped memory by more than any fixed tolerance.)
"""
from __future__ import annotations

from .probe import OK, OOM, OVER_LATENCY, OVER_MEMORY, PREDICTED
from .jitter import jitter_bound
from .tuning import Tuning, TuningFormatError

OUTCOMES = (OK, OOM, OVER_MEMORY, OVER_LATENCY, PREDICTED)


def check_tuning(
    tuning: Tuning | dict,
    *,
    max_batch: int,
    latency_budget_s: float,
    memory_budget_bytes: int,
    dtype: str | None = None,
    model: str | None = None,
    device: dict | None = None,
) -> list[str]:
    """The reasons `tuning` cannot be trusted under these settings; [] when it can.

    `tuning` may be the stored dict (it is parsed by `Tuning.from_dict`, whose refusal is a reason).
    `dtype`, `model` and `device` (kind, name, total_memory_bytes) are compared when given.
    """
    if not isinstance(tuning, Tuning):
        try:
            tuning = Tuning.from_dict(tuning)
        except TuningFormatError as exc:
            return [str(exc)]
    t = tuning
    reasons: list[str] = []

    # What it was tuned for must be what is asked now.
    if t.max_batch != max_batch:
        reasons.append(f"max_batch {t.max_batch} is not the {max_batch} asked for")
    if t.memory_budget_bytes != memory_budget_bytes:
        reasons.append(f"memory budget {t.memory_budget_bytes} bytes is not the {memory_budget_bytes} asked for")
    if round(t.latency_budget_s, 6) != round(latency_budget_s, 6):
        reasons.append(f"latency budget {t.latency_budget_s} s is not the {latency_budget_s} s asked for")
    if dtype is not None and t.dtype != dtype:
        reasons.append(f"dtype {t.dtype!r} is not the {dtype!r} asked for")
    if model is not None and t.model != model:
        reasons.append(f"model {t.model!r} is not {model!r}")
    if device is not None:
        for name in ("kind", "name", "total_memory_bytes"):
            if name in device and getattr(t.device, name) != device[name]:
                reasons.append(f"device {name} {getattr(t.device, name)!r} is not this device's {device[name]!r}")
    if not 0 < t.memory_budget_bytes <= t.device.total_memory_bytes:
        reasons.append(f"memory budget {t.memory_budget_bytes} bytes is outside (0, the device's "
                       f"{t.device.total_memory_bytes}]")
    if not t.latency_budget_s > 0:
        reasons.append(f"latency budget {t.latency_budget_s} s is not positive")

    # The decision within its bounds.
    if not 1 <= t.batch_size <= max_batch:
        reasons.append(f"batch_size {t.batch_size} is outside [1, max_batch {max_batch}]")
    if not 1 <= t.max_safe_batch <= max_batch:
        reasons.append(f"max_safe_batch {t.max_safe_batch} is outside [1, max_batch {max_batch}]")
    if t.batch_size > t.max_safe_batch:
        reasons.append(f"batch_size {t.batch_size} is above max_safe_batch {t.max_safe_batch}")
    if not 0 <= t.batch_wait_timeout_s <= t.latency_budget_s:
        reasons.append(f"batch_wait_timeout_s {t.batch_wait_timeout_s} is outside [0, the latency budget "
                       f"{t.latency_budget_s} s]")
    if t.serve_latency_s < 0 or t.serve_throughput < 0:
        reasons.append(f"serve latency {t.serve_latency_s} s / throughput {t.serve_throughput}/s is negative")

    reasons += _disagreements_with_probes(t)
    return reasons


def check_against_key(tuning: Tuning | dict, key_fields: dict) -> list[str]:
    """`check_tuning` with the settings the cache key was built from (tune.Resolved.key_fields)."""
    model = key_fields.get("model")
    try:
        return check_tuning(
            tuning,
            max_batch=key_fields["max_batch"],
            latency_budget_s=key_fields["latency_budget_s"],
            memory_budget_bytes=key_fields["memory_budget_bytes"],
            dtype=key_fields.get("dtype"),
            model=model.get("model") if isinstance(model, dict) else None,
            device=key_fields.get("device") if isinstance(key_fields.get("device"), dict) else None,
        )
    except KeyError as exc:
        return [f"the cache key has no {exc.args[0]!r} to check the tuning against"]


def _disagreements_with_probes(t: Tuning) -> list[str]:
    reasons = []
    by_size = {}
    for p in t.probes:
        where = f"probe at batch {p.batch_size}"
        if p.outcome not in OUTCOMES:
            reasons.append(f"{where} has an unknown outcome {p.outcome!r}")
            continue
        if not 1 <= p.batch_size <= t.max_batch:
            reasons.append(f"{where} is outside [1, max_batch {t.max_batch}]")
        by_size.setdefault(p.batch_size, p)
        if p.outcome in (OK, OVER_MEMORY, OVER_LATENCY):
            if p.peak_bytes is None or p.latency_s is None or p.peak_bytes < 0 or p.latency_s < 0:
                reasons.append(f"{where} ran ({p.outcome}) but has no valid peak and latency")
                continue
            # The outcome the probe must have had, given what it measured (probe.probe's rule).
            if p.peak_bytes > t.memory_budget_bytes:
                expected = OVER_MEMORY
            elif p.latency_s > t.latency_budget_s:
                expected = OVER_LATENCY
            else:
                expected = OK
            if p.outcome != expected:
                reasons.append(f"{where} is recorded {p.outcome} but its peak {p.peak_bytes} bytes and latency "
                               f"{p.latency_s} s against the budgets make it {expected}")

    ok_sizes = sorted(size for size, p in by_size.items() if p.outcome == OK)
    # The search's one answer without a size that ran within both budgets: batch 1 already over the
    # latency budget, so it serves unbatched (search.find_max_safe_batch, select.select_serve_batch).
    first = by_size.get(1)
    unbatched = first is not None and first.outcome == OVER_LATENCY and not ok_sizes
    for name, size in (("max_safe_batch", t.max_safe_batch), ("batch_size", t.batch_size)):
        if size not in ok_sizes and not (unbatched and size == 1):
            reasons.append(f"{name} {size} is not a size its probes ran within both budgets "
                           f"({_sizes(ok_sizes)})")
    # A size that ran within both budgets above the max is allowed only where the search put the max
    # under it: a smaller size failed, or memory jitters size by size and it lies within the jitter
    # of the budget (search.clear_of_jitter).
    failed = [size for size, p in by_size.items() if p.outcome in (OOM, OVER_MEMORY, OVER_LATENCY) and size > 1]
    above = [size for size in ok_sizes if size > t.max_safe_batch and not (failed and size > min(failed))]
    if above:
        ran, searched = 0, []  # the search's probes: those before the knee's
        for p in t.probes:
            ran += p.outcome != PREDICTED
            if ran > t.search_probe_count:
                break
            searched.append(p)
        bound = jitter_bound(searched, t.base_bytes, t.memory_budget_bytes)
        above = [size for size in above if bound is None or size <= bound]
    if above:
        reasons.append(f"batch {above[-1]} ran within both budgets, above max_safe_batch {t.max_safe_batch}")

    served = by_size.get(t.batch_size)
    if served is not None and served.outcome == OK and served.latency_s is not None:
        if abs(t.serve_latency_s - served.latency_s) > 1e-9 * max(1.0, served.latency_s):
            reasons.append(f"serve_latency_s {t.serve_latency_s} is not its probe's {served.latency_s} s "
                           f"at batch {t.batch_size}")

    return reasons


def _sizes(sizes: list[int]) -> str:
    return "none did" if not sizes else "they were " + ", ".join(map(str, sizes))


__all__ = ["check_tuning", "check_against_key"]
