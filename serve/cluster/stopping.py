"""How `make serve` (serve/local.py) stops what it started: `serve run`, then every process of
its Ray (HAProxy included), and the address file `ray start` left. Why each step is as it is: the
docstrings below. In short: a launcher started in the background inherits SIGINT ignored, so
Ctrl-C alone would reach nothing; `serve run`'s own shutdown and `ray start`'s drain can take more
than a minute; and HAProxy, reparented when its manager dies first, would go on holding the ports.
"""
from __future__ import annotations

import os
import subprocess

import psutil

STOP_GRACE_S = 3.0  # seconds Ray's processes get to exit on SIGTERM before SIGKILL


def _session_members(sid: int) -> list[psutil.Process]:
    """Every process of session `sid`: `ray start` runs in a session of its own, and Ray's processes
    stay in it (workers take process groups of their own, not sessions), also once reparented:
    HAProxy outlived its Ray this way when its manager actor died first."""
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def stop_cluster(head: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every process of the cluster at once (`ray start --block`'s tree and session), then
    SIGKILL what is left after `grace_s`; returns how many needed SIGKILL. Not `ray start`'s own
    SIGTERM path alone: it drains the node for up to 30 s first, and the agents ignore SIGTERM once
    the raylet is gone. Not a process-group kill: workers run in process groups of their own and
    HAProxy in its manager's. Not `ray stop`: it stops every Ray on the host. Nothing of a
    single-node cluster outlives its processes (the GCS keeps its tables in memory), so the drain
    buys nothing here."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    members = {p.pid: p for p in [*tree, *_session_members(head.pid)] if _alive(p)}
    if head.poll() is None:
        head.terminate()
    for proc in members.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(list(members.values()), timeout=grace_s)
    try:
        head.wait(max(0.1, grace_s / 4))
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    # and anything a dying process started meanwhile (HAProxy's manager restarting it)
    left = {p.pid: p for p in [*left, *_session_members(head.pid)] if _alive(p)}
    for proc in left.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(left.values()), timeout=10)
    return len(left)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def forget_cluster_address(address: str, temp_dir: str | None = None) -> None:
    """Remove the `ray_current_cluster` file(s) `ray start` wrote for this head, as `ray stop` does.
    Left behind, they make a later plain `ray.init()` on this host (a benchmark, a notebook) try to
    join the stopped head and fail ("When connecting to an existing cluster, num_cpus and num_gpus
    must not be provided"). A file naming another head is left alone."""
    from ray._common.utils import get_ray_address_file

    for path in {get_ray_address_file(None), get_ray_address_file(temp_dir)}:
        try:
            with open(path) as f:
                if f.read().strip() != address:
                    continue
            os.remove(path)
        except OSError:
            continue


def _stop_serve_run(serve_run: subprocess.Popen) -> None:
    """SIGKILL: `serve run` is only a driver here, and the cluster it deployed to is stopped next,
    which stops Serve with it. Its own Ctrl-C path (`serve.shutdown()`, which waits for every replica
    to drain, 30 s with direct ingress) is not waited for, and a SIGTERM makes Ray's signal handler
    print a stack trace that reads like a crash."""
    if serve_run.poll() is None:
        serve_run.kill()
    serve_run.wait()
