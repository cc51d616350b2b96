"""Tuning side by side: per model and memory budget, the largest batch each method finds, what it cost
(probes, real OOMs, seconds), and whether the answer really fits the budget.

Methods, all on the same loaded model, the same worst-case input (the spec's example_batch) and the
same memory meter (CUDA: torch's reserved peak + what the card holds outside torch; CPU: peak RSS):
- autobatch     optimizer.tune.autobatch, fresh (no cache). The latency budget is switched off so it
                answers the same question as the others (the largest batch whose peak fits); the
                batch it would serve (its throughput knee) is shown beside.
- ultralytics   ultralytics.utils.autobatch.check_train_batch_size (what `yolo train batch=0.x`
                runs), on a float32 copy of the YOLO model with AMP, its `batch` fraction set so that
                its target (reserved memory <= fraction x available) is the budget. It profiles a
                training step (forward + backward) at 1..16 (or 1..64 on cards >= 16 GiB) and
                extrapolates a line. YOLO models only, CUDA only: on a CPU it returns its default
                batch (16) without measuring, reported as n/a.
- accelerate    accelerate.utils.find_executable_batch_size around the same forward (one warm-up +
                `repeats` runs, like a probe), from start = --max-batch and from its default start
                128; it retries at 0.9x after each OOM. "OOM" must mean "over the budget", by the
                same meter the answers are judged by: a global forward hook reads autobatch's meter
                after every module and raises the framework's OOM error ("CUDA out of memory." /
                "DefaultCPUAllocator: can't allocate memory", which accelerate recognises) once the
                peak passes the budget: emulated OOMs, counted in the OOM column all the same.
                --accelerate-limit allocator (CUDA) uses real allocator OOMs instead, under
                torch.cuda.set_per_process_memory_fraction((budget - memory outside torch) / total);
                but under a cap the caching allocator frees cached blocks and retries before failing,
                so an answer can run under the cap yet reserve more than the budget uncapped (on an
                H200: YOLO11n-pose 46 and 50 ran under a 1672 MiB cap, read 1818 and 1926 MiB
                uncapped), which is why the meter is the default.
- brute force   the true maximum (bruteforce.py): from 0.8 x autobatch's answer, coarse steps (~2%) to the first
                failure, then every size in that last step (exact if memory grows with batch size);
                each size measured exactly like a tuner probe.
Then every answer is measured once more with that same probe: "fits" = its peak <= the budget.

Process history matters on a CPU: a process's memory grows by 2-3 MiB with every distinct batch size
it has run (oneDNN and allocator caches per shape: ResNet-50 at batch 8 read 101, 107, 116, 127 MiB
above the start after 0, 3, 7, 13 other sizes), so a size measured late reads higher than the same
size measured early, and whichever method ran first would have an edge. So on a CPU (--isolate, the
default there) every method, every size of the brute-force scan and every final check runs in a
fresh process that loads the model and runs one batch of 1 first: all start from the same state, a
check is what a fresh replica serving that batch would see, and "seconds" counts the method's own
work (not the process start and model load). On CUDA the caching allocator is emptied between probes and
everything runs in one process (--isolate to change it).

On a CPU the script fixes glibc's mmap threshold (mallopt M_MMAP_THRESHOLD = 128 KiB) for its own
process, so large tensors are always mmapped and returned to the OS when freed: without that, glibc
raises the threshold as big blocks are freed, later batches come from a heap that never shrinks, and
the peak RSS of one batch size wanders by +-50-90 MiB with the order sizes were run in (measured on
ResNet-50: 6 samples read 119-125 MiB above the base with it, 214-241 MiB without). Every method
runs in this one process, so all of them get the steadier meter. The model also runs one batch
before anything is measured, so one-time initialisation is in nobody's first probe.

    python benchmarks/tuning_vs_peers.py --device cuda --headroom-mb 1024 4096 16384 --max-batch 4096
    python benchmarks/tuning_vs_peers.py --device cpu --models resnet50 yolo11n_pose --headroom-mb 256 512
    python benchmarks/tuning_vs_peers.py --quick          # CPU, tiny: keeps the script from rotting
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import default_out, describe_environment, environment, markdown_table, say, table, write_json  # noqa: E402
from bruteforce import Measurer, brute_force  # noqa: E402
from peers import run_accelerate, run_ultralytics  # noqa: E402

from deployments.registry import create_spec, model_names  # noqa: E402
from optimizer.devices import make_meter, resolve_device_kind  # noqa: E402
from optimizer.probe import OK, ProbeResult  # noqa: E402
from optimizer.tune import TuningSettings, autobatch  # noqa: E402

MODELS = tuple(model_names())
NO_LATENCY_BOUND_S = 1e6


class FreshMeasurer:
    """Like Measurer, but each size in a fresh process (Session.run "check"): no memory history."""

    def __init__(self, session, common: dict):
        self.session, self.common = session, common
        self.results: dict[int, ProbeResult] = {}
        self.seconds: dict[int, float] = {}

    def __call__(self, size: int) -> ProbeResult:
        if size not in self.results:
            found = self.session.run({**self.common, "task": "check", "sizes": [size]}).get(str(size))
            if found is None:
                raise RuntimeError(f"the check of batch {size} failed; see the worker's stderr above")
            self.seconds[size] = found.pop("seconds", 0.0)
            self.results[size] = ProbeResult.from_dict(found)
        return self.results[size]


def run_autobatch(spec, meter, kind: str, dtype: str, budget: int, max_batch: int, repeats: int) -> dict:
    settings = TuningSettings(device=kind, dtype=dtype, memory_budget_bytes=budget, latency_budget_s=NO_LATENCY_BOUND_S,
                              max_batch=max_batch, repeats=repeats)
    try:
        tuning = autobatch(spec, settings, cache=None, loaded=True, meter=meter, say=lambda line: say("    " + line))
    except Exception as exc:  # noqa: BLE001 - e.g. batch 1 does not fit the budget: a row, not a crash
        return {"found": None, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}
    return {"found": tuning.max_safe_batch, "probes": tuning.probe_count, "ooms": tuning.oom_events,
            "seconds": tuning.tuning_s, "serve_batch": tuning.batch_size,
            "note": f"{tuning.search_probe_count} search + {tuning.probe_count - tuning.search_probe_count} knee "
                    f"probes, {tuning.predicted_skips} predicted skips; serves {tuning.batch_size}"}


# ----- the run -----
COLUMNS = [("model", "model", ""), ("budget MiB", "budget_mb", ".0f"), ("method", "method", ""),
           ("batch found", "found", ""), ("x true max", "ratio", ".2f"), ("probes", "probes", ""),
           ("OOMs", "ooms", ""), ("seconds", "seconds", ".1f"), ("fits", "fits", ""),
           ("peak MiB", "peak_mb", ".0f")]


def steady_cpu_memory() -> bool:
    """glibc: a fixed mmap threshold (see the module doc). False where it cannot be set."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class Session:
    """One model loaded on the device (warmed up, base memory measured) and the tasks run on it:
    base | autobatch | ultralytics | accelerate | brute | check. In-process, or (isolate) each task in
    a fresh process that loads the model itself, so no task inherits another's memory history."""

    def __init__(self, name: str, options: dict, kind: str, isolate: bool):
        self.name, self.options, self.kind, self.isolate = name, options, kind, isolate
        self.spec = self.meter = None
        if not isolate:
            self.spec, self.meter, self.dtype, self.base = load_model(name, options, kind)
        else:
            found = self.run({"task": "base"})
            self.dtype, self.base = found["dtype"], found["base"]

    def run(self, task: dict) -> dict:
        if not self.isolate:
            return run_task(task, self.spec, self.meter, self.kind, self.dtype)
        import json
        import subprocess

        job = {**task, "model": self.name, "options": self.options, "kind": self.kind}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                              stdout=subprocess.PIPE, text=True, env=os.environ)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            return {"found": None, "note": f"failed: worker exit {done.returncode} (see stderr above)"}
        return json.loads(lines[-1][len("RESULT "):])

    def close(self) -> None:
        if self.spec is not None:
            self.spec = None
            self.meter.cleanup()


def load_model(name: str, options: dict, kind: str):
    spec = create_spec(name, **options)
    meter = make_meter(kind)
    dtype = spec.default_dtype(kind)
    say(f"{name}: loading on {meter.torch_device} as {dtype}")
    spec.load(meter.torch_device, dtype)
    spec.predict(spec.example_batch(1))  # one-time initialisation, before anything is measured
    meter.cleanup()
    return spec, meter, dtype, meter.current_bytes()


def run_task(task: dict, spec, meter, kind: str, dtype: str) -> dict:
    what, budget = task["task"], task.get("budget")
    if what == "base":
        meter.cleanup()
        return {"dtype": dtype, "base": meter.current_bytes()}
    if what == "autobatch":
        return run_autobatch(spec, meter, kind, dtype, budget, task["max_batch"], task["repeats"])
    if what == "ultralytics":
        return run_ultralytics(spec, meter, kind, budget)
    if what == "accelerate":
        return run_accelerate(spec, meter, kind, budget, task["start"], task["repeats"], task.get("limit", "meter"))
    if what == "brute":
        return brute_force(Measurer(spec, meter, budget, task["repeats"]), task["hint"], task["max_batch"],
                           task.get("resolution", 0.0))
    if what == "check":  # each size as a fresh replica would first run it: its own probe, nothing before
        check, out = Measurer(spec, meter, budget, task["repeats"]), {}
        for size in task["sizes"]:
            started = time.perf_counter()
            out[str(size)] = {**check(size).to_dict(), "seconds": time.perf_counter() - started}
        return out
    raise ValueError(f"unknown task {what!r}")


def worker(job_text: str) -> int:
    import json

    job = json.loads(job_text)
    if job["kind"] == "cpu":
        steady_cpu_memory()
    spec, meter, dtype, base = load_model(job["model"], job["options"], job["kind"])
    print("RESULT " + json.dumps(run_task(job, spec, meter, job["kind"], dtype)), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS, help="default: all four on CUDA; resnet50 yolo11n_pose on a CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    budgets = parser.add_mutually_exclusive_group()
    budgets.add_argument("--headroom-mb", type=float, nargs="+", help="budgets as MiB above the loaded model's memory (default: CUDA 1024 4096 16384, CPU 256 512)")
    budgets.add_argument("--budgets-mb", type=float, nargs="+", help="absolute budgets in MiB (model and context included)")
    parser.add_argument("--max-batch", type=int, default=None, help="upper limit for every method, accelerate's start (default: CUDA 4096, CPU 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per probe, for every method (the tuner's default 3)")
    parser.add_argument("--accelerate-starts", type=int, nargs="+", default=None, help="default: --max-batch and 128 (its own default)")
    parser.add_argument("--accelerate-limit", choices=["meter", "allocator"], default="meter",
                        help="how accelerate's OOM is made to mean 'over the budget': meter (default; a forward hook on "
                             "autobatch's meter, emulated OOMs) or allocator (CUDA: set_per_process_memory_fraction, real OOMs)")
    parser.add_argument("--brute-resolution", type=float, default=0.0,
                        help="brute force's last stage steps by this fraction of the answer (default 0: by 1, exact); "
                             "e.g. 0.005 for batches in the thousands on a GPU")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run every method and every final check in a fresh process (default: on for CPU, off for CUDA)")
    parser.add_argument("--llama-config", default=None, help="synthetic Llama shape: small or llama3-8b (default small)")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/tuning_vs_peers-<device>.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--quick", action="store_true", help="CPU, ResNet-50, one small budget, max batch 8")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    if args.quick:
        args.device, args.models, args.max_batch, args.repeats = "cpu", ["resnet50"], 8, 1
        args.headroom_mb, args.budgets_mb, args.accelerate_starts = [64], None, [8]
    kind = resolve_device_kind(args.device)
    models = args.models or (list(MODELS) if kind == "cuda" else ["resnet50", "yolo11n_pose"])
    max_batch = args.max_batch or (4096 if kind == "cuda" else 128)
    starts = sorted({min(s, max_batch) for s in (args.accelerate_starts or [max_batch, 128])}, reverse=True)
    isolate = (kind == "cpu") if args.isolate is None else args.isolate
    if not args.budgets_mb and not args.headroom_mb:
        args.headroom_mb = [1024, 4096, 16384] if kind == "cuda" else [256, 512]
    env = environment(kind)
    if kind == "cpu":
        env["fixed_mmap_threshold"] = steady_cpu_memory()
    env["isolated_processes"] = isolate
    say(describe_environment(env))

    rows = []
    out_path = args.out or default_out("tuning_vs_peers", kind, args.quick)
    settings = {"max_batch": max_batch, "repeats": args.repeats, "accelerate_starts": starts, "models": models, "isolate": isolate}

    def save(rows_so_far):
        return write_json(out_path, {"environment": env, "settings": settings, "rows": rows_so_far})

    for name in models:
        options = {"config": args.llama_config} if name == "llama_int4" and args.llama_config else {}
        session = Session(name, options, kind, isolate)
        base, dtype = session.base, session.dtype
        budgets = ([int(mb * 2**20) for mb in args.budgets_mb] if args.budgets_mb
                   else [int(base + mb * 2**20) for mb in args.headroom_mb])
        for budget in budgets:
            say(f"{name}: budget {budget / 2**20:.0f} MiB (model loaded: {base / 2**20:.0f} MiB)")
            if budget <= base:
                say(f"  skipped: the loaded model alone takes {base / 2**20:.0f} MiB")
                continue
            common = {"budget": budget, "max_batch": max_batch, "repeats": args.repeats}
            methods: dict[str, dict] = {}
            say("  autobatch")
            methods["autobatch"] = session.run({**common, "task": "autobatch"})
            say("  ultralytics")
            methods["ultralytics AutoBatch"] = (session.run({**common, "task": "ultralytics"}) if name == "yolo11n_pose"
                                                else {"found": None, "note": "n/a (YOLO models only)"})
            for start in starts:
                say(f"  accelerate from {start}")
                methods[f"accelerate (start {start})"] = session.run({**common, "task": "accelerate", "start": start,
                                                                       "limit": args.accelerate_limit})
            say("  brute force")  # after autobatch: it scans around autobatch's answer
            hint = methods["autobatch"].get("found") or 1
            if isolate:  # every size in a fresh process; the final checks reuse these measurements
                fresh = FreshMeasurer(session, common)
                methods["brute force"] = brute_force(fresh, hint, max_batch, args.brute_resolution)
            else:
                methods["brute force"] = session.run({**common, "task": "brute", "hint": hint,
                                                      "resolution": args.brute_resolution})
            true_max = methods["brute force"]["found"]
            say("  final check of every answer")
            sizes = sorted({r["found"] for r in methods.values() if r.get("found")})
            checked: dict[str, dict] = {}
            if isolate:
                checked = {str(size): fresh(size).to_dict() for size in sizes}
            elif sizes:
                checked = session.run({**common, "task": "check", "sizes": sizes})
            for method, r in methods.items():
                found = r.get("found")
                measured = ProbeResult.from_dict(checked[str(found)]) if found and str(found) in checked else None
                rows.append({
                    "model": name, "device": env["device"], "dtype": dtype, "budget_mb": budget / 2**20,
                    "base_mb": base / 2**20, "method": method, "found": found if found else "n/a",
                    "ratio": found / true_max if found and true_max else None,
                    "probes": r.get("probes"), "ooms": r.get("ooms"), "seconds": r.get("seconds"),
                    "fits": None if measured is None else ("yes" if measured.outcome == OK else f"no ({measured.outcome})"),
                    "peak_mb": measured.peak_bytes / 2**20 if measured is not None and measured.peak_bytes else None,
                    "serve_batch": r.get("serve_batch"), "note": r.get("note"), "raw": {k: v for k, v in r.items() if k != "note"},
                })
            save(rows)  # after every budget: a run cut off by a time limit keeps what it finished
        session.close()

    print(describe_environment(env))
    print(table(rows, COLUMNS))
    print("notes:")
    for r in rows:
        if r["note"]:
            print(f"  {r['model']} {r['budget_mb']:.0f} MiB {r['method']}: {r['note']}")
    if args.markdown:
        print(markdown_table(rows, COLUMNS))
    out = save(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
