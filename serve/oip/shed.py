"""Shedding at the router: a request the model's replicas would refuse is refused here, before its
body is read, parsed or forwarded.

Why: under overload a refusal at the replica is expensive. The router reads the whole body (32
JPEGs are ~3.6 MB), parses it, and sends it through Ray's object store to the replica, whose
admission (serve/replica/admission.py) then says no: the router's one event loop, the object store and the
replica's loop carry refused requests beside the served ones, and served throughput falls as the
clients that resend at once outnumber the ones served. Here the router keeps a cheap view of each
model's admission state and answers JSON 503 + Retry-After itself, from the request's headers.

The view (Ray-free, one per model, `ModelShedder`):
  room       every answer of a replica (served or refused) carries its admission's `room()`:
             the most samples it admits pending (2 latency budgets + one batch of work, at its
             served batch time) and how long its queue takes to drain; kept per replica for
             VIEW_TTL_S, and the replicas' rooms add up.
  in flight  the samples this router forwarded to the model and has not had answered. It runs ahead
             of what the replicas hold by the requests on their way (the object store, answers
             coming back), and behind it by other routers' requests: each answer also carries the
             replica's pending samples, and the difference (replicas' pending - in flight, at that
             answer, a running mean) corrects the count, so the router does not shed what the
             replica would have taken.
  decision   shed when something is in flight and the corrected count + this request's samples
             exceed the room: the replica's own rule (it refuses when what it holds + n would take
             longer than its bound), applied one hop earlier. Nothing is shed before a replica has answered once,
             nor when nothing is in flight, so the router never refuses what a replica would take
             from an empty queue; the replica's admission stays the authority for what is forwarded.
  samples    before the body is read, a request's samples are estimated from its Content-Length and
             the bytes per sample of this model's parsed requests (rounded down, so the estimate
             errs towards forwarding); after parsing, the count is known and checked again.
With several router replicas each sees only its own in-flight samples, so it sheds less early; the
replicas' admission still refuses what gets past.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("ray.serve")

VIEW_TTL_S = 30.0  # a replica not heard from for this long no longer counts (stopped, replaced, idle)
BYTES_PER_SAMPLE_WEIGHT = 0.2  # the running estimate's weight of the newest parsed request
OFFSET_WEIGHT = 0.2  # the in-flight correction's weight of the newest answer
SHED_LOG_INTERVAL_S = 10.0  # at most one line per model this often, with the count since the last one


class Shed(Exception):
    """This router refused a request for its model's replicas: a 503 with `retry_after_s`."""

    def __init__(self, model: str, message: str, retry_after_s: float):
        super().__init__(message)
        self.model, self.message, self.retry_after_s = model, message, retry_after_s
        self.status = 503

    def headers(self) -> dict:
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict:
        return {"error": self.message}


class ModelShedder:
    """One model's view: its replicas' rooms, this router's samples in flight to them."""

    def __init__(self, model: str, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self._clock = clock
        self._rooms: dict[str, tuple[float, float, float, float]] = {}  # replica -> (room, drain s, seen at, pending)
        self.in_flight_samples = 0
        self.offset_samples = 0.0  # replicas' pending - this router's in flight, as the answers show it
        self._bytes_per_sample: float | None = None
        self.shed_count = 0

    # ----- what the replicas' answers and the parsed requests say
    def observe(self, room: dict | None) -> None:
        """A replica's `Admission.room()`, as it came back with an answer (None: an older replica);
        called once the answered request is no longer counted in flight."""
        if not room or room.get("room_samples") is None:
            return
        self._rooms[str(room.get("replica"))] = (float(room["room_samples"]), float(room.get("drain_s") or 0.0),
                                                 self._clock(), float(room.get("pending_samples") or 0))
        self.room()  # drops the stale ones before they count in the sum
        offset = sum(pending for *_, pending in self._rooms.values()) - self.in_flight_samples
        self.offset_samples += OFFSET_WEIGHT * (offset - self.offset_samples)

    def pending_estimate(self) -> float:
        """The samples the replicas hold now, as this router can tell: its in flight, corrected."""
        return max(0.0, self.in_flight_samples + self.offset_samples)

    def observe_body(self, body_bytes: int, samples: int) -> None:
        """A parsed request's size: what Content-Length says of the next ones' sample counts."""
        if samples < 1 or body_bytes < 1:
            return
        per = body_bytes / samples
        old = self._bytes_per_sample
        self._bytes_per_sample = per if old is None else old + BYTES_PER_SAMPLE_WEIGHT * (per - old)

    def estimate_samples(self, content_length: int | None) -> int:
        """Samples in a request of `content_length` bytes not yet read: at least 1, rounded down."""
        if not content_length or not self._bytes_per_sample:
            return 1
        return max(1, int(content_length // self._bytes_per_sample))

    # ----- the decision
    def room(self) -> tuple[float, float] | None:
        """(samples the fresh replicas admit in all, the longest drain among them), None if none is known."""
        now = self._clock()
        for replica in [r for r, (_, _, seen, _) in self._rooms.items() if now - seen > VIEW_TTL_S]:
            del self._rooms[replica]
        if not self._rooms:
            return None
        return sum(r for r, *_ in self._rooms.values()), max(d for _, d, *_ in self._rooms.values())

    def check(self, samples: int) -> None:
        """Shed (raise) a request of `samples` the replicas would refuse now; else return."""
        known = self.room()
        if known is None or self.in_flight_samples <= 0:
            return
        room_samples, drain_s = known
        pending = self.pending_estimate()
        if pending + samples <= room_samples:
            return
        self.shed_count += 1
        raise Shed(self.model,
                   f"{self.model} is at capacity: its replicas hold about {pending:.0f} samples and admit "
                   f"{room_samples:.0f} (about 2 latency budgets of work), and this request brings {samples}; "
                   f"retry after the Retry-After seconds, or send fewer samples per request",
                   retry_after_s=max(1.0, drain_s))

    @contextmanager
    def forwarding(self, samples: int) -> Iterator[None]:
        """Count `samples` in flight while a request is forwarded and answered."""
        self.in_flight_samples += samples
        try:
            yield
        finally:
            self.in_flight_samples -= samples

    def describe(self) -> dict:
        known = self.room()
        return {"in_flight_samples": self.in_flight_samples, "pending_estimate": self.pending_estimate(),
                "room_samples": None if known is None else known[0],
                "replicas_heard": len(self._rooms), "bytes_per_sample": self._bytes_per_sample,
                "shed": self.shed_count}


class RouterShedder:
    """The router's views, one per model, and the count of what it shed (a metric and a log line at a rate)."""

    def __init__(self, models: list[str], clock: Callable[[], float] = time.monotonic, counter=None):
        self._clock = clock
        self.models = {m: ModelShedder(m, clock) for m in models}
        self._counter = counter  # a ray.serve.metrics.Counter with tag "model", or None
        self._unlogged: Counter = Counter()
        self._logged_at: dict[str, float] = {}

    def __getitem__(self, model: str) -> ModelShedder:
        return self.models[model]

    def check(self, model: str, samples: int) -> None:
        try:
            self.models[model].check(samples)
        except Shed:
            self._count(model)
            raise

    def check_before_body(self, model: str, content_length: int | None) -> None:
        self.check(model, self.models[model].estimate_samples(content_length))

    def _count(self, model: str) -> None:
        if self._counter is not None:
            self._counter.inc(tags={"model": model})
        self._unlogged[model] += 1
        now = self._clock()
        if now - self._logged_at.get(model, -math.inf) >= SHED_LOG_INTERVAL_S:
            view = self.models[model].describe()
            log.warning("autobatch: router shed %d request(s) for %s since the last line: about %.0f samples held "
                        "by its replicas, room for %s", self._unlogged[model], model, view["pending_estimate"],
                        f"{view['room_samples']:.0f}" if view["room_samples"] is not None else "?")
            self._unlogged[model] = 0
            self._logged_at[model] = now

    def describe(self) -> dict:
        return {m: s.describe() for m, s in self.models.items()}


def shed_counter():
    """`autobatch_router_requests_shed` (Ray exports it as ray_autobatch_router_requests_shed_total)."""
    from ray.serve.metrics import Counter as RayCounter

    return RayCounter("autobatch_router_requests_shed",
                      description="requests the OIP router refused before reading or forwarding them, because the "
                                  "model's replicas would have refused them (serve/oip/shed.py)",
                      tag_keys=("model",))


def content_length(headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value and value.isdigit() else None
