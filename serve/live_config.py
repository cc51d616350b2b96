"""`autobatch config ROUTE [KEY=VALUE ...]` and `autobatch retune ROUTE`: change a running route's
user_config live, through the same REST call as `serve deploy` (Ray's dashboard, PUT
/api/serve/applications/), so the replicas are reconfigured, not restarted.

    autobatch config resnet50                     # the route's user_config now
    autobatch config resnet50 batch_size=16       # pin the batch size
    autobatch config resnet50 batch_size=         # drop the pin (a key with no value is removed)
    autobatch config resnet50 latency_budget_ms=100
    autobatch retune resnet50                     # re-measure now (bumps user_config.retune)

Why not plain `serve deploy`: it replaces an app's whole config, so a one-key change needs the
running config first; and Ray >= 2.5x turns token authentication on for every cluster `ray.init()`
or `serve run` starts (token in ~/.ray/auth_token), while `serve deploy` in another shell sends the
token only when RAY_AUTH_MODE=token is set there too; without it the dashboard answers 401 and the
CLI raises AuthenticationError. This command sends the token itself, found where Ray looks for it:
$RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

DEFAULT_DASHBOARD = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")


class LiveConfigError(Exception):
    pass


def auth_token() -> str | None:
    """Ray's token for this cluster, looked up in Ray's order; None where there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    for candidate in candidates:
        try:
            token = candidate.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def _client(address: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return ServeSubmissionClient(address, headers=headers)


def parse_changes(pairs: list[str]) -> dict:
    """KEY=VALUE -> {KEY: VALUE parsed as YAML (16 -> int, 0.5 -> float)}; KEY= -> {KEY: None} (remove)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LiveConfigError(f"{pair!r} is not KEY=VALUE; e.g. batch_size=16, or batch_size= to remove the key")
        changes[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return changes


def _find_app(details: dict, route: str) -> tuple[str, dict]:
    wanted = "/" + route.strip().strip("/")
    apps = details.get("applications") or {}
    for name, app in apps.items():
        if app.get("route_prefix") == wanted or name == wanted.lstrip("/"):
            return name, app
    routes = sorted(a.get("route_prefix") or n for n, a in apps.items())
    raise LiveConfigError(f"no application serves {wanted}; running routes: {', '.join(routes) or 'none'}")


def _deployment(app: dict) -> tuple[str, dict]:
    deployments = app.get("deployments") or {}
    if len(deployments) != 1:
        raise LiveConfigError(f"expected one deployment in the app, found {sorted(deployments)}")
    return next(iter(deployments.items()))


def current_user_config(details: dict, route: str) -> dict:
    _, app = _find_app(details, route)
    _, deployment = _deployment(app)
    return dict(deployment["deployment_config"].get("user_config") or {})


def deploy_request(details: dict, route: str, user_config: dict) -> dict:
    """The whole multi-app config to PUT: every running app as deployed (unchanged apps are left as
    they are), the route's deployment with the new user_config."""
    app_name, app = _find_app(details, route)
    deployment_name, _ = _deployment(app)
    applications = []
    for name, other in details["applications"].items():
        config = dict(other["deployed_app_config"])
        if name == app_name:
            overrides = [d for d in config.get("deployments") or [] if d.get("name") != deployment_name]
            mine = next((d for d in config.get("deployments") or [] if d.get("name") == deployment_name), {})
            config["deployments"] = overrides + [{**mine, "name": deployment_name, "user_config": user_config}]
        applications.append(config)
    http = details.get("http_options") or {}
    return {"proxy_location": details.get("proxy_location"),
            "http_options": {"host": http.get("host"), "port": http.get("port")},
            "applications": applications}


def apply(address: str, route: str, changes: dict, *, retune: bool = False, timeout_s: float = 600.0) -> dict:
    """Merge `changes` into the route's user_config (None removes a key), bump `retune` if asked,
    deploy, and wait until the app is RUNNING again. Returns the user_config now in effect."""
    from serve.replica.settings import parse_user_config

    client = _client(address)
    details = client.get_serve_details()
    user_config = current_user_config(details, route)
    for key, value in changes.items():
        if value is None:
            user_config.pop(key, None)
        else:
            user_config[key] = value
    if retune:
        previous = user_config.get("retune")
        user_config["retune"] = previous + 1 if isinstance(previous, int) and not isinstance(previous, bool) else 1
    try:
        parse_user_config(user_config)
    except ValueError as exc:
        raise LiveConfigError(str(exc)) from None
    client.deploy_applications(deploy_request(details, route, user_config))
    app_name, _ = _find_app(details, route)
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details()
        app = details["applications"].get(app_name) or {}
        applied = current_user_config(details, route) == user_config
        if applied and app.get("status") == "RUNNING":
            return user_config
        if app.get("status") == "DEPLOY_FAILED":
            raise LiveConfigError(f"{app_name} failed to apply {user_config}: {app.get('message')}")
        if time.monotonic() > deadline:
            raise LiveConfigError(f"{app_name} still {app.get('status')} after {timeout_s:.0f} s "
                                  f"(`serve status` says why); the change stays requested")
        time.sleep(1.0)


def _run(args, changes: dict, retune: bool) -> int:
    from ray.exceptions import AuthenticationError

    try:
        if not changes and not retune:
            print(json.dumps(current_user_config(_client(args.address).get_serve_details(), args.route), indent=1))
            return 0
        user_config = apply(args.address, args.route, changes, retune=retune, timeout_s=args.timeout)
    except AuthenticationError:
        print(f"autobatch {args.command}: error: {args.address} refused Ray's token; run this where the cluster "
              f"was started (token in ~/.ray/auth_token), or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH to its token",
              file=sys.stderr)
        return 2
    except (LiveConfigError, ValueError) as exc:
        print(f"autobatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - requests' connection errors: say where we looked
        if type(exc).__module__.startswith(("requests", "urllib3")):
            print(f"autobatch {args.command}: error: no Ray dashboard at {args.address} ({type(exc).__name__}); "
                  f"is the cluster running (`make serve`)? Give its dashboard with --address", file=sys.stderr)
            return 2
        raise
    print(f"{args.route}: user_config now {json.dumps(user_config)}; GET /{args.route.strip('/')}/tuning shows the result")
    return 0


def cmd_config(args) -> int:
    try:
        changes = parse_changes(args.changes)
    except LiveConfigError as exc:
        print(f"autobatch config: error: {exc}", file=sys.stderr)
        return 2
    return _run(args, changes, retune=False)


def cmd_retune(args) -> int:
    return _run(args, {}, retune=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("route", help="the model's route, e.g. resnet50")
    p.add_argument("--address", default=DEFAULT_DASHBOARD,
                   help=f"Ray dashboard (default {DEFAULT_DASHBOARD}, or $RAY_DASHBOARD_ADDRESS)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to run again")


def register(subparsers) -> None:
    config = subparsers.add_parser("config", help="show or change a running route's user_config (live, no restart)")
    _common(config)
    config.add_argument("changes", nargs="*", metavar="KEY=VALUE",
                        help="user_config keys to set (batch_size=16, latency_budget_ms=100); KEY= removes one")
    config.set_defaults(func=cmd_config, command="config")
    retune = subparsers.add_parser("retune", help="re-measure a running route now (bumps its user_config.retune)")
    _common(retune)
    retune.set_defaults(func=cmd_retune, command="retune")
