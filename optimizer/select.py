"""Which batch to serve, given the probes: policy only, no measuring.

The largest safe batch is rarely the one to serve. Past the throughput knee a bigger batch adds
latency and gains nothing (on a CPU it often loses throughput past b~4-8), so we serve the
smallest measured size whose throughput is within `knee_fraction` (95%) of the best measured, among
sizes whose latency fits the budget and that are no larger than the max safe batch.

The knee is only as sharp as the sizes measured around it; `next_knee_probe` names one more size
to measure (where the throughput curve through the bracket's ends crosses the knee), at most
`MAX_KNEE_PROBES` times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .probe import ProbeResult

MAX_KNEE_PROBES = 2  # probes after the search, to sharpen the knee


@dataclass(frozen=True)
class Selection:
    batch_size: int
    throughput: float
    latency_s: float
    best_throughput: float
    best_batch: int
    reason: str


def _candidates(probes: list[ProbeResult], max_safe_batch: int, latency_budget_s: float | None):
    return sorted(
        (p for p in probes
         if p.ok and p.batch_size <= max_safe_batch
         and (latency_budget_s is None or p.latency_s <= latency_budget_s)),
        key=lambda p: p.batch_size,
    )


def select_serve_batch(
    probes: list[ProbeResult],
    max_safe_batch: int,
    latency_budget_s: float | None,
    knee_fraction: float = 0.95,
) -> Selection:
    candidates = _candidates(probes, max_safe_batch, latency_budget_s)
    if not candidates:
        return Selection(1, 0.0, 0.0, 0.0, 1, "no probe fit the budgets; serving unbatched")
    best = max(candidates, key=lambda p: p.throughput)
    for p in candidates:
        if p.throughput >= knee_fraction * best.throughput:
            if p.batch_size == best.batch_size:
                reason = f"batch {p.batch_size} has the best measured throughput ({p.throughput:.1f}/s)"
            else:
                reason = (
                    f"batch {p.batch_size} is the smallest within {knee_fraction:.0%} of the best "
                    f"throughput ({p.throughput:.1f}/s vs {best.throughput:.1f}/s at batch "
                    f"{best.batch_size}); larger batches add latency for little gain"
                )
            return Selection(p.batch_size, p.throughput, p.latency_s, best.throughput, best.batch_size, reason)
    raise AssertionError("the best candidate is always within the knee fraction of itself")


def next_knee_probe(
    probes: list[ProbeResult],
    max_safe_batch: int,
    latency_budget_s: float | None,
    knee_fraction: float = 0.95,
    resolution: float = 1.3,
) -> int | None:
    """The size to measure next to sharpen the knee, or None when the bracket is narrow enough.

    The bracket is (largest measured size below the knee, selected size]. A batch that takes
    a + c*b seconds serves b / (a + c*b) samples/s, so 1/throughput = a/b + c: a line in 1/b. The
    line through the bracket's two ends says where throughput reaches `knee_fraction` of the best;
    we measure there (rounded up, to land on the side that qualifies). Exact for affine latency,
    one or two probes land on the knee where bisecting the bracket took four; the bracket's
    geometric middle only when the line cannot tell. None once selected / below <= `resolution`,
    or when the line puts the knee at the selected size itself.
    """
    chosen = select_serve_batch(probes, max_safe_batch, latency_budget_s, knee_fraction)
    candidates = _candidates(probes, max_safe_batch, latency_budget_s)
    measured = {p.batch_size for p in probes if p.ran}
    below = [p for p in candidates if p.batch_size < chosen.batch_size]
    if not below:
        return None
    lower = max(below, key=lambda p: p.batch_size)
    upper = next(p for p in candidates if p.batch_size == chosen.batch_size)
    if upper.batch_size / lower.batch_size <= resolution or upper.batch_size - lower.batch_size <= 1:
        return None
    middle = int(round(math.sqrt(lower.batch_size * upper.batch_size)))
    wanted = knee_fraction * chosen.best_throughput
    # lower's throughput < wanted <= upper's, so the line's crossing lies inside the bracket
    slope = (1 / lower.throughput - 1 / upper.throughput) / (1 / lower.batch_size - 1 / upper.batch_size)
    intercept = 1 / upper.throughput - slope / upper.batch_size
    if slope > 0 and 1 / wanted > intercept:
        middle = math.ceil(slope / (1 / wanted - intercept) - 1e-9)
        if middle >= upper.batch_size:
            return None
    middle = min(max(middle, lower.batch_size + 1), upper.batch_size - 1)
    return None if middle in measured else middle


def batch_wait_timeout_s(
    serve_latency_s: float,
    latency_budget_s: float | None,
    batch1_latency_s: float,
    batch1_throughput: float,
    serve_throughput: float,
    fraction: float = 0.5,
) -> float:
    """How long a partial batch waits for more requests before it runs.

    Waiting pays only while requests arrive faster than batch 1 can serve them; at such a rate
    the next one comes within one batch-1 compute time, so that is the most worth waiting. It is
    scaled by what batching gains (1 - batch-1 throughput / serving throughput): a CPU whose
    throughput is flat in the batch gains nothing by waiting, a GPU nearly all of it. A request's
    latency is at most its wait plus the batch's compute, so the wait never spends more than a
    `fraction` of what the budget leaves after the compute. (Measured on a CPU: a wait of one
    serving batch's compute, 82 ms, halved a lone client's throughput against Ray's 10 ms default.)
    A serving replica calls this again with the latencies scaled to what its batches really take
    (serve/served_latency.py): the tuning times the worst case, alone on the device.
    """
    gain = 0.0 if serve_throughput <= 0 else max(0.0, 1.0 - batch1_throughput / serve_throughput)
    wait = batch1_latency_s * gain
    if latency_budget_s is not None:
        wait = min(wait, fraction * max(0.0, latency_budget_s - serve_latency_s))
    return max(0.0, wait)


def wait_from_arrivals(
    ceiling_s: float,
    batches: list[tuple[float, float, float]],
    limit_s: float | None = None,
    floor_s: float = 0.001,
    margin: float = 3.0,
    reach: float = 0.8,
    held_fraction: float = 0.25,
    held_min_s: float = 0.005,
) -> tuple[float, str]:
    """How long to wait, from how the requests of recent batches arrived.

    `batch_wait_timeout_s` gives the most worth waiting on an idle device (`ceiling_s`); whether
    anyone arrives in that window is the clients' doing. `batches` are (spread_s, held_s, wait_s)
    of recent batches that were not full (serve/served_latency.py's ArrivalLog):
    - Formed batches sat waiting for a busy device (the median batch: longer than a quarter of its
      wait and 5 ms, so that the event loop's own delay does not count):
      Ray Serve closes a batch at its wait even while the device is busy, so a wait shorter than
      a batch splits the queue into a convoy of small batches (4 closed-loop clients on the CPU
      Llama: batches of 1.0 at a 61 ms wait behind 90 ms batches). The time they sat was free, so
      the wait grows to what the median batch had anyway, up to `limit_s` (the latency budget's).
    - Arrivals reach the end of the window (in the 90th-percentile batch they spread over more
      than `reach` of its wait): more may come after it, so the ceiling.
    - Otherwise the window's tail catches no one: `margin` x the 90th-percentile spread, at least
      `floor_s`. A lone client's batches of one spread over 0 s, so it waits `floor_s`, not the
      8B Llama's 1.8 s; 8 clients answered together land within ~50 ms and wait ~150 ms.
    BentoML's adaptive batching likewise waits only while the next request is expected soon.
    Returns the wait and why, for the log.
    """
    if ceiling_s <= 0 or not batches:
        return max(0.0, ceiling_s), "the rule's wait (no arrivals to learn from)"

    def p(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    n = len(batches)
    held_until_s = p((w + h for _, h, w in batches), 0.5)
    if p((h - max(held_fraction * w, held_min_s) for _, h, w in batches), 0.5) > 0:
        wait_s = max(ceiling_s, held_until_s)
        if limit_s is not None:
            wait_s = min(wait_s, limit_s)
        return wait_s, (f"formed batches sat for a busy device after their wait (median of {n}: "
                        f"{held_until_s * 1e3:.1f} ms from the first request to the run), so waiting that long is "
                        f"free; at least the rule's {ceiling_s * 1e3:.1f} ms"
                        + (f", at most the budget's {limit_s * 1e3:.1f} ms" if limit_s is not None else ""))
    spread_s = p((s for s, _, _ in batches), 0.9)
    used = p(((s / w) if w > 0 else (1.0 if s > 0 else 0.0) for s, _, w in batches), 0.9)
    if used > reach:
        return ceiling_s, (f"requests arrived until the end of the wait (90th percentile of {n} batches: "
                           f"{used:.0%} of it), so the rule's {ceiling_s * 1e3:.1f} ms")
    wait_s = min(ceiling_s, max(floor_s, margin * spread_s))
    return wait_s, (f"the requests of a batch arrived within {spread_s * 1e3:.1f} ms of each other (90th percentile "
                    f"of {n} batches, {used:.0%} of the wait), so {margin:g}x that, at least {floor_s * 1e3:g} ms, "
                    f"at most the rule's {ceiling_s * 1e3:.1f} ms")
