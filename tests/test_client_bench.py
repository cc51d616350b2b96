"""The HTTP client and the load generator against a real local serve app (Ray Serve, ResNet-50 tuned
at start-up on this CPU, HTTP over 127.0.0.1), plus the pure statistics on known samples.

Counts are checked on both sides: what the bench says it sent and got back, and what the replica's
own record (GET /tuning stats) says it served and refused."""
from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest
from serve_helpers import ServeCluster, free_port, image_bytes, stats_delta

from autobatch.client.bench import (BenchError, Load, Record, format_report, is_loopback, latency_summary, percentile,
                         run_load, summarize)
from autobatch.client.http_client import AsyncClient, Client, ClientError, Unreachable, make_payload, route_path

ROUTE = "/r50"
MAX_BATCH = 4


# ----- pure: statistics on known samples (no server) -----
KNOWN = [0.010, 0.020, 0.030, 0.040, 0.050, 0.060, 0.070, 0.080, 0.090, 1.000]


def test_percentile_on_a_known_sample():
    # rank (n-1) * q / 100 of the sorted values, interpolated: n = 10
    assert percentile(KNOWN, 0) == pytest.approx(0.010)
    assert percentile(KNOWN, 50) == pytest.approx(0.055)  # rank 4.5: between 0.05 and 0.06
    assert percentile(KNOWN, 90) == pytest.approx(0.181)  # rank 8.1: 0.09 + 0.1 * (1.0 - 0.09)
    assert percentile(KNOWN, 99) == pytest.approx(0.9181)  # rank 8.91: 0.09 + 0.91 * 0.91
    assert percentile(KNOWN, 100) == pytest.approx(1.000)
    assert percentile(list(reversed(KNOWN)), 50) == pytest.approx(0.055)  # order does not matter
    assert percentile([0.25], 99) == 0.25 and percentile([], 50) is None
    rng = np.random.default_rng(0)
    sample = list(rng.lognormal(-3, 0.7, 1001))
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)), rel=1e-12)
    with pytest.raises(ValueError):
        percentile(KNOWN, 101)


def test_summary_counts_errors_by_status_and_times_only_successes():
    records = [Record(i * 0.1, lat, "200", True) for i, lat in enumerate(KNOWN)]
    records += [Record(1.0, 5.0, "415", False), Record(1.1, 5.0, "415", False), Record(1.2, 0.0, "422", False),
                Record(1.3, 30.0, "timeout", False), Record(1.4, 0.0, "dropped", False),
                Record(1.5, 2.0, "unfinished", False)]
    s = summarize(records, wall_s=2.0)
    assert s["requests"] == 16 and s["ok"] == 10 and s["answered"] == 14  # dropped/unfinished never answered
    assert s["errors"] == {"415": 2, "422": 1, "dropped": 1, "timeout": 1, "unfinished": 1}
    assert s["error_count"] == 6
    assert s["requests_per_s"] == pytest.approx(7.0) and s["samples_per_s"] == pytest.approx(5.0)
    lat = s["latency_s"]
    assert lat["count"] == 10 and lat["max"] == 1.0 and lat["p50"] == pytest.approx(0.055)
    assert lat["mean"] == pytest.approx(sum(KNOWN) / 10)
    assert latency_summary([])["p99"] is None
    err = s["error_latency_s"]  # how fast errors came back: the answered ones only
    assert err["count"] == 4 and err["min"] == 0.0 and err["max"] == 30.0


def test_a_run_whose_requests_mostly_failed_is_a_failed_run_and_says_why():
    from autobatch.client.bench import verdict

    base = {"url": "http://127.0.0.1:8000", "route": "/resnet50"}
    # README's bench on the 2-core CPU before issue 23: 41 of 962 served, the rest shed
    shed = verdict({**base, "requests": 962, "ok": 41, "errors": {"503": 921}})
    assert "921 of 962 requests failed (96%; 921 x 503)" in shed and "overloaded" in shed and "/resnet50/tuning" in shed
    nobody = verdict({**base, "requests": 1664, "ok": 0, "errors": {"ConnectError": 1664}})
    assert "1664 of 1664" in nobody and "is the server running" in nobody
    assert verdict({**base, "requests": 6, "ok": 3, "errors": {"415": 3}}) is None  # half: allowed by default
    assert "415" in verdict({**base, "requests": 6, "ok": 3, "errors": {"415": 3}}, max_failed_fraction=0.4)
    assert verdict({**base, "requests": 6, "ok": 1, "errors": {"503": 5}}, max_failed_fraction=1.0) is None
    assert verdict({**base, "requests": 6, "ok": 0, "errors": {"503": 6}}, max_failed_fraction=1.0)  # none ok: failed


def test_bench_and_client_commands_exit_non_zero_and_refuse_remote_addresses(capsys):
    """No server: the commands' exit codes and messages (1: the run failed; 2: it could not run)."""
    from autobatch.cli import main

    nobody = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "--url", nobody, "--route", "r50", "--requests", "4", "--concurrency", "2",
                 "--input", __file__, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "4 of 4 requests failed" in err and "ConnectError" in err and "make serve" in err
    assert main(["bench", "--url", nobody, "--route", "r50", "--requests", "1", "--max-failed-fraction", "2"]) == 2
    assert "--max-failed-fraction" in capsys.readouterr().err
    for argv, flag in ([["client", "r50", __file__, "--url", "http://10.9.8.7:8000"], "--url"],
                       [["client", "r50", __file__, "--protocol", "v2", "--transport", "grpc",
                         "--grpc-url", "10.9.8.7:9000"], "--grpc-url"],
                       [["bench", "--route", "r50", "--protocol", "v2", "--transport", "grpc",
                         "--grpc-url", "10.9.8.7:9000", "--requests", "1"], "--grpc-url"]):
        assert main(argv) == 2, argv
        said = capsys.readouterr().err
        assert f"{flag} 10.9.8.7" in said.replace("http://", "") and "--allow-remote" in said, said
    assert is_loopback("[::1]:9000") and is_loopback("localhost:9000") and not is_loopback("10.0.0.1:9000")


def test_load_settings_are_checked_before_anything_is_sent():
    good = dict(route="r50", payloads=[(b"x", "image/jpeg")], concurrency=2)
    Load(**good).validate()
    for bad, message in [
        ({"url": "http://10.1.2.3:8000"}, "loopback"),
        ({"url": "http://example.com"}, "loopback"),
        ({"concurrency": None}, "exactly one"),
        ({"rate": 5.0}, "exactly one"),
        ({"concurrency": 0}, "--concurrency"),
        ({"duration_s": 0}, "--duration"),
        ({"duration_s": 10_000}, "--duration"),
        ({"max_requests": 0}, "--requests"),
        ({"payloads": []}, "payload"),
        ({"processes": 0}, "--processes"),
        ({"processes": 3}, "must not exceed --concurrency"),
    ]:
        with pytest.raises(BenchError, match=message):
            Load(**{**good, **bad}).validate()
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and is_loopback("http://[::1]:80")
    Load(**{**good, "url": "http://10.1.2.3:8000", "allow_remote": True}).validate()


def test_a_client_that_honors_retry_after_waits_before_resending():
    """A closed-loop client told 503 + Retry-After: 1 waits a second before its next request
    (`autobatch bench --honor-retry-after`); without the flag it resends at once. A real HTTP server
    on loopback, answering every request that way."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class AtCapacity(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"error": "the replica is at capacity; retry later"}'
            self.send_response(503)
            self.send_header("retry-after", "1")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), AtCapacity)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        counts = {}
        for honor in (True, False):
            report = run_load(Load(route="/r50", url=url, payloads=[(b"x", "image/jpeg")], concurrency=1,
                                   duration_s=2.5, honor_retry_after=honor))
            assert report["errors"] == {"503": report["requests"]}, report
            counts[honor] = report["requests"]
        assert counts[True] <= 3 < counts[False], counts  # sent at 0, 1 and 2 s vs back to back
    finally:
        server.shutdown()


def test_a_load_split_between_processes_reports_every_request_once():
    """`autobatch bench --processes 3`: each process sends its share of the concurrency and of the
    request bound; the report counts each request once, over the processes' common wall time. A real
    HTTP server on loopback counts what it received."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            status = 200 if received[-1] == b"ok" else 415
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        load = Load(route="/r50", url=f"http://127.0.0.1:{server.server_address[1]}", concurrency=6, processes=3,
                    payloads=[(b"ok", "image/jpeg"), (b"no", "text/plain")], max_requests=60, duration_s=30,
                    warmup_requests=6)
        from autobatch.client.load_processes import split

        assert [(p.concurrency, p.max_requests, p.warmup_requests) for p in split(load)] == [(2, 20, 2)] * 3
        report = run_load(load)
        assert report["processes"] == 3 and report["stopped_by"] == "requests"
        assert report["requests"] == report["answered"] == 60 and report["ok"] + report["errors"]["415"] == 60
        assert len(received) == 60 + 6  # the warm-up is sent, not counted
        assert report["requests_per_s"] == pytest.approx(60 / report["wall_s"])
        assert "from 3 processes" in format_report(report)
    finally:
        server.shutdown()


def test_payloads_and_routes():
    assert route_path("resnet50") == route_path("/resnet50/") == "/resnet50"
    assert make_payload(image_bytes("PNG"))[1] == "image/png"
    assert make_payload(image_bytes("WEBP"))[1] == "image/webp"
    body, ctype = make_payload("Once upon a time", max_new_tokens=4)
    assert ctype == "application/json" and json.loads(body) == {"prompt": "Once upon a time", "max_new_tokens": 4}


# ----- against a real serve app -----
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ServeCluster(num_cpus=2)
    cache = str(tmp_path_factory.mktemp("client-bench-cache") / "tuning.json")
    c.deploy([{
        "name": "r50", "route_prefix": ROUTE, "import_path": "serve.app:build",
        "args": {"model": "resnet50", "device": "cpu", "latency_budget_ms": 400, "max_batch": MAX_BATCH,
                 "repeats": 1, "cache_path": cache, "num_cpus": 0.25,
                 # a fixed batch and a short wait, so timings below do not depend on this CPU's tuning
                 "user_config": {"batch_size": MAX_BATCH, "batch_wait_timeout_ms": 20}},
    }])
    c.wait_running(["r50"])
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    paths = {}
    for name, data in [("a.jpg", image_bytes("JPEG", seed=1)), ("b.png", image_bytes("PNG", seed=2)),
                       ("c.webp", image_bytes("WEBP", seed=3)), ("notes.txt", b"this is not an image")]:
        (d / name).write_bytes(data)
        paths[name] = str(d / name)
    return paths


def test_client_sync_answers_files_and_bytes_and_reports_errors(cluster, files):
    with Client(cluster.base, timeout=120) as client:
        answer = client.predict("r50", files["a.jpg"])
        assert answer["model"] == "resnet50" and len(answer["top_k"]) == 5
        assert client.predict(ROUTE, image_bytes("PNG", seed=5))["model"] == "resnet50"
        with pytest.raises(ClientError) as err:
            client.predict("r50", files["notes.txt"])
        assert err.value.status == 415 and err.value.message  # the app's own {"error": ...} text
        t = client.tuning("r50")
        assert t["model"] == "resnet50" and t["serving"]["max_batch_size"] == MAX_BATCH
        assert client.describe("r50")["model"] == "resnet50"
        mixed = client.predict_many("r50", [files["b.png"], b""])
        assert mixed[0]["model"] == "resnet50" and isinstance(mixed[1], ClientError) and mixed[1].status == 400
    with Client(f"http://127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(Unreachable, match="could not reach"):
            nobody.tuning("r50")


def test_async_client_sends_together_and_they_batch(cluster, files):
    before = cluster.tuning(ROUTE)

    async def go():
        async with AsyncClient(cluster.base, timeout=120) as client:
            return await client.predict_many("r50", [files["a.jpg"], files["b.png"], files["c.webp"],
                                                     image_bytes("JPEG", seed=9), files["notes.txt"]])

    answers = asyncio.run(go())
    assert [a["model"] for a in answers[:4]] == ["resnet50"] * 4
    assert isinstance(answers[4], ClientError) and answers[4].status == 415
    delta = stats_delta(before, cluster.tuning(ROUTE))
    assert delta["samples_served"] == 4 and max(delta["batch_sizes"]) > 1, delta


def test_client_command_prints_one_answer_per_input(cluster, files, capsys):
    from autobatch.cli import main

    assert main(["client", "r50", files["a.jpg"], files["b.png"], "--url", cluster.base]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(files["a.jpg"] + ": ")
    assert json.loads(lines[1].split(": ", 1)[1])["model"] == "resnet50"
    assert main(["client", "r50", files["c.webp"], files["notes.txt"], "--url", cluster.base, "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["answer"]["model"] == "resnet50"
    assert "error 415" in captured.err and files["notes.txt"] in captured.err
    assert main(["client", "r50", "--tuning", "--url", cluster.base]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "resnet50"


def test_bench_closed_loop_stops_at_its_request_count_and_the_replica_agrees(cluster):
    before = cluster.tuning(ROUTE)
    report = run_load(Load(route="r50", url=cluster.base, payloads=[(image_bytes("JPEG", seed=4), "image/jpeg")],
                           concurrency=2 * MAX_BATCH, max_requests=20, duration_s=120))
    assert report["stopped_by"] == "requests"
    assert report["requests"] == report["answered"] == report["ok"] == 20 and report["errors"] == {}
    assert report["latency_s"]["count"] == 20
    lat = report["latency_s"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 120
    assert report["requests_per_s"] == pytest.approx(20 / report["wall_s"])
    delta = stats_delta(before, cluster.tuning(ROUTE))
    assert delta["samples_served"] == 20 and sum(k * v for k, v in delta["batch_sizes"].items()) == 20
    assert max(delta["batch_sizes"]) > 1, delta  # concurrency 8 really formed batches
    assert "stopped by requests" in format_report(report)


def test_bench_counts_errors_by_status(cluster):
    before = cluster.tuning(ROUTE)
    jpeg = image_bytes("JPEG", seed=6)
    payloads = [(jpeg, "image/jpeg"), (b"this is not an image", "text/plain"), (b"", "image/jpeg"),
                (jpeg[: len(jpeg) // 2], "image/jpeg")]
    report = run_load(Load(route="r50", url=cluster.base, payloads=payloads, concurrency=4, max_requests=12))
    assert report["requests"] == 12 and report["ok"] == 3
    assert report["errors"] == {"400": 3, "415": 3, "422": 3}
    assert report["latency_s"]["count"] == 3  # latency percentiles are over the successes only
    after = cluster.tuning(ROUTE)
    assert stats_delta(before, after)["samples_served"] == 3
    for status in ("400", "415", "422"):
        assert after["stats"]["errors"][status] - before["stats"]["errors"].get(status, 0) == 3


def test_bench_closed_loop_stops_at_its_duration(cluster):
    duration = 2.0
    started = time.perf_counter()
    report = run_load(Load(route="r50", url=cluster.base, payloads=[(image_bytes("JPEG", seed=7), "image/jpeg")],
                           concurrency=2, duration_s=duration, timeout_s=30))
    elapsed = time.perf_counter() - started
    assert report["stopped_by"] == "duration"
    assert report["requests"] == report["ok"] >= 2
    # nothing starts after the deadline; what was in flight then finishes (one batch, well under a few s)
    assert duration <= report["wall_s"] <= duration + 5 and elapsed < duration + 8
    assert report["samples_per_s"] == pytest.approx(report["ok"] / report["wall_s"])


def test_bench_open_loop_issues_on_schedule(cluster):
    report = run_load(Load(route="r50", url=cluster.base, payloads=[(image_bytes("JPEG", seed=8), "image/jpeg")],
                           rate=8, duration_s=2.0, timeout_s=30))
    # uniform arrivals at start + i / rate for every i with i / rate < duration: exactly 16
    assert report["mode"] == "open" and report["stopped_by"] == "duration"
    assert report["requests"] == 16 and report["ok"] == 16
    capped = run_load(Load(route="r50", url=cluster.base, payloads=[(image_bytes("JPEG", seed=8), "image/jpeg")],
                           rate=50, duration_s=1.0, max_requests=7))
    assert capped["stopped_by"] == "requests" and capped["requests"] == 7


def test_bench_counts_transport_errors_and_stays_bounded(cluster):
    jpeg = (image_bytes("JPEG", seed=10), "image/jpeg")
    # a request timeout far below one forward pass: every request times out, the run still ends on time
    started = time.perf_counter()
    report = run_load(Load(route="r50", url=cluster.base, payloads=[jpeg], concurrency=1, max_requests=3, timeout_s=0.005))
    assert report["requests"] == 3 and report["errors"] == {"timeout": 3} and report["ok"] == 0
    assert time.perf_counter() - started < 10
    # nobody listening
    report = run_load(Load(route="r50", url=f"http://127.0.0.1:{free_port()}", payloads=[jpeg], concurrency=2, max_requests=6))
    assert report["requests"] == 6 and report["errors"] == {"ConnectError": 6}
    # open loop past --max-in-flight: the extra arrivals are dropped (never sent), and counted
    report = run_load(Load(route="r50", url=cluster.base, payloads=[jpeg], rate=200, duration_s=0.5, max_in_flight=2,
                           timeout_s=30))
    assert report["requests"] == 100 and report["errors"].get("dropped", 0) >= 50
    assert report["ok"] + report["errors"]["dropped"] == 100


def test_bench_command_json_report(cluster, files, capsys, tmp_path):
    from autobatch.cli import main

    out = tmp_path / "report.json"
    rc = main(["bench", "--url", cluster.base, "--route", "r50", "--concurrency", "3", "--requests", "6",
               "--input", files["a.jpg"], "--input", files["notes.txt"], "--json", "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 6 and report["ok"] == 3 and report["errors"] == {"415": 3}
    assert json.loads(out.read_text()) == report
    assert not math.isnan(report["latency_s"]["p99"])
    # no --input: the bench asks the route what it serves and sends a generated JPEG
    assert main(["bench", "--url", cluster.base, "--route", "r50", "--concurrency", "2", "--requests", "2",
                 "--no-progress"]) == 0
    assert "2 ok" in capsys.readouterr().out
    assert main(["bench", "--url", "http://10.9.8.7:8000", "--route", "r50", "--requests", "1"]) == 2
    assert "loopback" in capsys.readouterr().err
