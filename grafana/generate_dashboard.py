"""Generate grafana/autobatch-dashboard.json with grafana-foundation-sdk (Grafana v11.6 schema).

    python grafana/generate_dashboard.py           # (re)write the dashboard next to this file
    python grafana/generate_dashboard.py --check   # exit 1 if the committed file is not what this makes

Edit this file, not the JSON. Metric names come from serve.replica.metrics (autobatch's own, recorded in
replicas and exported by Ray with a `ray_` prefix) and from Ray Serve's request metrics. A replica
forms its batches itself (serve/replica/batcher.py), so Ray Serve's @serve.batch metrics are not exported:
the batch panels read the batcher's (device batch size, batch wait, samples waiting).

Label conventions the queries rely on:
- autobatch metrics carry `model` and `device` (plus Ray's `application`, `deployment`, `replica`);
- Ray Serve's batch/latency metrics carry `deployment` (and `application`), not `model`. The app
  builder (serve/app.py) names each deployment after its model, so `deployment=~"$model"` selects
  the same replicas, and `label_replace(..., "model", "$1", "deployment", "(.*)")` gives those
  series a `model` label so that legends and joins agree;
- the HTTP latency histogram has only `application` (and route). In serve_config.yaml every HTTP
  request (the simple routes and /v2) enters through the OIP router, application `oip`, so a
  filter on the model's name matched nothing (issue 23): that panel is per application, unfiltered,
  and per-model latency is the replica panels'.

Ray's histograms are exported with approximate `_sum`s (Ray records bucket midpoints), so means
here are computed from counters (samples served / batches processed), and percentiles from
buckets with histogram_quantile.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: serve.replica.metrics is the one list of names
    sys.path.insert(0, str(ROOT))

from serve.replica.metrics import METRICS_BY_NAME  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "autobatch-dashboard.json"
UID = "autobatch-batching"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Grafana variables the expressions use (tests substitute these before sending a query to Prometheus).
RATE = "$__rate_interval"
M = 'model=~"$model"'  # autobatch's own metrics
D = 'deployment=~"$model"'  # Ray Serve's per-deployment metrics (deployment name == model name)


def ab(name: str) -> str:
    """The Prometheus name of an autobatch metric, checked against serve.replica.metrics."""
    return METRICS_BY_NAME[name].exported_name


def by_model(expr: str) -> str:
    """Give a series that has `deployment` a `model` label with the same value."""
    return f'label_replace({expr}, "model", "$1", "deployment", "(.*)")'


def ray_quantile(q: float, metric: str) -> str:
    """Percentile per model of a Ray Serve per-deployment histogram."""
    return (f"histogram_quantile({q}, sum by (model, le) "
            f"({by_model(f'rate({metric}_bucket{{{D}}}[{RATE}])')}))")


SAMPLES_RATE = f"sum by (model) (rate({ab('autobatch_samples_served')}{{{M}}}[{RATE}]))"
DEVICE_BATCH = ab("autobatch_device_batch_size")
# The batches the device ran (serve/replica/batcher.py forms them from every request waiting).
BATCHES_RATE = f"sum by (model) (rate({DEVICE_BATCH}_count{{{M}}}[{RATE}]))"
DEVICE_BATCH_P95 = f"histogram_quantile(0.95, sum by (model, le) (rate({DEVICE_BATCH}_bucket{{{M}}}[{RATE}])))"
MEAN_BATCH = f"{SAMPLES_RATE} / {BATCHES_RATE}"


def q(expr: str, legend: str, ref: str, fmt: PromQueryFormat | None = None, instant: bool = False) -> Dataquery:
    query = Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    if fmt is not None:
        query = query.format(fmt)
    if instant:
        query = query.instant()
    return query


def targets(panel, *queries: tuple[str, str]):
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(q(expr, legend, chr(ord("A") + i)))
    return panel


def ts(pid: int, title: str, description: str, unit: str, *queries: tuple[str, str], w: int = 12, h: int = 8,
       bars: bool = False):
    panel = (timeseries.Panel().id(pid).title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(w).height(h).fill_opacity(10).line_width(1).show_points(cm.VisibilityMode.NEVER)
             .legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
                     .placement(cm.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))
             .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    return targets(panel, *queries)


def stat_panel(pid: int, title: str, description: str, unit: str, *queries: tuple[str, str], w: int = 6, h: int = 8):
    panel = (stat.Panel().id(pid).title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(w).height(h).graph_mode(cm.BigValueGraphMode.NONE).color_mode(cm.BigValueColorMode.NONE)
             .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(q(expr, legend, chr(ord("A") + i), instant=True))
    return panel


# ----------------------------------------------------------------------------------------- panels
def serving_panels() -> list:
    return [
        ts(1, "Throughput per model",
           "Samples answered successfully per second (rate of ray_autobatch_samples_served_total).", "reqps",
           (SAMPLES_RATE, "{{model}}")),
        ts(2, "Batch size: formed vs tuned",
           "What the device's batches really hold against what the tuning chose. Formed (mean) = samples "
           "served / batches the device ran; formed p95 from ray_autobatch_device_batch_size (interpolated "
           "within power-of-two buckets). Tuned = the size the tuning selected; max safe = "
           "the largest size that fit memory and the latency budget; in effect = the batcher's max_batch_size "
           "now (pinned by reconfigure, lowered after an OOM while serving, or re-decided when served batches "
           "run slower than tuned: ray_autobatch_served_vs_tuned_latency).", "none",
           (MEAN_BATCH, "{{model}} formed (mean)"),
           (DEVICE_BATCH_P95, "{{model}} formed p95"),
           (f"max by (model) ({ab('autobatch_tuned_batch_size')}{{{M}}})", "{{model}} tuned"),
           (f"max by (model) ({ab('autobatch_tuned_max_safe_batch')}{{{M}}})", "{{model}} max safe"),
           (f"max by (model) ({ab('autobatch_max_batch_size')}{{{M}}})", "{{model}} in effect")),
        ts(3, "Batch utilisation",
           "How full the batches are: the p50 and the mean formed batch (ray_autobatch_device_batch_size) "
           "over the max_batch_size in effect.", "percent",
           (f"100 * histogram_quantile(0.5, sum by (model, le) (rate({DEVICE_BATCH}_bucket{{{M}}}[{RATE}]))) "
            f"/ max by (model) ({ab('autobatch_max_batch_size')}{{{M}}})", "{{model}} p50 / in effect"),
           (f"100 * ({MEAN_BATCH}) / max by (model) ({ab('autobatch_max_batch_size')}{{{M}}})",
            "{{model}} mean / in effect")),
        heatmap.Panel().id(4).title("Batch sizes formed").description(
            "Batches the device ran per bucket of ray_autobatch_device_batch_size (upper bound of the "
            "bucket, powers of two).").datasource(DATASOURCE).span(12).height(8).calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(heatmap_color_mode()).scheme("Oranges").steps(64))
        .y_axis(heatmap.YAxisConfig().unit("none").decimals(0))
        .with_target(q(f"sum by (le) (increase({DEVICE_BATCH}_bucket{{{M}}}[{RATE}]))", "{{le}}", "A",
                       fmt=PromQueryFormat.HEATMAP)),
        ts(5, "Batch queue length",
           "Samples waiting for the device in the replicas' batchers (ray_autobatch_samples_waiting, set as "
           "each batch forms), per model.",
           "none",
           (f"sum by (model) ({ab('autobatch_samples_waiting')}{{{M}}})", "{{model}} batcher")),
        ts(6, "Batch wait",
           "How long each batch's oldest request waited before the batch formed (ray_autobatch_batch_wait_seconds, "
           "p50/p95: the wait at an idle device, the queueing behind a busy one) against the batch_wait_timeout "
           "in force.", "ms",
           (f"1000 * histogram_quantile(0.5, sum by (model, le) "
            f"(rate({ab('autobatch_batch_wait_seconds')}_bucket{{{M}}}[{RATE}])))", "{{model}} p50"),
           (f"1000 * histogram_quantile(0.95, sum by (model, le) "
            f"(rate({ab('autobatch_batch_wait_seconds')}_bucket{{{M}}}[{RATE}])))", "{{model}} p95"),
           (f"1000 * max by (model) ({ab('autobatch_batch_wait_timeout_seconds')}{{{M}}})", "{{model}} timeout")),
    ]


def latency_panels() -> list:
    http = [(f"histogram_quantile({p}, sum by (application, le) "
             f"(rate(ray_serve_http_request_latency_ms_bucket[{RATE}])))", f"{{{{application}}}} p{label}")
            for p, label in ((0.5, "50"), (0.95, "95"), (0.99, "99"))]
    return [
        ts(7, "Request latency (HTTP ingress, per application)",
           "End-to-end HTTP request latency at Ray Serve's ingress (ray_serve_http_request_latency_ms), per "
           "application. With serve_config.yaml every route enters through the OIP router (application "
           "oip), so this is all models together and the model selector does not apply; per model, see "
           "Replica processing latency.", "ms", *http, w=8),
        ts(8, "Replica processing latency",
           "Time a request spends in the replica, batch wait included (Ray Serve's "
           "ray_serve_deployment_processing_latency_ms).", "ms",
           (ray_quantile(0.5, "ray_serve_deployment_processing_latency_ms"), "{{model}} p50"),
           (ray_quantile(0.99, "ray_serve_deployment_processing_latency_ms"), "{{model}} p99"), w=8),
        ts(9, "Batch compute vs latency budget",
           "Seconds of one batch on the device (ray_autobatch_batch_inference_seconds: prepare + forward "
           "+ encode) against the per-batch latency budget the tuning worked within.", "s",
           (f"histogram_quantile(0.5, sum by (model, le) "
            f"(rate({ab('autobatch_batch_inference_seconds')}_bucket{{{M}}}[{RATE}])))", "{{model}} p50"),
           (f"histogram_quantile(0.99, sum by (model, le) "
            f"(rate({ab('autobatch_batch_inference_seconds')}_bucket{{{M}}}[{RATE}])))", "{{model}} p99"),
           (f"max by (model) ({ab('autobatch_latency_budget_seconds')}{{{M}}})", "{{model}} budget"), w=8),
    ]


def tuning_panels() -> list:
    per_replica = [
        ("autobatch_tuned_batch_size", "tuned batch"),
        ("autobatch_tuned_max_safe_batch", "max safe"),
        ("autobatch_max_batch_size", "in effect"),
        ("autobatch_batch_wait_timeout_seconds", "wait timeout s"),
        ("autobatch_served_vs_tuned_latency", "served / tuned time"),
        ("autobatch_latency_budget_seconds", "latency budget s"),
        ("autobatch_memory_budget_bytes", "memory budget"),
        ("autobatch_tuning_seconds", "tuning s"),
        ("autobatch_tuning_probes", "probes"),
    ]
    tab = (table.Panel().id(10).title("Tuning in use, per replica").description(
        "One row per replica: what the tuning chose on the device it runs on, and what it cost "
        "(tuning seconds: the search on a cache miss, the lookup on a hit).")
        .datasource(DATASOURCE).span(24).height(7)
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True},
            "renameByName": {f"Value #{chr(ord('A') + i)}": label for i, (_, label) in enumerate(per_replica)},
        })))
    for i, (name, _) in enumerate(per_replica):
        tab = tab.with_target(q(f"max by (model, device, replica) ({ab(name)}{{{M}}})", "", chr(ord("A") + i),
                                fmt=PromQueryFormat.TABLE, instant=True))
    return [
        tab,
        stat_panel(11, "Tuning cache hits / misses",
                   "Tunings per model since its replicas started: a hit reuses a saved tuning for this device "
                   "and model; a miss (new device, new settings, or a retune) measures.", "none",
                   (f"sum by (model) ({ab('autobatch_cache_hits')}{{{M}}})", "{{model}} hits"),
                   (f"sum by (model) ({ab('autobatch_cache_misses')}{{{M}}})", "{{model}} misses"), w=8),
        ts(12, "Tuning events",
           "Tunings started in each interval (cache hits and misses) and the batch sizes they probed.", "none",
           (f"sum by (model) (increase({ab('autobatch_cache_misses')}{{{M}}}[{RATE}]))", "{{model}} miss (tuned)"),
           (f"sum by (model) (increase({ab('autobatch_cache_hits')}{{{M}}}[{RATE}]))", "{{model}} hit"),
           (f"sum by (model) (increase({ab('autobatch_tuning_probes')}{{{M}}}[{RATE}]))", "{{model}} probes"),
           w=8, bars=True),
        stat_panel(13, "Tuning seconds and probes",
                   "Seconds the replica last spent obtaining its tuning, and probes run (summed over replicas).",
                   "none",
                   (f"max by (model) ({ab('autobatch_tuning_seconds')}{{{M}}})", "{{model}} seconds"),
                   (f"sum by (model) ({ab('autobatch_tuning_probes')}{{{M}}})", "{{model}} probes"), w=8),
    ]


def memory_panels() -> list:
    return [
        ts(14, "Out-of-memory events",
           "OOMs since the replicas started: search/real = caught during tuning, search/predicted = sizes the "
           "memory model skipped, serving/real = a batch that ran out of memory while serving (split and "
           "retried; the replica's max batch is lowered).", "none",
           (f"sum by (model, phase, kind) ({ab('autobatch_oom_events')}{{{M}}})", "{{model}} {{phase}}/{{kind}}"),
           w=8),
        ts(15, "Errors and item retries",
           "Requests answered with an error, by HTTP status (4xx: what the client sent; nothing a request "
           "sends fails its batch-mates), and batches that raised (not an OOM) and were retried item by "
           "item, per second.", "ops",
           (f"sum by (model, status) (rate({ab('autobatch_request_errors')}{{{M}}}[{RATE}]))",
            "{{model}} errors {{status}}"),
           (f"sum by (model) (rate({ab('autobatch_batch_item_retries')}{{{M}}}[{RATE}]))", "{{model}} item retries"),
           w=8),
        ts(16, "Device memory",
           "Memory the replica holds now (CUDA: allocator reserved + context; CPU: resident set) against "
           "the memory budget the tuning worked within.", "bytes",
           (f"max by (model, device) ({ab('autobatch_device_memory_bytes')}{{{M}}})", "{{model}} in use ({{device}})"),
           (f"max by (model) ({ab('autobatch_memory_budget_bytes')}{{{M}}})", "{{model}} budget"), w=8),
        ts(17, "Requests shed",
           "Requests a replica did not compute, per second, by reason (serve/replica/admission.py): overload = its "
           "expected wait was over 2 latency budgets + one batch (503 + Retry-After); deadline = it could not "
           "meet the client's Request-Timeout-Ms (503); expired = that deadline passed while it queued (504, "
           "dropped from its batch before compute); memory = the replica's memory share (503, 413 if it never "
           "fits). Ray's proxy's own 503s (max_queued_requests) are not counted here.", "ops",
           (f"sum by (model, reason) (rate({ab('autobatch_requests_shed')}{{{M}}}[{RATE}]))", "{{model}} {{reason}}"),
           w=24),
    ]


def llm_panels() -> list:
    """The LLM's continuous batching (serve/replica/llm.py): per-token latency, tokens/s, sequences and KV blocks."""
    def quantiles(name: str, label: str) -> list[tuple[str, str]]:
        return [(f"histogram_quantile({p}, sum by (model, le) (rate({ab(name)}_bucket{{{M}}}[{RATE}])))",
                 f"{{{{model}}}} {label} p{int(p * 100)}") for p in (0.5, 0.99)]

    return [
        ts(18, "LLM time to first token and per output token",
           "Time to first token (a request's arrival at the scheduler to its first token: queueing + prefill) "
           "and time per output token after the first (its decode time / (tokens - 1)), p50 and p99, from "
           "ray_autobatch_llm_time_to_first_token_seconds and ray_autobatch_llm_time_per_output_token_seconds.", "s",
           *quantiles("autobatch_llm_time_to_first_token_seconds", "TTFT"),
           *quantiles("autobatch_llm_time_per_output_token_seconds", "TPOT"), w=8),
        ts(19, "LLM tokens per second",
           "Generated and prompt tokens per second (rate of ray_autobatch_llm_generated_tokens_total and "
           "ray_autobatch_llm_prompt_tokens_total).", "none",
           (f"sum by (model) (rate({ab('autobatch_llm_generated_tokens')}{{{M}}}[{RATE}]))", "{{model}} generated/s"),
           (f"sum by (model) (rate({ab('autobatch_llm_prompt_tokens')}{{{M}}}[{RATE}]))", "{{model}} prompt/s"), w=8),
        ts(20, "LLM sequences and KV blocks",
           "Sequences running in the scheduler's batch and waiting (for KV blocks or a slot), and KV cache "
           "blocks in use against the blocks the tuning gave the scheduler.", "none",
           (f"sum by (model) ({ab('autobatch_llm_running_sequences')}{{{M}}})", "{{model}} running"),
           (f"sum by (model) ({ab('autobatch_llm_waiting_sequences')}{{{M}}})", "{{model}} waiting"),
           (f"sum by (model) ({ab('autobatch_llm_kv_blocks_used')}{{{M}}})", "{{model}} KV blocks used"),
           (f"sum by (model) ({ab('autobatch_llm_kv_blocks_total')}{{{M}}})", "{{model}} KV blocks total"), w=8),
    ]


def heatmap_color_mode():
    from grafana_foundation_sdk.models.heatmap import HeatmapColorMode

    return HeatmapColorMode.SCHEME


def build_dashboard() -> dm.Dashboard:
    builder = (
        db.Dashboard("autobatch: batching and tuning")
        .uid(UID)
        .description("Ray Serve batching as tuned by autobatch: throughput, batches formed vs tuned, queueing, "
                     "latency, tuning, cache, OOMs and device memory. Generated by grafana/generate_dashboard.py.")
        .tags(["autobatch", "ray-serve", "generated"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-30m", "now")
        .timezone(cm.TimeZoneBrowser)
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            db.QueryVariable("model").label("Model").datasource(DATASOURCE)
            .query({"query": f"label_values({ab('autobatch_tuned_batch_size')}, model)",
                    "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True)
            .current(dm.VariableOption(text="All", value="$__all")))
    )
    rows = (("Serving and batching", serving_panels()), ("Latency", latency_panels()),
            ("Tuning and cache", tuning_panels()), ("Memory and faults", memory_panels()),
            ("LLM (continuous batching)", llm_panels()))
    for row_id, (title, panels) in enumerate(rows, start=100):  # panel ids are 1..N, rows 100..
        builder = builder.with_row(db.Row(title).id(row_id))
        for panel in panels:
            builder = builder.with_panel(panel)
    return builder.build()


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build_dashboard()) + "\n"


# ------------------------------------------------------------------------ reading a dashboard back
def panel_queries(dashboard: dict) -> list[dict]:
    """Every Prometheus query of every panel (rows' nested panels included): [{panel, refId, expr, legend}]."""
    out = []

    def visit(panels):
        for panel in panels:
            visit(panel.get("panels") or [])
            for target in panel.get("targets") or []:
                out.append({"panel": panel["title"], "panel_id": panel.get("id"), "refId": target.get("refId"),
                            "expr": target["expr"], "legend": target.get("legendFormat", "")})

    visit(dashboard.get("panels") or [])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the output")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.output), "generated",
                                        lineterm="", n=1)
            print("\n".join(list(diff)[:80]))
            print(f"{args.output} is not what grafana/generate_dashboard.py makes: run it and commit the result")
            return 1
        print(f"{args.output}: up to date ({len(panel_queries(json.loads(text)))} queries)")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
