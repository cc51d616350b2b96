"""Keep the gRPC servers Ray Serve opens inside its Python workers on loopback (`make serve`).

Ray 2.60 binds three gRPC servers in Serve's workers to every interface, with no setting to move
them: each replica's inter-deployment server (`"[::]:0"` in ray/serve/_private/replica.py), each
ingress replica's direct-ingress gRPC server (`[::]:40000` upwards, ray/serve/_private/grpc_util.py;
every model application is its own ingress, so every model replica has one), and Ray's gRPC proxy
(`[::]:9000` with `--ingress proxy`). The direct-ingress one and the proxy check no token: anyone who
reached the port could run the models. On a single-node, loopback-only cluster nothing needs them
beyond 127.0.0.1 (HAProxy, the proxy and other replicas all reach a replica at the node's address,
which serve/local.py makes 127.0.0.1).

How: serve/local.py names `bind_worker_grpc_servers` as every Ray worker's setup hook (Ray's
`worker_process_setup_hook`, set for the whole cluster through the environment Ray passes to its
workers) and sets $AUTOBATCH_GRPC_BIND_HOST=127.0.0.1. The hook rewrites a wildcard address
(`[::]:N`, `0.0.0.0:N`, `:N`) given to `grpc.aio` servers' `add_insecure_port` / `add_secure_port`
into that host. Trade-off: it reaches into grpcio's server class, so a grpcio or Ray upgrade that
moves these calls turns it into a no-op (tests/test_local_cluster.py then fails on the listener);
without the launcher (a bare `serve run`), nothing is patched and Ray's defaults hold (README,
Security).
"""
from __future__ import annotations

import os

BIND_HOST_ENV = "AUTOBATCH_GRPC_BIND_HOST"
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"  # Ray's name for the hook's import path
SETUP_HOOK = "serve.cluster.loopback.bind_worker_grpc_servers"
_WILDCARDS = ("[::]", "0.0.0.0", "", "*")


def rewrite(address: str, host: str) -> str:
    """'[::]:0' -> '127.0.0.1:0'; a named host is left as given."""
    where, sep, port = address.rpartition(":")
    if sep and where in _WILDCARDS:
        return f"{host}:{port}"
    return address


def bind_worker_grpc_servers() -> None:
    """Ray's worker setup hook (see the module docstring). Never raises: a failure here would make
    Ray drain the worker, so it leaves Ray's defaults in place instead."""
    host = os.environ.get(BIND_HOST_ENV)
    if not host:
        return
    try:
        from grpc.aio import _server
    except ImportError:
        return
    server = _server.Server
    if getattr(server, "_autobatch_bind_host", None) == host:
        return
    insecure, secure = server.add_insecure_port, server.add_secure_port

    def add_insecure_port(self, address: str) -> int:
        return insecure(self, rewrite(address, host))

    def add_secure_port(self, address: str, server_credentials) -> int:
        return secure(self, rewrite(address, host), server_credentials)

    server.add_insecure_port, server.add_secure_port = add_insecure_port, add_secure_port
    server._autobatch_bind_host = host


def cluster_env(host: str = "127.0.0.1") -> dict:
    """What serve/local.py adds to the cluster's environment for the hook."""
    return {BIND_HOST_ENV: host, SETUP_HOOK_ENV: SETUP_HOOK}
