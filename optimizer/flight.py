"""Single-flight tuning: among many processes that miss the cache for one key, one tunes and the
others wait for its answer and take it. Ray-free: the lease service may be this process's
`LeaseTable` or, in a Ray cluster, a named actor around one (serve/replica/single_flight.py).

`autobatch(..., single_flight=flights)` calls `flights(key)` on a cache miss and enters it:
- the context yields a `Flight` whose `answer` is the stored tuning another process published for
  the key while this one waited (then nothing is measured here), or None: this process holds the
  key's lease, measures, and `publish`es its tuning for the waiters;
- a holder that fails (an exception) releases its lease, and one waiter takes over;
- a holder that dies stops renewing its lease, which expires after `lease_s`, and one waiter takes
  over; a lease is renewed every lease_s / 4 while its holder measures;
- a lease service that cannot be reached is not a reason to fail: the process tunes on its own
  (one warning), as it would without single-flight.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Protocol

from .trust import check_against_key
from .tuning import Tuning, TuningFormatError

log = logging.getLogger("autobatch")

DEFAULT_LEASE_S = 60.0
# How long a published answer is handed to late askers. Waiters poll every poll_s, so they see it;
# later starts read the (shared) cache, and `autobatch cache clear` is not undone for longer.
DEFAULT_ANSWER_KEEP_S = 600.0


class Flight:
    """One process's part in one key's flight: the answer it waited for, or the lease to measure."""

    def __init__(self, answer: dict | None = None, publish: Callable[[dict], None] | None = None):
        self.answer = answer
        self._publish = publish
        self.published = False

    def publish(self, stored_tuning: dict) -> None:
        """Hand this process's tuning (Tuning.stored()) to the processes waiting on the key."""
        if self._publish is not None:
            self._publish(stored_tuning)
        self.published = True


class SingleFlight(Protocol):
    def __call__(self, key: str) -> ContextManager[Flight]: ...


def trusted_answer(answer: Any, key_fields: dict) -> Tuning | str:
    """The published answer as a Tuning when it passes the cache's own trust checks, else the reasons."""
    try:
        tuning = Tuning.from_dict(answer)
    except TuningFormatError as exc:
        return str(exc)
    reasons = check_against_key(tuning, key_fields)
    return "; ".join(reasons) if reasons else tuning


@dataclass
class _Lease:
    holder: str
    expires_s: float


class LeaseTable:
    """The lease service's policy: per key, the first asker holds the lease until it publishes,
    releases, or stops renewing; everyone else is told to wait, or handed the published answer."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S, answer_keep_s: float = DEFAULT_ANSWER_KEEP_S,
                 clock: Callable[[], float] = time.monotonic):
        self.lease_s, self.answer_keep_s, self._clock = float(lease_s), float(answer_keep_s), clock
        self._leases: dict[str, _Lease] = {}
        self._answers: dict[str, tuple[dict, float]] = {}  # key -> (stored tuning, published at)
        self._lock = threading.Lock()
        self.grants: dict[str, int] = {}  # how many times each key's lease was granted (one per tuning begun)

    def acquire(self, key: str, holder: str) -> dict:
        """{"granted": True} to measure; {"answer": stored tuning} to take; else wait on "holder"."""
        with self._lock:
            now = self._clock()
            published = self._answers.get(key)
            if published is not None and now - published[1] <= self.answer_keep_s:
                return {"granted": False, "answer": published[0], "holder": None}
            lease = self._leases.get(key)
            if lease is None or lease.expires_s < now or lease.holder == holder:
                if lease is None or lease.holder != holder:
                    self.grants[key] = self.grants.get(key, 0) + 1
                self._leases[key] = _Lease(holder, now + self.lease_s)
                return {"granted": True, "answer": None, "holder": holder}
            return {"granted": False, "answer": None, "holder": lease.holder}

    def renew(self, key: str, holder: str) -> bool:
        with self._lock:
            lease = self._leases.get(key)
            if lease is None or lease.holder != holder:
                return False  # expired and taken over: the holder's answer is still published when done
            lease.expires_s = self._clock() + self.lease_s
            return True

    def publish(self, key: str, holder: str, answer: dict) -> None:
        with self._lock:
            self._answers[key] = (answer, self._clock())
            if key in self._leases and self._leases[key].holder == holder:
                del self._leases[key]

    def release(self, key: str, holder: str) -> None:
        with self._lock:
            if key in self._leases and self._leases[key].holder == holder:
                del self._leases[key]

    def state(self) -> dict:
        with self._lock:
            return {"leases": {k: v.holder for k, v in self._leases.items()}, "answers": sorted(self._answers),
                    "grants": dict(self.grants)}


class LeasedFlights:
    """`SingleFlight` over a lease service (anything with LeaseTable's acquire/renew/publish/release,
    called directly: a LeaseTable, or serve/replica/single_flight.py's proxy to the cluster's actor)."""

    def __init__(self, service, holder: str | None = None, *, poll_s: float = 0.5, lease_s: float = DEFAULT_LEASE_S,
                 max_wait_s: float | None = None, say: Callable[[str], None] | None = None):
        self.service = service
        self.holder = holder or f"process-{uuid.uuid4().hex[:12]}"
        self.poll_s, self.lease_s, self.max_wait_s = poll_s, lease_s, max_wait_s
        self._say = say or log.info

    @contextmanager
    def __call__(self, key: str) -> Iterator[Flight]:
        started = time.monotonic()
        waiting_on = None
        while True:
            try:
                reply = self.service.acquire(key, self.holder)
            except Exception as exc:  # noqa: BLE001 - no coordinator: tune alone rather than not at all
                log.warning("autobatch: single-flight for %s unavailable (%s: %s); tuning without it",
                            key, type(exc).__name__, exc)
                reply = None
            if reply is None:
                yield Flight()
                return
            if reply.get("answer") is not None:
                yield Flight(answer=reply["answer"])
                return
            if reply.get("granted"):
                break
            if reply.get("holder") != waiting_on:
                waiting_on = reply.get("holder")
                self._say(f"autobatch: {key} is being tuned by {waiting_on}; waiting for its answer")
            if self.max_wait_s is not None and time.monotonic() - started > self.max_wait_s:
                self._say(f"autobatch: waited {self.max_wait_s:g} s for {key}; tuning here")
                yield Flight()
                return
            time.sleep(self.poll_s)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, stop), daemon=True, name="autobatch-lease")
        renewer.start()
        flight = Flight(publish=lambda answer: self._publish(key, answer))
        try:
            yield flight
        finally:
            stop.set()
            renewer.join(timeout=5)
            if not flight.published:
                try:
                    self.service.release(key, self.holder)
                except Exception:  # noqa: BLE001 - the lease expires on its own
                    pass

    def _publish(self, key: str, answer: dict) -> None:
        try:
            self.service.publish(key, self.holder, answer)
        except Exception as exc:  # noqa: BLE001 - the tuning is done and cached; waiters take over on expiry
            log.warning("autobatch: could not publish the tuning of %s to the waiters (%s: %s)",
                        key, type(exc).__name__, exc)

    def _renew(self, key: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 4):
            try:
                self.service.renew(key, self.holder)
            except Exception:  # noqa: BLE001 - a missed renewal only risks a second tuning
                pass


__all__ = ["Flight", "SingleFlight", "LeaseTable", "LeasedFlights", "trusted_answer"]
