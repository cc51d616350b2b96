"""`autobatch bench`: load-test one route of the serve app (the load generator is load.py).

    autobatch bench --route resnet50 --concurrency 16 --duration 30          # closed loop
    autobatch bench --route resnet50 --rate 50 --duration 30 --json          # open loop, 50 req/s
    autobatch bench --route llama_int4 --prompt "Once upon a time" --concurrency 8 --requests 200

Closed loop: N workers, each sends its next request when its last one is answered (the load adapts to
the server). Open loop: requests start on a fixed schedule (uniform or Poisson arrivals) whether or
not earlier ones were answered; latency counts from the scheduled start, so a server that falls
behind shows it (no coordinated omission), and at most --max-in-flight requests are outstanding
(arrivals beyond that are counted as "dropped", not sent).

Every run is bounded: it stops issuing at --duration seconds or after --requests requests, whichever
comes first, waits at most --timeout for the requests in flight, then cancels them ("unfinished").
Load goes to loopback addresses only unless --allow-remote is given.

Exits 1 when no request succeeded or more than --max-failed-fraction (default half) failed, with a
line on stderr saying how they failed and what to do; 2 when the run could not start.

Reports requests/s (all answered requests), samples/s (successful ones: one sample per request),
tokens/s for LLM routes, p50/p90/p99/max latency of the successful requests, and error counts by HTTP
status (or by transport error: timeout, ConnectError, ...). With --protocol v2 each request carries
--samples-per-request samples over the Open Inference Protocol (HTTP or gRPC) and samples/s counts
samples. No Ray import here.
"""
from __future__ import annotations

import argparse
import json
import sys

import httpx

from .http_client import DEFAULT_URL, make_payload, remote_refusal, route_path
from .load import (DEFAULT_DURATION_S, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUESTS, DEFAULT_TIMEOUT_S,  # noqa: F401
                   DROPPED, MAX_DURATION_S, MAX_REQUESTS, UNFINISHED, BenchError, Load, Record, is_loopback,
                   latency_summary, percentile, summarize)
from .load_processes import run_load

# ----- payloads -----
def generated_jpeg(size: tuple[int, int] = (640, 480), seed: int = 0) -> bytes:
    """A real JPEG with a pattern (no file needed): the default payload for image routes."""
    from deployments.images import example_jpeg

    return example_jpeg(size, seed)


DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def default_payloads(url: str, route: str, max_new_tokens: int | None = None, timeout: float = 30.0) -> list[tuple[bytes, str]]:
    """Asks the route which model it serves (GET /<route>/) and sends that model's example payload."""
    from deployments.base import SpecConfigError
    from deployments.registry import spec_class

    model = ""
    try:
        r = httpx.get(url.rstrip("/") + route_path(route) + "/", timeout=timeout, trust_env=False)
        model = str(r.json().get("model", "")) if r.status_code == 200 else ""
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    try:
        spec = spec_class(model or route_path(route).strip("/"))
    except SpecConfigError as exc:
        raise BenchError(f"cannot tell which model {route_path(route)} serves ({exc}); "
                         f"give --input FILE or --prompt TEXT") from None
    return [spec.example_payload(max_new_tokens=max_new_tokens)]


# ----- report -----
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def format_report(report: dict) -> str:
    if report["mode"] == "closed":
        shape = f"closed loop, concurrency {report['concurrency']}"
    else:
        shape = f"open loop, {report['rate']:g} req/s ({report['arrivals']} arrivals)"
    if report.get("processes", 1) > 1:
        shape += f" from {report['processes']} processes"
    lat = report["latency_s"]
    errors = ", ".join(f"{status}: {n}" for status, n in report["errors"].items()) or "none"
    lines = [
        f"{report['url'].rstrip('/')}{report['route']}: {shape}; bounds {report['duration_bound_s']:g} s / "
        f"{report['requests_bound']} requests, stopped by {report['stopped_by']} after {report['wall_s']:.2f} s",
        f"requests   {report['requests']} issued, {report['answered']} answered, {report['ok']} ok; errors by status: {errors}",
        f"throughput {report['requests_per_s']:.2f} requests/s, {report['samples_per_s']:.2f} samples/s"
        + (f" ({report['samples_per_request']} per request, v2 over {report['transport']})" if report.get("protocol") else "")
        + (f", {report['tokens_per_s']:.1f} tokens/s" if report.get("tokens_per_s") else ""),
        f"latency ms p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}  "
        f"mean {_ms(lat['mean'])}  (over {lat['count']} ok requests)",
    ]
    err = report.get("error_latency_s") or {}
    if err.get("count"):
        lines.append(f"errors ms  p50 {_ms(err['p50'])}  p99 {_ms(err['p99'])}  max {_ms(err['max'])}  "
                     f"(over {err['count']} answered errors)")
    return "\n".join(lines)


# ----- the verdict: a run whose requests mostly failed is a failed run -----
DEFAULT_MAX_FAILED_FRACTION = 0.5
EXIT_FAILED = 1  # the run ran, but too many of its requests failed (2: it could not run)


def _hint(status: str, url: str, route: str) -> str:
    """What to do about the commonest failure, by its status."""
    if status in ("ConnectError", "ConnectTimeout"):
        return f"nothing answered at {url}: is the server running (`make serve`)? Give another address with --url"
    if status in ("timeout", "ReadTimeout", "unfinished"):
        return "the server did not answer in time: lower --concurrency / --rate, or raise --timeout"
    if status in ("503", "429"):
        return (f"the server refused them as overloaded: lower --concurrency / --rate, pass --honor-retry-after, "
                f"or see GET {route}/tuning (serving.admission)")
    if status == "404":
        return f"no such route {route}: GET / on the server lists its models"
    if status.startswith("4"):
        return "the server refused the payload: send one the route takes (GET <route>/ says what)"
    if status == "dropped":
        return "the open loop dropped arrivals past --max-in-flight: lower --rate or raise --max-in-flight"
    return "see the server's log"


def verdict(report: dict, max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> str | None:
    """None when the run is good; else one line saying how many requests failed, how, and what to do.
    A run fails when no request succeeded, or when more than `max_failed_fraction` of them failed."""
    issued, ok = report["requests"], report["ok"]
    failed = issued - ok
    if issued and ok and failed <= max_failed_fraction * issued:
        return None
    if not issued:
        return "no request was issued"
    commonest = max(report["errors"].items(), key=lambda kv: kv[1])[0] if report["errors"] else "?"
    by_status = ", ".join(f"{n} x {status}" for status, n in sorted(report["errors"].items(), key=lambda kv: -kv[1]))
    return (f"{failed} of {issued} requests failed ({failed / issued:.0%}; {by_status}), more than the "
            f"{max_failed_fraction:.0%} allowed (--max-failed-fraction): {_hint(commonest, report['url'], report['route'])}")


# ----- `autobatch bench` -----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the serve app (default {DEFAULT_URL})")
    p.add_argument("--route", required=True, help="the model's route, e.g. resnet50")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight (default 8)")
    shape.add_argument("--rate", type=float, help="open loop: requests started per second")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                   help=f"seconds to issue requests (default {DEFAULT_DURATION_S:g}, at most {MAX_DURATION_S:g})")
    p.add_argument("--requests", type=int, default=DEFAULT_MAX_REQUESTS,
                   help=f"most requests to issue (default {DEFAULT_MAX_REQUESTS}, at most {MAX_REQUESTS})")
    p.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="payload file (image, or JSON for an LLM route); repeat to cycle through several")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="LLM routes: a prompt to send (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="LLM routes: with --prompt")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request, and the most the run waits past --duration")
    p.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, help="open loop: outstanding requests at most")
    p.add_argument("--arrivals", choices=["uniform", "poisson"], default="uniform", help="open loop: arrival process")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="requests sent first and not counted")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url (only servers you run)")
    p.add_argument("--honor-retry-after", action="store_true",
                   help="closed loop: a client told 503 + Retry-After waits that long before its next request")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-failed-fraction", type=float, default=DEFAULT_MAX_FAILED_FRACTION, metavar="F",
                   help=f"exit {EXIT_FAILED} when more than this fraction of the requests failed, or none succeeded "
                        f"(default {DEFAULT_MAX_FAILED_FRACTION:g}; 1 to fail only when nothing succeeded)")
    p.add_argument("--protocol", choices=["simple", "v2"], default="simple",
                   help="simple: POST one payload per request to the route; v2: the Open Inference Protocol, "
                        "--samples-per-request samples per request to /v2/models/<route>/infer or gRPC")
    p.add_argument("--transport", choices=["http", "grpc"], default="http", help="v2: HTTP (--url) or gRPC (--grpc-url)")
    p.add_argument("--grpc-url", default=None, help="v2 over gRPC: host:port (default 127.0.0.1:9000, or $AUTOBATCH_GRPC_URL)")
    p.add_argument("--samples-per-request", type=int, default=1, metavar="N", help="v2: samples in each request")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="load processes sharing the concurrency or rate (one process sends ~1,000-2,000 small "
                        "requests/s at most; a faster server needs several)")


def cmd_bench(args) -> int:
    try:
        payloads = []
        for path in args.input:
            try:
                payloads.append(make_payload(open(path, "rb").read()))
            except OSError as exc:
                raise BenchError(f"cannot read --input {path!r}: {exc.strerror}") from None
        payloads += [make_payload(text, max_new_tokens=args.max_new_tokens) for text in args.prompt]
        load = Load(route=args.route, payloads=payloads or [(b"", "")], url=args.url,
                    concurrency=args.concurrency if args.concurrency or args.rate else 8, rate=args.rate,
                    duration_s=args.duration, max_requests=args.requests, timeout_s=args.timeout,
                    max_in_flight=args.max_in_flight, arrivals=args.arrivals, warmup_requests=args.warmup,
                    allow_remote=args.allow_remote, honor_retry_after=args.honor_retry_after,
                    processes=getattr(args, "processes", 1))
        load.validate()  # before anything is sent, the default-payload query included
        if not 0 <= getattr(args, "max_failed_fraction", DEFAULT_MAX_FAILED_FRACTION) <= 1:
            raise BenchError(f"--max-failed-fraction must be within [0, 1], got {args.max_failed_fraction}")
        if getattr(args, "protocol", "simple") == "v2" and getattr(args, "transport", "http") == "grpc":
            from .oip_commands import DEFAULT_GRPC_URL

            refused = remote_refusal(args.grpc_url or DEFAULT_GRPC_URL, args.allow_remote, "--grpc-url")
            if refused:
                raise BenchError(refused)
        if not payloads:
            load.payloads = default_payloads(args.url, args.route, args.max_new_tokens)
        if getattr(args, "protocol", "simple") == "v2":
            from .oip_commands import v2_sender

            load.sender = v2_sender(args, load.payloads)
        report = run_load(load, progress=not args.no_progress)
    except BenchError as exc:
        print(f"autobatch bench: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    failed = verdict(report, getattr(args, "max_failed_fraction", DEFAULT_MAX_FAILED_FRACTION))
    if failed:
        print(f"autobatch bench: failed: {failed}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def register(subparsers) -> None:
    """Adds `autobatch bench` (autobatch/cli.py calls it)."""
    p = subparsers.add_parser("bench", help="load-test a route: requests/s, samples/s, latency percentiles, errors",
                              description="Send a bounded load (closed loop at a concurrency, or open loop at a rate) "
                                          "to one route and report throughput, latency percentiles and errors by status.")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autobatch.client.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
