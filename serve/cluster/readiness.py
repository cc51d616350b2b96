"""`make serve`'s "ready" lines: one per application when it answers, then one with the URLs.

Why: `serve run` says "Submitted deploy config successfully" and then nothing a person can act on;
the replicas' tuning lines went to log files. The launcher asks each model's route for its tuning
(`GET <route>/tuning`, through the same ingress a client uses, so "ready" means reachable) and prints
what was decided: the batch served, the max safe batch, the wait, whether it came from the cache,
and the seconds since the launcher started.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

MODEL_IMPORT_PATH = "serve.app:build"
ROUTER_IMPORT_PATH = "serve.oip.router:build_router"
POLL_S = 1.0
SLOW_NOTICE_S = 300.0  # one line for an app still not ready after this long, with its last answer


@dataclass(frozen=True)
class App:
    name: str
    route: str  # the simple route's path, "/resnet50"


def model_apps(config: dict) -> list[App]:
    """The model applications of a serve config and the path each answers on: its own route_prefix,
    or /<name> through the OIP router when it has none (serve_config.yaml's layout)."""
    apps = config.get("applications") or []
    routed = {m for a in apps if a.get("import_path") == ROUTER_IMPORT_PATH
              for m in ((a.get("args") or {}).get("models") or [])}
    out = []
    for a in apps:
        if a.get("import_path") != MODEL_IMPORT_PATH:
            continue
        prefix = a.get("route_prefix")
        if prefix:
            out.append(App(a["name"], "/" + prefix.strip("/")))
        elif a["name"] in routed:
            out.append(App(a["name"], "/" + a["name"]))
    return out


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{float(seconds) * 1e3:.1f} ms"


def describe_ready(app: App, base_url: str, tuning: dict, after_s: float) -> str:
    serving = tuning.get("serving") or {}
    batch = serving.get("max_batch_size", tuning.get("batch_size"))
    wait = serving.get("batch_wait_timeout_s", tuning.get("batch_wait_timeout_s"))
    notes = "; ".join(serving.get("notes") or [])
    device = (tuning.get("replica") or {}).get("device") or tuning.get("device", "-")
    if isinstance(device, dict):
        device = device.get("label", "-")
    return (f"autobatch: {app.name} ready after {after_s:.1f} s: POST {base_url}{app.route}; batch {batch} "
            f"(max safe {tuning.get('max_safe_batch', '-')}, latency budget {_ms(tuning.get('latency_budget_s'))}), "
            f"wait {_ms(wait)}, cache {tuning.get('cache', '-')}, on {device}"
            + (f" ({notes})" if notes else ""))


def urls_line(config: dict, base_url: str, apps: list[App], metrics_url: str, dashboard_url: str) -> str:
    grpc = config.get("grpc_options") or {}
    routes = ", ".join(a.route for a in apps)
    has_router = any(a.get("import_path") == ROUTER_IMPORT_PATH for a in config.get("applications") or [])
    line = f"autobatch: all {len(apps)} apps ready: {base_url} ({routes}" + (", /v2/..." if has_router else "") + ")"
    if grpc.get("grpc_servicer_functions"):
        line += f", gRPC 127.0.0.1:{grpc.get('port', 9000)}"
    return (line + f"; GET <route>/tuning for why; metrics {metrics_url}; dashboard {dashboard_url}; "
            f"Ctrl-C stops everything")


class ReadinessWatch:
    """Polls each app's `GET <route>/tuning` in a daemon thread and prints each line once."""

    def __init__(self, config: dict, base_url: str, metrics_url: str, dashboard_url: str,
                 started: float | None = None, say=print):
        self.config, self.base_url = config, base_url.rstrip("/")
        self.metrics_url, self.dashboard_url = metrics_url, dashboard_url
        self.apps = model_apps(config)
        self.started = time.monotonic() if started is None else started
        self.say = say
        self.ready: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autobatch-readiness", daemon=True)

    def start(self) -> "ReadinessWatch":
        if self.apps:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _poll(self, client: httpx.Client, app: App) -> tuple[dict | None, str]:
        try:
            r = client.get(self.base_url + app.route + "/tuning")
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}"
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}: {r.text[:200]}"
        try:
            return r.json(), ""
        except ValueError:
            return None, f"HTTP 200 but not JSON: {r.text[:200]}"

    def _run(self) -> None:
        last: dict[str, str] = {}
        noticed: set[str] = set()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while not self._stop.is_set() and len(self.ready) < len(self.apps):
                for app in self.apps:
                    if app.name in self.ready or self._stop.is_set():
                        continue
                    tuning, why = self._poll(client, app)
                    after_s = time.monotonic() - self.started
                    if tuning is not None:
                        self.ready[app.name] = tuning
                        self.say(describe_ready(app, self.base_url, tuning, after_s), flush=True)
                        continue
                    last[app.name] = why
                    if after_s > SLOW_NOTICE_S and app.name not in noticed:
                        noticed.add(app.name)
                        self.say(f"autobatch: {app.name} not ready after {after_s:.0f} s (GET {app.route}/tuning: "
                                 f"{why}); its replica's log: the lines above, or `ray logs` (README, Operations)",
                                 flush=True)
                self._stop.wait(POLL_S)
        if len(self.ready) == len(self.apps):
            self.say(urls_line(self.config, self.base_url, self.apps, self.metrics_url, self.dashboard_url), flush=True)
