"""Which processes spent the host's CPU while a command ran: the load generators, HAProxy, Ray's
proxy, the router, each model's replica, Ray's own daemons.

A served path that stays well below its device's speed while no single thread is saturated can
still be held by the host (docs/benchmarks.md §16-17). This says which process the cores went to.
It polls every process's CPU time every `--interval-s`, so processes that start and end during the
command (the load generators) are counted too, and groups them by what they are (Ray's process
titles name each replica's application).

    python benchmarks/cpu_by_process.py --out cpu.json -- python benchmarks/served_vs_tuned.py ...
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import psutil

GROUPS = [  # (label, pattern on the command line), first match wins
    (r"ray::ServeReplica:([^: ]+)", None),
    (r"ray::ProxyActor", "Ray proxy"),
    (r"ray::ServeController", "Serve controller"),
    (r"haproxy", "HAProxy"),
    (r"autobatch\.client\.bench|autobatch bench", "load generators"),
    (r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env_agent|dashboard_agent", "Ray daemons"),
    (r"ray::", "other Ray workers"),
]


def label_of(cmdline: str) -> str:
    for pattern, label in GROUPS:
        match = re.search(pattern, cmdline)
        if match:
            return label or f"replica {match.group(1)}"
    return "other"


class Sampler:
    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._started = time.time()

    def poll(self, at_start: bool = False) -> None:
        for proc in psutil.process_iter(["pid", "cmdline", "name", "create_time"]):
            try:
                times = proc.cpu_times()
                cpu = times.user + times.system
                pid = proc.info["pid"]
                if pid not in self.first:
                    born_after = (proc.info["create_time"] or 0) >= self._started and not at_start
                    self.first[pid] = 0.0 if born_after else cpu
                    self.labels[pid] = label_of(" ".join(proc.info["cmdline"] or [proc.info["name"] or ""]))
                self.last[pid] = cpu
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def run(self) -> None:
        self.poll(at_start=True)
        while not self._stop.wait(self.interval_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        self.poll()

    def by_label(self, wall_s: float) -> list[dict]:
        groups: dict[str, dict] = {}
        for pid, last in self.last.items():
            spent = max(0.0, last - self.first.get(pid, last))
            g = groups.setdefault(self.labels[pid], {"what": self.labels[pid], "processes": 0, "cpu_s": 0.0})
            g["cpu_s"] += spent
            g["processes"] += spent > 0.05
        rows = sorted(groups.values(), key=lambda g: -g["cpu_s"])
        for g in rows:
            g["cores"] = g["cpu_s"] / wall_s if wall_s else None
        return [g for g in rows if g["cpu_s"] > 0.05]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval-s", type=float, default=0.5)
    p.add_argument("--out", default="cpu_by_process.json")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    sampler = Sampler(args.interval_s)
    thread = threading.Thread(target=sampler.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    done = subprocess.run(command)
    sampler.stop()
    wall_s = time.perf_counter() - started
    rows = sampler.by_label(wall_s)
    print(f"\nCPU by process over {wall_s:.1f} s ({psutil.cpu_count()} cores, the command's rc {done.returncode}):")
    print(f"{'what':<28} {'processes':>9} {'cpu s':>8} {'cores':>6}")
    for r in rows:
        print(f"{r['what']:<28} {r['processes']:>9} {r['cpu_s']:>8.1f} {r['cores']:>6.2f}")
    with open(args.out, "w") as f:
        json.dump({"command": command, "wall_s": wall_s, "cores": psutil.cpu_count(), "rows": rows,
                   "rc": done.returncode}, f, indent=1)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
