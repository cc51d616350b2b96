"""Memory budgets that add up: replicas sharing a machine's RAM (CPU) or a card (GPU) divide it.

A replica tunes within `memory_fraction` of its device. Given in an app's args, that is the share;
left out, it is `SHARE_FRACTION` of the replica's part of the device as Ray places it: its
`num_gpus` of the card on a GPU, its `num_cpus` of the node's CPUs on a CPU. Ray never places more
than a node's CPUs (or a card's GPU) on it, so default shares add up to at most SHARE_FRACTION;
explicit ones are checked here, for one config's applications together (`check_memory_shares`,
run by `make serve` before it starts anything and by the tests on serve_config.yaml). Pure: no Ray.
"""
from __future__ import annotations

SHARE_FRACTION = 0.9  # of a replica's share: the rest is the OS's, Ray's and the allocator's slack
MAX_TOTAL_FRACTION = 0.9  # the apps of one config together, of one device


class BudgetError(ValueError):
    """The apps of a config would budget more memory than the device has; the message says what to change."""


def default_memory_fraction(kind: str, cpu_share: float | None, gpu_share: float) -> float | None:
    """The fraction of the whole device a replica tunes within when its app gives none; None: no
    share is known (a CPU replica with num_cpus 0), the optimizer's own default."""
    if kind == "cuda":  # a whole card: the optimizer's default, which is the same fraction
        return SHARE_FRACTION * gpu_share if gpu_share < 1 else None
    if kind == "cpu" and cpu_share:
        return SHARE_FRACTION * min(cpu_share, 1.0)
    return None


def app_replicas(args: dict, kind: str, devices: int = 1) -> int:
    """How many replicas of an app one config can run at most, as serve/app.py places them: the
    fixed num_replicas; else, on GPUs, one per card (replicas_per_gpu k: k per card); else 1. Under
    autoscaling (num_replicas auto, or an autoscaling_config) its max_replicas, which defaults to the same."""
    per_card = int(args.get("replicas_per_gpu") or 1) if kind == "cuda" else 1
    default = max(1, int(devices)) * per_card if kind == "cuda" else 1
    scaling = args.get("autoscaling_config")
    if args.get("num_replicas") == "auto" or scaling is not None:
        return max(int((scaling or {}).get("max_replicas", default)), int((scaling or {}).get("min_replicas", 1)))
    return int(args["num_replicas"]) if args.get("num_replicas") is not None else default


def app_fractions(applications: list[dict], kind: str, node_cpus: float, devices: int = 1) -> dict[str, float]:
    """Each app's memory fraction of one device, times its replicas at most (0 for an app that serves
    no model), over `devices` devices of `kind`."""
    out = {}
    for app in applications:
        args = app.get("args") or {}
        if "model" not in args:  # a router (serve.oip.router) holds no model and tunes nothing
            out[str(app.get("name"))] = 0.0
            continue
        replicas = app_replicas(args, kind, devices)
        gpu_share = float(args.get("num_gpus", 1.0))
        per_gpu = args.get("replicas_per_gpu")
        if kind == "cuda" and per_gpu:  # serve/app.py's placement: k replicas of 1/k of a card each
            gpu_share = 1.0 / int(per_gpu)
        fraction = args.get("memory_fraction")
        if fraction is None:
            cpu_share = float(args.get("num_cpus", 1.0)) / node_cpus if node_cpus else None
            fraction = default_memory_fraction(kind, cpu_share, gpu_share)
        if fraction is None and kind == "cuda":
            fraction = SHARE_FRACTION
        if fraction is None:
            raise BudgetError(f"app {app.get('name')!r} has num_cpus 0 and no memory_fraction: its budget is not "
                              f"a share of the machine; give it a memory_fraction")
        out[str(app.get("name"))] = float(fraction) * replicas
    return out


def check_memory_shares(applications: list[dict], kind: str, node_cpus: float, devices: int = 1) -> dict[str, float]:
    """Raise BudgetError unless the apps' fractions (x replicas) sum to at most MAX_TOTAL_FRACTION of
    `devices` devices of `kind` (the node's RAM for cpu, its cards for cuda); else the fractions."""
    fractions = app_fractions(applications, kind, node_cpus, devices)
    total = sum(fractions.values())
    if total > MAX_TOTAL_FRACTION * devices + 1e-9:
        parts = ", ".join(f"{name} {f:.2f}" for name, f in fractions.items())
        what = "the machine's RAM" if kind == "cpu" else f"{devices} GPU(s)"
        raise BudgetError(f"the apps' memory budgets add up to {total:.2f} of {what} ({parts}); together they may use "
                          f"at most {MAX_TOTAL_FRACTION * devices:g}: lower their memory_fraction (x num_replicas, "
                          f"or x max_replicas under autoscaling)")
    return fractions
