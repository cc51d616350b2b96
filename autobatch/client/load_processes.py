"""`run_load`: one bounded load, in this process or, for `autobatch bench --processes N`, split
between N forked processes.

One Python event loop sends ~1,000-2,000 small requests per second at most (httpx and the loop's
own work per request), so measuring a server faster than that from one process measures the
client. Each process runs its share of the concurrency (or rate) with load.py's LoadRun,
waits for the others after its warm-up, and sends its records back; the report is computed over
all of them, as one run's.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

from .http_client import route_path
from .load import BenchError, Load, LoadRun, Record, report


def split(load: Load) -> list[Load]:
    """One Load per process, the concurrency (or rate), the request bound and the warm-up shared
    out between them, each with its own seed."""
    n = load.processes

    def share(total: int, i: int) -> int:
        return total // n + (i < total % n)

    return [replace(load, processes=1, seed=load.seed + i,
                    concurrency=share(load.concurrency, i) if load.concurrency is not None else None,
                    rate=load.rate / n if load.rate is not None else None,
                    max_requests=max(1, share(load.max_requests, i)), warmup_requests=share(load.warmup_requests, i))
            for i in range(n)]


def _run_part(part: Load, barrier, conn) -> None:
    """One load process: its share of the run; its records go back through `conn`."""
    try:
        run = LoadRun(part, progress=False)
        finished = asyncio.run(run.run(after_warmup=lambda: barrier.wait(timeout=part.timeout_s * 4)))
        conn.send(("ok", run.records, finished["wall_s"], run.stopped_by))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        barrier.abort()
        conn.send(("error", f"{type(exc).__name__}: {exc}", 0.0, None))
    finally:
        conn.close()


def run_in_processes(load: Load) -> dict:
    """The load split between `load.processes` forked processes that start their timed parts
    together; one report over all of their requests (the wall is the longest process's)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the payloads and the sender go as they are, unpickled
    parts = split(load)
    barrier = context.Barrier(len(parts))
    pipes, children = [], []
    for part in parts:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_run_part, args=(part, barrier, send), daemon=True)
        child.start()
        send.close()
        pipes.append(receive)
        children.append(child)
    records: list[Record] = []
    walls, stopped, failures = [], set(), []
    for receive, child in zip(pipes, children):
        try:
            kind, got, wall, stopped_by = receive.recv()
        except EOFError:
            kind, got, wall, stopped_by = "error", f"load process {child.pid} exited with {child.exitcode}", 0.0, None
        child.join()
        if kind != "ok":
            failures.append(got)
            continue
        records += got
        walls.append(wall)
        stopped.add(stopped_by or "duration")
    if failures:
        raise BenchError(f"{len(failures)} of {len(parts)} load processes failed: {failures[0]}")
    return report(load, route_path(load.route), records, max(walls), ", ".join(sorted(stopped)))


def run_load(load: Load, progress: bool = False) -> dict:
    """Run one bounded load and return its report (see bench.format_report for the fields)."""
    load.validate()
    if load.processes > 1:
        return run_in_processes(load)
    return asyncio.run(LoadRun(load, progress).run())
