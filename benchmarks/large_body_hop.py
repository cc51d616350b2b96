"""The router -> replica hop for a large body, two ways (issue 23): Ray Serve's gRPC transport
between replicas (what `make serve`'s HAProxy layout uses, RAY_SERVE_THROUGHPUT_OPTIMIZED) with its
message limit raised past the body, against the actor path through Ray's object store
(`handle.options(_by_reference=True)`, what serve/oip/router.py does for a body over the limit).

    python benchmarks/large_body_hop.py [--mib 0.1 1 3.5 6] [--calls 40]

A Ray cluster of its own (2 CPUs) with the HAProxy ingress's settings and the replica gRPC limit
raised to 256 MiB; one sink deployment answers len(body); the driver's handle is the router's side
of the hop. Prints per-call latency (median, p90) and copies per second for each way, and the
4 MiB-limit refusal the default layout gives."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402,F401 - repo on sys.path, offline settings
from ray import serve  # noqa: E402

from serve.local import free_port, ingress_env  # noqa: E402

RAISED_LIMIT_BYTES = 256 * 2**20


async def _measure(handle, sizes_mib: list[float], calls: int) -> None:
    """Each way in turn, one call at a time (the hop's own cost, not a queue's). The handles are
    made inside the event loop: in the throughput-optimized mode a handle's router runs on it."""
    ways = {"grpc (limit raised)": handle.options(method_name="size"),
            "object store (_by_reference)": handle.options(method_name="size", _by_reference=True)}
    for mib in sizes_mib:
        body = os.urandom(int(mib * 2**20))
        print(f"body {len(body)} bytes, {calls} calls each", flush=True)
        for name, h in ways.items():
            await _one_way(name, h, body, calls)
    await serve.shutdown_async()


async def _one_way(name: str, h, body: bytes, calls: int) -> None:
    for _ in range(3):
        assert await h.remote(body) == len(body)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await h.remote(body)
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"{name:30s} median {statistics.median(times) * 1e3:7.1f} ms  p90 "
          f"{times[int(0.9 * len(times)) - 1] * 1e3:7.1f} ms  {1 / statistics.mean(times):6.1f} calls/s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=float, nargs="+", default=[0.1, 1.0, 3.5, 6.0])
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args(argv)
    os.environ.update(ingress_env("haproxy"))
    os.environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] = str(RAISED_LIMIT_BYTES)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own, not a running head
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # HAProxy's port: a free one

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Sink:
        def size(self, body: bytes) -> int:
            return len(body)

    handle = serve.run(Sink.bind(), name="sink", route_prefix=None)
    print(f"ray {ray.__version__}, {os.cpu_count()} CPUs")
    asyncio.run(_measure(handle, args.mib, args.calls))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
