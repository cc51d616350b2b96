"""The table of a serving run: every `autobatch bench` report benchmarks/gpu_serving.sh wrote (named
<tag>-<ingress>-<model>-r<replicas>-<shape>.json), after beside before where both ran, and plain
Ray Serve's levels from benchmarks/serving_vs_plain.py beside this tree's simple route.

    python benchmarks/serving_table.py RESULTS_DIR [PLAIN_JSON]
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import markdown_table, table  # noqa: E402

NAME = re.compile(r"(?:(?P<tag>before|after)-)?(?P<ingress>haproxy|proxy)-(?P<model>.+)-r(?P<replicas>\d+)-"
                  r"(?P<shape>simple-1x\d+|v2(?:http|grpc)-\d+x\d+)\.json$")
COLUMNS = [("tree", "tree", ""), ("model", "model", ""), ("replicas", "replicas", ""), ("request shape", "shape", ""),
           ("clients", "clients", ""), ("req/s", "requests_per_s", ".1f"), ("images/s", "samples_per_s", ".0f"),
           ("p50 ms", "p50_ms", ".0f"), ("p99 ms", "p99_ms", ".0f"), ("errors", "errors", "")]
RATIO_COLUMNS = [("model", "model", ""), ("request shape", "shape", ""), ("clients", "clients", ""),
                 ("after / before images/s", "vs_before", ".2f"), ("after / plain req/s", "vs_plain", ".2f"),
                 ("p99 after / plain", "p99_vs_plain", ".2f")]


def read_runs(folder: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        m = NAME.search(os.path.basename(path))
        if not m:
            continue
        r = json.load(open(path))
        shape = m["shape"]
        clients = int(shape.rsplit("x", 1)[1])
        label = "1 JPEG, simple route" if shape.startswith("simple") else \
            f"{r.get('samples_per_request')} JPEGs, v2 {r.get('transport')}"
        lat = r["latency_s"]
        rows.append({"tree": m["tag"] or "", "model": m["model"], "replicas": int(m["replicas"]), "shape": label,
                     "clients": clients, "requests_per_s": r["requests_per_s"], "samples_per_s": r["samples_per_s"],
                     "p50_ms": lat["p50"] * 1e3 if lat["p50"] is not None else None,
                     "p99_ms": lat["p99"] * 1e3 if lat["p99"] is not None else None,
                     "errors": ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"})
    return rows


def read_plain(path: str) -> list[dict]:
    data = json.load(open(path))
    rows = []
    for r in data.get("serving", []):
        rows.append({"tree": "plain Ray Serve", "model": r["model"], "replicas": 1, "shape": "1 JPEG, simple route",
                     "clients": r["concurrency"], "requests_per_s": r["requests_per_s"],
                     "samples_per_s": r["samples_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r.get("p99_ms"),
                     "errors": ", ".join(f"{k}: {v}" for k, v in (r.get("errors_by_status") or {}).items()) or "none"})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["tree"], r["model"], r["replicas"], r["shape"], r["clients"]): r for r in rows}
    out = []
    for (tree, model, replicas, shape, clients), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if tree != "after" or replicas != 1:
            continue
        before = by.get(("before", model, 1, shape, clients))
        plain = by.get(("plain Ray Serve", model, 1, shape, clients))
        if not before and not plain:
            continue
        out.append({"model": model, "shape": shape, "clients": clients,
                    "vs_before": r["samples_per_s"] / before["samples_per_s"] if before and before["samples_per_s"] else None,
                    "vs_plain": r["requests_per_s"] / plain["requests_per_s"] if plain and plain["requests_per_s"] else None,
                    "p99_vs_plain": r["p99_ms"] / plain["p99_ms"] if plain and plain.get("p99_ms") and r["p99_ms"] else None})
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    rows = read_runs(argv[0]) + (read_plain(argv[1]) if len(argv) > 1 and os.path.exists(argv[1]) else [])
    rows.sort(key=lambda r: (r["model"], r["shape"], r["clients"], r["tree"]))
    print(table(rows, COLUMNS))
    print()
    print(table(ratios(rows), RATIO_COLUMNS))
    print()
    print(markdown_table(rows, COLUMNS))
    print(markdown_table(ratios(rows), RATIO_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
