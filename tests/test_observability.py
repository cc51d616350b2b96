"""Observability, for real: the committed Grafana dashboard against a real Prometheus scraping the real
Ray metrics endpoint of a real Ray Serve app (two models, tuned at start-up on this CPU) that has
answered requests.

- Prometheus is Debian's package, installed here when missing (CI runs as root on a fresh machine).
- Every PromQL expression of every panel goes through Prometheus' HTTP API: each must parse and
  evaluate; the throughput, batch size, tuned size and cache panels must return series for both models.
- Every metric a panel names (read out of the PromQL with a real parser, promql-parser) must be one
  that the Ray metrics endpoint exports (read with prometheus_client's parser).
- The committed JSON is what grafana/generate_dashboard.py makes.

Tunings are kept small (max_batch 4, one timed run per probe); the module takes about two minutes on
two cores, most of it the two start-up tunings.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeCluster, free_port, image_bytes

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "autobatch-dashboard.json"
MODELS = ("resnet50", "yolo11n_pose")
# The LLM panels' metrics come from the Llama on its continuous scheduler (tiny: 16 + 8 tokens).
LLM = "llama_int4"
LLM_OPTIONS = {"max_prompt_tokens": 16, "max_new_tokens": 8, "default_new_tokens": 4}
LLM_PANELS = ("LLM time to first token and per output token", "LLM tokens per second", "LLM sequences and KV blocks")
MAX_BATCH = 4
GAUGE_SURVIVAL_S = 30  # Ray 2.60 stops exporting a gauge ~20 s after its last set()
# What Grafana would put in place of its variables. $model: all models, formatted as Grafana formats a
# multi-value variable for a regex matcher. $__rate_interval: a window that holds the whole scrape.
GRAFANA_VARS = {"$__rate_interval": "2m", "$model": "(" + "|".join((*MODELS, LLM)) + ")"}
# Panels whose every query must return series for every model of the app (by title).
MUST_HAVE_SERIES = {
    "Throughput per model": None,  # None: every query of the panel
    "Batch size: formed vs tuned": None,
    "Tuning in use, per replica": ("A", "B"),  # tuned batch, max safe
    "Tuning cache hits / misses": None,
}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA / "generate_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    return expr


# ------------------------------------------------------------------------------------ Prometheus
def prometheus_binaries() -> tuple[str, str]:
    """prometheus and promtool, installed from Debian's package when missing."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found
    if os.geteuid() != 0:
        pytest.fail("Prometheus is not installed and the tests are not root: run "
                    "`apt-get update && apt-get install -y --no-install-recommends prometheus`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    found = shutil.which("prometheus"), shutil.which("promtool")
    assert all(found), f"apt-get installed prometheus, but the binaries are not on PATH: {found}"
    return found


class Prometheus:
    """A Prometheus on a free 127.0.0.1 port, scraping one Ray metrics endpoint every second."""

    def __init__(self, binary: str, workdir: Path, target: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"prometheus exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout} s:\n{self.log_tail()}")

    def wait_target_up(self, timeout: float = 60) -> None:
        deadline, targets = time.time() + timeout, []
        while time.time() < deadline:
            targets = self.http.get("/api/v1/targets").json()["data"]["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.5)
        raise AssertionError(f"the Ray metrics target is not up: {targets}")

    def query(self, expr: str) -> dict:
        """/api/v1/query; the whole answer (status, data or errorType/error)."""
        return self.http.get("/api/v1/query", params={"query": expr}).json()

    def series(self, expr: str) -> list[dict]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}\n{answer}"
        return answer["data"]["result"]

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def prometheus_bin() -> tuple[str, str]:
    return prometheus_binaries()


def app(model: str, cache_path: str) -> dict:
    """An application named after its model, as in serve_config.yaml, with a small tuning."""
    return {
        "name": model, "route_prefix": f"/{model}", "import_path": "serve.app:build",
        "args": {"model": model, "device": "auto", "latency_budget_ms": 400, "max_batch": MAX_BATCH,
                 "repeats": 1, "cache_path": cache_path, "num_cpus": 0.25},
    }


@pytest.fixture(scope="module")
def observed(prometheus_bin, tmp_path_factory):
    """A serve app with both models, a Prometheus scraping its node's metrics port, and requests
    answered while Prometheus watched."""
    workdir = tmp_path_factory.mktemp("observability")
    cluster = ServeCluster(num_cpus=2)
    prom = None
    try:
        llm = app(LLM, str(workdir / "tuning.json"))
        llm["args"].update(max_batch=2, latency_budget_ms=10_000, options=dict(LLM_OPTIONS))
        cluster.deploy([*(app(m, str(workdir / "tuning.json")) for m in MODELS), llm])
        cluster.wait_running([*MODELS, LLM], timeout=420)
        running_since = time.time()
        # One request each first: Ray creates its batch counters at the first batch, and a counter
        # born inside a rate window loses its first increments (so would the ratios built on it).
        for model in MODELS:
            assert cluster.post(f"/{model}", image_bytes("JPEG")).status_code == 200
        prom = Prometheus(prometheus_bin[0], workdir, f"127.0.0.1:{cluster.metrics_port}")
        prom.wait_ready()
        prom.wait_target_up()
        # Requests after Prometheus' first scrape, so that rates see them.
        sent = {}
        for model in MODELS:
            for _ in range(2):
                responses = cluster.post_concurrently(
                    f"/{model}", [(image_bytes("JPEG", seed=i), "image/jpeg", {}) for i in range(2 * MAX_BATCH)], retries_on_503=3)
                assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
                sent[model] = sent.get(model, 1) + len(responses)
            bad = cluster.post(f"/{model}", b"this is not an image", "text/plain")  # exports request_errors
            assert bad.status_code == 415, bad.text
        prompts = [(json.dumps({"prompt": f"metrics {i}"}).encode(), "application/json", {}) for i in range(4)]
        answered = cluster.post_concurrently(f"/{LLM}", prompts, retries_on_503=3)
        assert [r.status_code for r in answered] == [200] * len(prompts), [r.text for r in answered]
        # Until Prometheus has scraped what the replicas recorded (Ray reports every second here).
        deadline, served = time.time() + 60, {}
        while time.time() < deadline:
            served = {s["metric"]["model"]: float(s["value"][1]) for s in prom.series(
                "sum by (model) (ray_autobatch_samples_served_total) and on (model) "
                "sum by (model) (ray_autobatch_request_errors_total)")}
            if all(served.get(m, 0) >= sent[m] for m in MODELS):
                break
            time.sleep(0.5)
        assert all(served.get(m, 0) >= sent[m] for m in MODELS), (served, sent)
        # What the endpoint exports right after serving (Ray drops an idle gauge, e.g. its batch queue
        # length, ~20 s after its last set; the exported-names test takes the union with a later scrape).
        metrics_after_requests = cluster.metrics_text()
        # Query only when the tunings' gauges, set once at start-up, are older than that: the tuned-size
        # panels then also prove that the replicas keep their gauges alive.
        time.sleep(max(2.0, running_since + GAUGE_SURVIVAL_S - time.time()))
        yield {"cluster": cluster, "prom": prom, "sent": sent, "metrics_after_requests": metrics_after_requests}
    finally:
        if prom is not None:
            prom.stop()
        cluster.shutdown()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[dict]:
    return load_generator().panel_queries(dashboard())


# ------------------------------------------------------------------------------------ the file
def test_committed_dashboard_is_what_the_generator_makes():
    generator = load_generator()
    assert DASHBOARD.read_text() == generator.render(), \
        "grafana/autobatch-dashboard.json is stale: run `python grafana/generate_dashboard.py` and commit it"
    assert generator.main(["--check"]) == 0


def test_dashboard_is_importable_with_a_datasource_and_a_model_variable():
    d = dashboard()
    assert d["schemaVersion"] >= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"]
    assert model["datasource"]["uid"] == "${datasource}"
    assert model["query"]["query"] == "label_values(ray_autobatch_tuned_batch_size, model)"
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    titles = {p["title"] for p in panels}
    assert set(MUST_HAVE_SERIES) <= titles


def test_prometheus_example_config_is_valid(prometheus_bin):
    done = subprocess.run([prometheus_bin[1], "check", "config", str(GRAFANA / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------ against real Prometheus
def test_every_panel_query_runs_in_prometheus(observed):
    prom = observed["prom"]
    failures, results = [], {}
    for item in queries():
        expr = substitute(item["expr"])
        answer = prom.query(expr)
        if answer["status"] != "success":
            failures.append(f"{item['panel']} [{item['refId']}]: {answer.get('errorType')}: {answer.get('error')}\n  {expr}")
            continue
        results[(item["panel"], item["refId"])] = answer["data"]["result"]
    assert not failures, "queries Prometheus refused:\n" + "\n".join(failures)

    missing = []
    for item in queries():
        wanted = MUST_HAVE_SERIES.get(item["panel"], ())
        if wanted is not None and item["refId"] not in wanted:
            continue
        models = {s["metric"].get("model") for s in results[(item["panel"], item["refId"])]}
        if not set(MODELS) <= models:
            missing.append(f"{item['panel']} [{item['refId']}] has series for {sorted(m for m in models if m)}, "
                           f"not {list(MODELS)}: {substitute(item['expr'])}")
    assert not missing, "\n".join(missing)

    # the numbers mean what the panels say
    def by_model(panel, ref):
        return {s["metric"]["model"]: float(s["value"][1]) for s in results[(panel, ref)]}

    throughput = by_model("Throughput per model", "A")
    assert all(throughput[m] > 0 for m in MODELS), throughput
    formed = by_model("Batch size: formed vs tuned", "A")
    tuned = by_model("Batch size: formed vs tuned", "C")
    max_safe = by_model("Batch size: formed vs tuned", "D")
    for m in MODELS:
        tuning = observed["cluster"].tuning(f"/{m}")
        assert tuned[m] == tuning["batch_size"] and max_safe[m] == tuning["max_safe_batch"], (m, tuned, max_safe)
        assert 1 <= formed[m] <= tuning["serving"]["max_batch_size"] + 1e-6, (m, formed)
    for item in queries():  # the Llama's requests show on every LLM panel
        if item["panel"] in LLM_PANELS:
            models = {s["metric"].get("model") for s in results[(item["panel"], item["refId"])]}
            assert LLM in models, f"{item['panel']} [{item['refId']}] has no series for {LLM}: {substitute(item['expr'])}"
    misses = by_model("Tuning cache hits / misses", "B")
    assert all(misses[m] == 1 for m in MODELS), misses  # a fresh cache: each replica tuned once


def test_the_model_variable_lists_the_models(observed):
    # Grafana's label_values(metric, label) is Prometheus' label values API with a match[] selector
    query = next(v for v in dashboard()["templating"]["list"] if v["name"] == "model")["query"]["query"]
    metric, label = query.removeprefix("label_values(").removesuffix(")").replace(" ", "").split(",")
    answer = observed["prom"].http.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
    assert answer["status"] == "success" and set(MODELS) <= set(answer["data"]), answer


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, from its syntax tree."""
    import promql_parser

    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    assert matcher.op == promql_parser.MatchOp.Equal, f"a regex over metric names: {expr}"
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_panels_name_only_metrics_that_are_exported(observed):
    from prometheus_client.parser import text_string_to_metric_families

    exported = set()
    for text in (observed["metrics_after_requests"], observed["cluster"].metrics_text()):
        for family in text_string_to_metric_families(text):
            exported |= {sample.name for sample in family.samples}  # with _total, _bucket, _sum, _count
    assert "ray_autobatch_device_batch_size_bucket" in exported and "ray_autobatch_samples_served_total" in exported

    used, unknown = {}, []
    for item in queries():
        names = metric_names(substitute(item["expr"]))
        assert names, f"no metric in {item['panel']} [{item['refId']}]: {item['expr']}"
        for name in names:
            used.setdefault(name, []).append(item["panel"])
            if name not in exported:
                unknown.append(f"{name} (panel {item['panel']!r} [{item['refId']}])")
    assert not unknown, "panels name metrics that nothing exports:\n" + "\n".join(sorted(set(unknown)))
    # the parser really reads the expressions: the batcher's histograms and autobatch's gauges are there
    assert {"ray_autobatch_device_batch_size_bucket", "ray_autobatch_batch_wait_seconds_bucket",
            "ray_autobatch_tuned_batch_size", "ray_autobatch_samples_waiting"} <= set(used)


def test_the_parser_finds_names_where_a_regex_would_not():
    """Names in label matchers, functions, label lists and strings are not metrics; {__name__=...} is."""
    expr = ('sum by (model, le) (label_replace(rate(ray_a_bucket{model=~"ray_b"}[1m]), "model", "$1", '
            '"deployment", "(.*)")) / on (model) group_left max by (model) ({__name__="ray_c", job="ray_d"})'
            ' or absent(ray_e offset 1m) or vector(0)')
    assert metric_names(expr) == {"ray_a_bucket", "ray_c", "ray_e"}
