"""benchmarks/llm_serving.py's own logic: the SSE parser, the percentile, the seeded workload and a
level's summary (no server, no timing)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import llm_serving as bench  # noqa: E402


def events(lines):
    parser = bench.SseParser()
    out = [d for d in (parser.feed(line) for line in lines) if d is not None]
    last = parser.close()
    return out + ([last] if last is not None else [])


def test_sse_parser_events_comments_and_multiline_data():
    lines = ['data: {"a": 1}', "", ": keep-alive", "", "event: x", "id: 3", "data:{\"b\": 2}", "", "data: one",
             "data: two", "", "data: [DONE]", ""]
    assert events(lines) == ['{"a": 1}', '{"b": 2}', "one\ntwo", "[DONE]"]


def test_sse_parser_carriage_returns_and_a_stream_without_its_last_blank_line():
    assert events(["data: x\r\n", "\r\n", "data: [DONE]"]) == ["x", "[DONE]"]


def test_percentile_nearest_rank():
    assert bench.percentile([], 50) is None
    assert bench.percentile([5.0], 99) == 5.0
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 51  # round(0.5 * 99) = 50 -> the 51st
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(list(reversed(values)), 0) == 1


def test_workload_is_seeded_per_client_and_within_limits():
    a = bench.request_stream(7, 3, 512, 128)
    b = bench.request_stream(7, 3, 512, 128)
    first = [next(a) for _ in range(50)]
    assert first == [next(b) for _ in range(50)]
    other = bench.request_stream(7, 4, 512, 128)
    assert [next(other) for _ in range(50)] != first
    assert all(16 <= len(p) <= 511 and 1 <= n <= 128 for p, n in first)
    assert len({len(p) for p, _ in first}) > 10  # mixed lengths


def test_summarise_tokens_errors_and_tpot():
    records = [
        {"start": 0.0, "first": 0.1, "end": 1.1, "tokens": 11, "status": "200", "max_tokens": 11},  # tpot 0.1
        {"start": 0.0, "first": 0.5, "end": 0.5, "tokens": 1, "status": "200", "max_tokens": 1},  # no tpot
        {"start": 0.0, "first": None, "end": 0.01, "tokens": 0, "status": "503", "max_tokens": 9},
        {"start": 0.0, "first": None, "end": None, "tokens": 0, "status": "cut", "max_tokens": 9},
    ]
    row = bench.summarise("continuous", 2, records, 2.0)
    assert row["tokens"] == 12 and row["tokens_per_s"] == 6.0 and row["requests_per_s"] == 1.0
    assert row["errors"] == {"503": 1, "cut": 1} and row["errors_text"] == "503: 1, cut: 1"
    assert row["tpot_samples"] == 1 and abs(row["tpot_p50_ms"] - 100.0) < 1e-9
    assert abs(row["ttft_p99_ms"] - 500.0) < 1e-9


def test_ratios_pair_levels_of_both_schedulers():
    rows = [{"scheduler": "static", "clients": 1, "tokens_per_s": 10.0, "ttft_p99_ms": 200.0},
            {"scheduler": "continuous", "clients": 1, "tokens_per_s": 15.0, "ttft_p99_ms": 100.0},
            {"scheduler": "static", "clients": 4, "tokens_per_s": 20.0, "ttft_p99_ms": 400.0}]
    assert bench.ratios(rows) == [{"clients": 1, "tokens_ratio": 1.5, "ttft_p99_ratio": 0.5}]


def test_a_whole_answer_in_one_event_has_no_time_per_output_token():
    static = {"start": 0.0, "first": 2.0, "end": 2.001, "tokens": 64, "status": "200", "max_tokens": 64, "text_events": 1}
    row = bench.summarise("static", 1, [static], 2.0)
    assert row["tpot_p50_ms"] is None and row["tpot_samples"] == 0
    assert row["ttft_p50_ms"] == 2000.0 and row["tokens"] == 64


def test_retry_after_seconds():
    assert bench.retry_after("3") == 3.0 and bench.retry_after(None) is None
    assert bench.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None and bench.retry_after("-1") == 0.0


def test_parse_metrics_sums_series_and_skips_buckets():
    text = "\n".join([
        "# HELP ray_autobatch_llm_generated_tokens_total x",
        'ray_autobatch_llm_generated_tokens_total{replica="a"} 10.0',
        'ray_autobatch_llm_generated_tokens_total{replica="b"} 5.0',
        'ray_autobatch_llm_time_to_first_token_seconds_bucket{le="0.1",replica="a"} 3.0',
        'ray_autobatch_llm_time_to_first_token_seconds_count{replica="a"} 7.0',
        'ray_autobatch_device_memory_bytes{replica="a"} 9.5e+08',
        'ray_serve_num_http_requests_total{x="y"} 4.0'])
    assert bench.parse_metrics(text) == {"autobatch_llm_generated_tokens_total": 15.0,
                                         "autobatch_llm_time_to_first_token_seconds_count": 7.0,
                                         "autobatch_device_memory_bytes": 9.5e8}
