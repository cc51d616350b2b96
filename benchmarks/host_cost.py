"""Host CPU time per sample inside a replica's serving path, with a device that does nothing.

    python benchmarks/host_cost.py                       # this tree
    python benchmarks/host_cost.py --tree /tmp/before    # another checkout's serve/ (git archive <commit> | tar -x -C /tmp/before)
    python benchmarks/host_cost.py --quick               # seconds: keeps the script from rotting

One replica (serve/replica/replica.py), started in this process without Ray, serves requests from
closed-loop clients on its own event loop: admission -> decode (the replica's decode threads) ->
the batching -> the device call -> the split per request -> encode -> the answer's body. The model
is a stand-in whose forward returns at once, so every CPU second the process spends is the host's
serving path (process CPU time, all threads: the event loop, the decode threads, the worker).

Two stand-ins:
  image   ResNet-50's spec on its device pipeline, as a GPU replica runs it: `decode` checks the
          JPEG's header on the CPU and keeps the bytes (a 640x480 JPEG, 23.6 KB), the forward
          returns a fixed top-5 per sample, `encode` / `encode_tensors` are the spec's own.
  number  benchmarks/stand_in_device.py with 0 ms per batch: a JSON number in, its echo out.
The latency budget is 5 s so that admission (serve/replica/admission.py) never sheds: a refused request
would cost less than a served one. Requests: 1 sample each through the simple route (POST /, what the HTTP proxy hands a replica),
32 samples each through the Open Inference Protocol route (what the OIP router hands a replica:
an InferRequest of binary BYTES tensors, already parsed). Ray's own hops (proxy, router, handle)
are not in it: they run in other processes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _use_tree(tree: str | None) -> str:
    tree = os.path.abspath(tree or os.path.dirname(HERE))
    sys.path[:0] = [tree, HERE]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return tree


def image_stand_in():
    """ResNet-50's spec on the device pipeline with a forward that computes nothing."""
    from deployments.registry import spec_class

    base = spec_class("resnet50")

    class NoDeviceResNet(base):  # type: ignore[misc, valid-type]
        def load(self, device, dtype):
            self.device, self.dtype_name, self.model = "cpu", dtype, object()
            return self.model

        @property
        def pipeline(self) -> str:
            return "device"  # a GPU replica's: a header check on the CPU, the bytes batched

        def overlaps(self) -> bool:
            return False

        def example_batch(self, n):
            return [None] * n

        def predict(self, samples):
            row = [{"class_id": i, "score": 0.2} for i in range(self.top_k)]
            return [row for _ in samples]

    NoDeviceResNet.name = "resnet50"
    return NoDeviceResNet


def build_replica(kind: str, cache_path: str):
    """A Replica and what feeds it, for whichever version of serve/ is on the path."""
    from serve.replica.replica import Replica
    from serve.replica.settings import ReplicaConfig

    if kind == "image":
        import deployments.registry as registry

        stand_in = image_stand_in()
        registry_create = registry.create_spec

        def create_spec(name, weights=None, **options):
            return stand_in(weights, **options) if name == "resnet50" else registry_create(name, weights, **options)

        import serve.replica.replica as replica_module

        replica_module.create_spec = create_spec
        config = ReplicaConfig(model="resnet50", device="cpu", cache_path=cache_path, max_batch=256,
                               latency_budget_ms=5000.0, warm_sizes_budget_s=0.0, single_flight=False,
                               options={"image_pipeline": "device"})
    else:
        os.environ["AUTOBATCH_MODELS"] = "stand_in_device=stand_in_device:StandInDeviceSpec"
        config = ReplicaConfig(model="stand_in_device", device="cpu", cache_path=cache_path, max_batch=256,
                               latency_budget_ms=5000.0, warm_sizes_budget_s=0.0, single_flight=False,
                               options={"fixed_ms": 0.0, "per_sample_ms": 0.0})
    old = hasattr(Replica, "enqueue")  # before serve/replica/batcher.py: @serve.batch in front of a device queue
    if old:
        import types

        from ray import serve

        # outside a replica, Ray's batch queue still asks the replica context for max_ongoing_requests
        context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=512),
                                        deployment="host_cost", replica_tag="host_cost", app_name="host_cost")
        serve.get_replica_context = lambda: context

        class Glue:  # what serve/cluster/deployment.py did: @serve.batch hands each closed batch to the replica
            replica = None

            @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=4096)
            async def infer(self, items):
                return await self.replica.enqueue(items)

        glue = Glue()
        replica = Replica(config, config, knobs=glue.infer, max_ongoing=lambda: 512)
        glue.replica = replica
        return replica, glue.infer
    replica = Replica(config, config, max_ongoing=lambda: 512)
    return replica, None


async def measure(kind: str, samples: int, clients: int, requests: int) -> dict:
    from wire.request import InferRequest
    from wire.tensors import Tensor
    from serve.api.routes import HttpRoutes
    from serve.api.tensor_routes import TensorRoutes

    cache = os.path.join(tempfile.mkdtemp(prefix="host-cost-"), "tuning.json")
    replica, infer = build_replica(kind, cache)
    await replica.start([])
    routes = HttpRoutes(replica, infer) if infer is not None else HttpRoutes(replica)
    tensors = TensorRoutes(replica)
    import numpy as np

    if kind == "image":
        from deployments.images import example_jpeg

        body, content_type, name = example_jpeg(), "image/jpeg", "images"
    else:
        body, content_type, name = b"1.5", "application/json", "value"
    headers = {"content-type": content_type, "content-length": str(len(body))}

    async def read_body():
        return body

    async def one() -> None:
        if samples == 1:
            response = await routes.answer("POST", "/", headers, read_body)
            if response.status_code != 200:
                raise RuntimeError(f"answered {response.status_code}: {response.body[:200]!r}")
            return
        data = np.empty(samples, dtype=object)
        data[:] = [body] * samples
        request = InferRequest(replica.model_name, [Tensor(name, "BYTES", (samples,), data)])
        answer = await tensors.infer(request)
        if not hasattr(answer, "outputs"):
            raise RuntimeError(f"answered {answer.status}: {answer.message}")

    async def client(count: int) -> None:
        for _ in range(count):
            await one()

    per_client = max(1, requests // clients)
    await asyncio.gather(*(client(max(1, per_client // 5)) for _ in range(clients)))  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(per_client) for _ in range(clients)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = per_client * clients
    batches = replica.stats.batches
    return {"stand_in": kind, "samples_per_request": samples, "clients": clients, "requests": done,
            "us_per_sample": cpu / (done * samples) * 1e6, "us_per_request": cpu / done * 1e6,
            "samples_per_s": done * samples / wall, "mean_batch": replica.stats.samples_served / batches if batches else 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default=None, help="the checkout whose serve/ to measure (default: this one)")
    p.add_argument("--label", default=None)
    p.add_argument("--stand-ins", nargs="+", default=["image", "number"], choices=["image", "number"])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 32])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=3000, help="requests of 1 sample; of 32, a tenth of it")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the table shows the lowest CPU time")
    p.add_argument("--quick", action="store_true", help="the number stand-in, 64 requests, one run per row")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if args.quick:
        args.stand_ins, args.requests, args.repeats, args.clients = ["number"], 64, 1, 8
    tree = _use_tree(args.tree)
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    rows = []
    for kind in args.stand_ins:
        for samples in args.samples:
            requests = args.requests if samples == 1 else max(args.clients, args.requests // 10)
            runs = [asyncio.run(measure(kind, samples, args.clients, requests)) for _ in range(args.repeats)]
            rows.append(min(runs, key=lambda r: r["us_per_sample"]))
            print(f"  {kind} x{samples}: " + ", ".join(f"{r['us_per_sample']:.1f}" for r in runs) + " us/sample",
                  file=sys.stderr, flush=True)
    label = args.label or tree
    print(f"\nhost CPU per sample, {label} (python {sys.version.split()[0]}, {os.cpu_count()} cores)")
    print("| stand-in | samples/request | clients | us/sample | us/request | samples/s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stand_in']} | {r['samples_per_request']} | {r['clients']} | {r['us_per_sample']:.1f} | "
              f"{r['us_per_request']:.0f} | {r['samples_per_s']:.0f} | {r['mean_batch']:.1f} |")
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump({"tree": tree, "label": label, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
