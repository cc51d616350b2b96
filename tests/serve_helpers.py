"""Helpers for the serve tests: a real local Ray + Serve, deployed from config dicts the way
`serve run serve_config.yaml` deploys (so a user_config change is a live reconfigure, not a
restart), real HTTP to 127.0.0.1, images made with Pillow."""
from __future__ import annotations

import io
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (320, 240), seed: int = 0, noise: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    w, h = size
    if noise:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:  # a smooth picture with a shape in it, different per seed
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                           np.full_like(x, (seed * 53) % 256)], -1).astype(np.uint8)
        pixels[h // 4: h // 2, w // 4: w // 2] = [(seed * 97) % 256, 40, 200]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def warmed_up(t: dict) -> bool:
    """A /tuning report whose warm-up is over: the sizes a queue forms first run before traffic,
    the rest between served batches (serve/replica/warmup.py); tests that count warmed sizes wait for it."""
    return (t.get("warm_sizes") or {}).get("background") != "running"


class ServeCluster:
    """A local Ray (2 CPUs, no dashboard, metrics on a known port) with Serve's HTTP proxy on a
    free 127.0.0.1 port. `deploy(apps)` applies a multi-application config (the whole set of apps:
    apps left out are removed, as with `serve deploy`)."""

    OIP_SERVICER = "serve.oip.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"

    def __init__(self, num_cpus: int = 2, grpc: bool = False):
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.config import ProxyLocation

        if ray.is_initialized():  # a module whose fixture failed before its shutdown: not this module's failure too
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        self.http_port = free_port()
        self.metrics_port = free_port()
        ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=self.metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000},
                 # AUTOBATCH_TEST_FAULTS: the tests' user_configs may inject faults (serve/replica/faults.py)
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "AUTOBATCH_TEST_FAULTS": "1"}})
        self.http_options = {"host": "127.0.0.1", "port": self.http_port}
        # grpc: Serve's gRPC proxy on a free port with the Open Inference Protocol service (serve_config.yaml's)
        self.grpc_port = free_port() if grpc else None
        self.grpc_options = {"port": self.grpc_port, "grpc_servicer_functions": [self.OIP_SERVICER]} if grpc else None
        self.client = serve_api.serve_start(http_options=self.http_options, grpc_options=self.grpc_options,
                                            proxy_location=ProxyLocation.HeadOnly)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.http = httpx.Client(base_url=self.base, timeout=120)

    def deploy(self, apps: list[dict]) -> None:
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(
            {"proxy_location": "HeadOnly", "http_options": self.http_options, "applications": apps,
             **({"grpc_options": self.grpc_options} if self.grpc_options else {})})
        self.client.deploy_apps(schema, _blocking=False)

    def wait_running(self, names: list[str], timeout: float = 240) -> None:
        from ray import serve

        deadline = time.time() + timeout
        statuses = {}
        while time.time() < deadline:
            statuses = {name: serve.status().applications.get(name) for name in names}
            failed = {n: s.message for n, s in statuses.items() if s is not None and s.status == "DEPLOY_FAILED"}
            if failed:
                raise AssertionError(f"deploy failed: {failed}")
            if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
                return
            time.sleep(0.5)
        raise AssertionError(f"apps not running after {timeout} s: "
                             f"{ {n: (s.status, s.message) if s else None for n, s in statuses.items()} }")

    def tuning(self, route: str) -> dict:
        r = self.http.get(f"{route}/tuning")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_tuning(self, route: str, predicate, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = self.tuning(route)
                if predicate(last):
                    return last
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"{route}/tuning never satisfied the condition; last: "
                             f"{ {k: last.get(k) for k in ('cache', 'serving', 'stats', 'replica')} if last else None }")

    def post(self, route: str, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> httpx.Response:
        return self.http.post(route, content=body, headers={"content-type": content_type, **(headers or {})})

    def post_concurrently(self, route: str, requests: list[tuple[bytes, str, dict]],
                          retries_on_503: int = 0) -> list[httpx.Response]:
        """All at once, each on its own connection, so the replica sees them together.

        `retries_on_503`: resend a request the replica shed (503 with Retry-After) after the seconds
        it asked for, as a well-behaved client does, for tests that check what is answered rather
        than what is shed (a loaded 2-core CI machine makes a batch slow, and admission sheds)."""

        def one(req):
            body, content_type, headers = req
            with httpx.Client(base_url=self.base, timeout=120) as c:
                for attempt in range(retries_on_503 + 1):
                    r = c.post(route, content=body, headers={"content-type": content_type, **headers})
                    if r.status_code != 503 or "retry-after" not in r.headers or attempt == retries_on_503:
                        return r
                    time.sleep(min(float(r.headers["retry-after"]), 10.0))

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))

    def metrics_text(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text

    def shutdown(self) -> None:
        import ray
        from ray import serve

        self.http.close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def make_tuning(**fields):
    """A Tuning with `fields` set and placeholders elsewhere, for the Ray-free policy tests."""
    from dataclasses import replace

    from optimizer.tuning import DeviceInfo, Tuning

    base = Tuning(model="test", weights="synthetic", device=DeviceInfo("cpu", "cpu", 2**34, "cpu:test"),
                  dtype="float32", memory_budget_bytes=2**33, latency_budget_s=1.0, max_batch=64, max_safe_batch=16,
                  batch_size=8, batch_wait_timeout_s=0.010, serve_latency_s=0.1, serve_throughput=80.0,
                  batch1_throughput=None, stopped_by="max_batch", decision="", notes=(), base_bytes=0,
                  memory_fit=None, probes=(), search_probe_count=0, oom_events=0, predicted_skips=0,
                  tuning_s=0.0, tuned_at="")
    return replace(base, **fields)


def stats_delta(before: dict, after: dict) -> dict:
    """What the replica's own batch record gained between two GET /tuning reads."""
    sizes_before = before["stats"]["batch_sizes"]
    sizes = {int(k): v - sizes_before.get(k, 0) for k, v in after["stats"]["batch_sizes"].items()}
    return {
        "batch_sizes": {k: v for k, v in sizes.items() if v > 0},
        "batches": after["stats"]["batches"] - before["stats"]["batches"],
        "samples_served": after["stats"]["samples_served"] - before["stats"]["samples_served"],
        "serving_ooms": after["stats"]["serving_ooms"] - before["stats"]["serving_ooms"],
        "batch_item_retries": after["stats"]["batch_item_retries"] - before["stats"]["batch_item_retries"],
    }
