"""The load generator behind `autobatch bench` (bench.py is the command and its report):
a bounded load, closed or open loop, against one route, and the report's numbers.

Closed loop: N workers, each sends its next request when its last one is answered (the load adapts to
the server). Open loop: requests start on a fixed schedule (uniform or Poisson arrivals) whether or
not earlier ones were answered; latency counts from the scheduled start, so a server that falls
behind shows it (no coordinated omission), and at most `max_in_flight` requests are outstanding
(arrivals beyond that are counted as "dropped", not sent).

Every run is bounded: it stops issuing at `duration_s` or after `max_requests` requests, whichever
comes first, waits at most `timeout_s` for the requests in flight, then cancels them ("unfinished").
Load goes to loopback addresses only unless `allow_remote`. Another protocol plugs in as a `sender`
(oip_commands.py's V2Sender). No Ray import here.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import httpx

from optimizer.stats import percentile

from .http_client import DEFAULT_URL, is_loopback, route_path  # noqa: F401 (is_loopback: re-exported)

DEFAULT_DURATION_S = 10.0
DEFAULT_MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 4096
MAX_RATE = 10_000.0
MAX_PROCESSES = 64
DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_TIMEOUT_S = 60.0
DROPPED = "dropped"  # open loop: an arrival while --max-in-flight requests were outstanding; not sent
UNFINISHED = "unfinished"  # still in flight when the run's time was up; cancelled


class BenchError(ValueError):
    """A setting that cannot work; the message says what to change."""


# ----- statistics (pure) -----
def latency_summary(latencies: Sequence[float]) -> dict:
    """count, mean, min, p50, p90, p99, max (seconds; None when there are none)."""
    if not latencies:
        return {"count": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": len(latencies),
        "mean": sum(latencies) / len(latencies),
        "min": min(latencies),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
    }


@dataclass
class Record:
    """One request: when it was sent (seconds after the start), how long it took, what came back."""

    sent_s: float
    latency_s: float
    status: str  # "200", "415", ..., or a transport error: "timeout", "ConnectError", DROPPED, UNFINISHED
    ok: bool
    tokens: int | None = None
    samples: int = 1  # an Open Inference Protocol request may carry many


def summarize(records: Sequence[Record], wall_s: float) -> dict:
    """The numbers a run reports, from its records."""
    answered = [r for r in records if r.status not in (DROPPED, UNFINISHED)]
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    tokens = [r.tokens for r in ok if r.tokens is not None]
    wall = max(wall_s, 1e-9)
    return {
        "wall_s": wall_s,
        "requests": len(records),  # every request the run issued (dropped and unfinished included)
        "answered": len(answered),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_count": len(records) - len(ok),
        "requests_per_s": len(answered) / wall,
        "samples": sum(r.samples for r in ok),
        "samples_per_s": sum(r.samples for r in ok) / wall,
        "tokens_per_s": sum(tokens) / wall if tokens else None,
        "latency_s": latency_summary([r.latency_s for r in ok]),
        # how fast the errors came back (a shed 503 should take milliseconds, not a queue's wait)
        "error_latency_s": latency_summary([r.latency_s for r in answered if not r.ok]),
    }


# ----- the load -----
@dataclass
class Load:
    """One run's settings. Exactly one of concurrency (closed loop) and rate (open loop)."""

    route: str
    payloads: list[tuple[bytes, str]]
    url: str = DEFAULT_URL
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float = DEFAULT_DURATION_S
    max_requests: int = DEFAULT_MAX_REQUESTS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    arrivals: str = "uniform"  # open loop: uniform | poisson
    warmup_requests: int = 0  # sent first (closed loop at the concurrency, or one at a time), not counted
    allow_remote: bool = False
    seed: int = 0
    headers: dict = field(default_factory=dict)
    # Another protocol's sender (oip_commands.py V2Sender): open(), send(index) ->
    # (status, ok, tokens, samples), close(). None: POST the payloads to the route.
    sender: object | None = None
    # closed loop: a client told 503 + Retry-After waits that long before its next request, as an
    # HTTP client should; off, it resends at once (the worst case for the server)
    honor_retry_after: bool = False
    # load processes: one Python process's event loop is itself a limit on requests/s
    # (docs/benchmarks.md, "Client and load generator"), so a faster server needs several (the
    # concurrency or rate is split between them)
    processes: int = 1

    def validate(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise BenchError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise BenchError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}, got {self.concurrency}")
        if self.rate is not None and not 0 < self.rate <= MAX_RATE:
            raise BenchError(f"--rate must be in (0, {MAX_RATE:.0f}] requests per second, got {self.rate}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise BenchError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds, got {self.duration_s}")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise BenchError(f"--requests must be between 1 and {MAX_REQUESTS}, got {self.max_requests}")
        if not 0 < self.timeout_s <= MAX_DURATION_S:
            raise BenchError(f"--timeout must be in (0, {MAX_DURATION_S:.0f}] seconds, got {self.timeout_s}")
        if not 1 <= self.max_in_flight <= MAX_CONCURRENCY:
            raise BenchError(f"--max-in-flight must be between 1 and {MAX_CONCURRENCY}, got {self.max_in_flight}")
        if self.arrivals not in ("uniform", "poisson"):
            raise BenchError(f"--arrivals must be uniform or poisson, got {self.arrivals!r}")
        if not 0 <= self.warmup_requests <= MAX_REQUESTS:
            raise BenchError(f"--warmup must be between 0 and {MAX_REQUESTS}, got {self.warmup_requests}")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise BenchError(f"--processes must be between 1 and {MAX_PROCESSES}, got {self.processes}")
        if self.concurrency is not None and self.processes > self.concurrency:
            raise BenchError(f"--processes ({self.processes}) must not exceed --concurrency ({self.concurrency}): "
                             f"each process keeps at least one request in flight")
        if not self.payloads:
            raise BenchError("no payload to send; give --input FILE or --prompt TEXT")
        if self.sender is not None:
            return  # the sender checks its own address
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise BenchError(f"--url must be an http(s) URL, got {self.url!r}")
        if not self.allow_remote and not is_loopback(self.url):
            raise BenchError(f"{self.url} is not a loopback address; load goes to 127.0.0.1/localhost unless you "
                             f"pass --allow-remote (only against servers you run)")
        route_path(self.route)

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


class LoadRun:
    def __init__(self, load: Load, progress: bool):
        self.load = load
        self.route = route_path(load.route)
        self.records: list[Record] = []
        self.progress = progress
        self.start = 0.0
        self.in_flight: dict[asyncio.Task, float] = {}  # task -> sent time (perf_counter)
        self.stopped_by = None

    async def _post(self, client: httpx.AsyncClient, index: int) -> httpx.Response:
        body, content_type = self.load.payloads[index % len(self.load.payloads)]
        return await client.post(self.route, content=body, headers={"content-type": content_type, **self.load.headers})

    async def _one(self, client: httpx.AsyncClient, index: int, scheduled: float | None) -> float | None:
        """Send one request and record it; the seconds a 503 asked to wait (Retry-After), else None."""
        sent = time.perf_counter()
        began = sent if scheduled is None else scheduled
        tokens = None
        if self.load.sender is not None:
            status, ok, tokens, samples = await self.load.sender.send(index)
            self.records.append(Record(sent - self.start, time.perf_counter() - began, status, ok, tokens, samples))
            return None
        retry_after_s = None
        try:
            response = await self._post(client, index)
            status, ok = str(response.status_code), 200 <= response.status_code < 300
            if ok:
                tokens = _completion_tokens(response)
            elif response.status_code == 503:
                retry_after_s = _retry_after_s(response.headers.get("retry-after"))
        except httpx.TimeoutException:
            status, ok = "timeout", False
        except httpx.HTTPError as exc:
            status, ok = type(exc).__name__, False
        self.records.append(Record(sent - self.start, time.perf_counter() - began, status, ok, tokens))
        return retry_after_s

    def _spawn(self, client, index, scheduled=None) -> asyncio.Task:
        task = asyncio.create_task(self._one(client, index, scheduled))
        self.in_flight[task] = time.perf_counter()
        task.add_done_callback(lambda t: self.in_flight.pop(t, None))
        return task

    async def _closed(self, client, deadline: float) -> None:
        issued = 0

        async def worker():
            nonlocal issued
            while True:
                if issued >= self.load.max_requests:
                    self.stopped_by = self.stopped_by or "requests"
                    return
                if time.perf_counter() >= deadline:
                    self.stopped_by = self.stopped_by or "duration"
                    return
                index = issued
                issued += 1
                retry_after_s = await self._spawn(client, index)
                if retry_after_s and self.load.honor_retry_after:
                    await asyncio.sleep(min(retry_after_s, max(0.0, deadline - time.perf_counter())))

        await asyncio.gather(*(worker() for _ in range(self.load.concurrency)))

    async def _open(self, client, deadline: float) -> None:
        rng = random.Random(self.load.seed)
        at = self.start
        for index in range(self.load.max_requests):
            if self.load.arrivals == "uniform":
                at = self.start + index / self.load.rate
            elif index:
                at += rng.expovariate(self.load.rate)
            if at >= deadline:
                self.stopped_by = "duration"
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self.in_flight) >= self.load.max_in_flight:
                self.records.append(Record(at - self.start, 0.0, DROPPED, False))
                continue
            self._spawn(client, index, scheduled=at)
        else:
            self.stopped_by = "requests"
        if self.in_flight:
            await asyncio.wait(list(self.in_flight))

    async def _ticker(self, bar, deadline: float, by_count: bool) -> None:
        while True:
            now = time.perf_counter()
            done = len(self.records)
            bar.n = min(done, bar.total) if by_count else round(min(now - self.start, self.load.duration_s), 1)
            ok = sum(r.ok for r in self.records)
            bar.set_postfix_str(f"{done} done, {ok} ok, {done - ok} errors, {len(self.in_flight)} in flight, "
                                f"{done / max(now - self.start, 1e-9):.1f} req/s", refresh=False)
            bar.refresh()
            await asyncio.sleep(0.25)

    async def run(self, after_warmup=None) -> dict:
        """`after_warmup()`, if given, is called (in a thread) once the warm-up is done: processes
        of one run wait for each other there, so that their timed parts start together."""
        load = self.load
        connections = load.concurrency if load.mode == "closed" else load.max_in_flight
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        if load.sender is not None:
            await load.sender.open()
        async with httpx.AsyncClient(base_url=load.url, timeout=load.timeout_s, limits=limits, trust_env=False) as client:
            if load.warmup_requests:
                await self._warmup(client)
            if after_warmup is not None:
                await asyncio.to_thread(after_warmup)
            bar = ticker = None
            by_count = load.max_requests < DEFAULT_MAX_REQUESTS
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=load.max_requests if by_count else load.duration_s, unit="req" if by_count else "s",
                           desc=f"bench {self.route}", file=sys.stderr, leave=False, dynamic_ncols=True)
            self.start = time.perf_counter()
            deadline = self.start + load.duration_s
            if bar is not None:
                ticker = asyncio.create_task(self._ticker(bar, deadline, by_count))
            driver = asyncio.create_task(self._closed(client, deadline) if load.mode == "closed"
                                         else self._open(client, deadline))
            # issuing stops at the deadline; what is in flight then gets at most the request timeout
            done, _ = await asyncio.wait([driver], timeout=load.duration_s + load.timeout_s)
            if not done:
                stragglers = list(self.in_flight.items())
                driver.cancel()
                for task, _sent in stragglers:
                    task.cancel()
                await asyncio.gather(driver, *(t for t, _ in stragglers), return_exceptions=True)
                now = time.perf_counter()
                self.records += [Record(sent - self.start, now - sent, UNFINISHED, False) for _t, sent in stragglers]
            elif driver.exception() is not None:
                raise driver.exception()
            wall = time.perf_counter() - self.start
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                bar.close()
        if load.sender is not None:
            await load.sender.close()
        return report(load, self.route, self.records, wall, self.stopped_by)

    async def _warmup(self, client) -> None:
        width = self.load.concurrency or 1
        queue = list(range(self.load.warmup_requests))

        async def worker():
            while queue:
                index = queue.pop()
                if self.load.sender is not None:
                    await self.load.sender.send(index)
                    continue
                try:
                    await self._post(client, index)
                except httpx.HTTPError:
                    pass

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(width))),
                               timeout=self.load.timeout_s * max(1, math.ceil(len(queue) / width)))


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form autobatch and Ray send); None if absent or a date."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _completion_tokens(response: httpx.Response) -> int | None:
    """Generated tokens in an LLM answer ({"completion_tokens": n}); None for other routes."""
    if b"completion_tokens" not in response.content:
        return None
    try:
        value = response.json().get("completion_tokens")
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def report(load: Load, route: str, records: Sequence[Record], wall_s: float, stopped_by: str | None) -> dict:
    """A run's report: its settings and summarize()'s numbers."""
    return {
        "url": load.url, "route": route, "mode": load.mode, "concurrency": load.concurrency,
        "rate": load.rate, "arrivals": load.arrivals if load.mode == "open" else None,
        "duration_bound_s": load.duration_s, "requests_bound": load.max_requests,
        "stopped_by": stopped_by or "duration", "warmup_requests": load.warmup_requests,
        "payloads": len(load.payloads), "processes": load.processes, **summarize(records, wall_s),
        **({"protocol": "v2", "transport": load.sender.transport, "samples_per_request": load.sender.samples,
            "target": load.sender.url} if load.sender is not None else {}),
    }
