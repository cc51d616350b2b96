"""`Tuning`: what one tuning decided, typed, frozen, and the one shape every reader uses.

The optimizer builds it, the cache stores it (`to_dict` / `from_dict`), `autobatch tune --json` and
the serve app's `GET /<route>/tuning` print it, and the replica hands `batch_size` and
`batch_wait_timeout_s` from it to `@serve.batch`. Readers use attributes, never string keys, so a
typo fails at import or type-check time instead of in a running replica.

`from_dict` trusts nothing: a field of the wrong type, a NaN or a missing field raises
`TuningFormatError`, which the cache treats as "no entry" (re-tune), never as a crash.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .probe import OUTCOMES, ProbeResult

# Where a Tuning came from: measured in this process, or read from the tuning cache.
MEASURED = "miss"
CACHED = "hit"


class TuningFormatError(ValueError):
    """A stored tuning that is not one this version can trust (wrong type, missing field, NaN)."""


@dataclass(frozen=True)
class DeviceInfo:
    """The device a tuning was measured on, as a person reads it."""

    kind: str  # cpu | cuda | sim
    name: str
    total_memory_bytes: int
    label: str

    @classmethod
    def of(cls, fingerprint) -> "DeviceInfo":
        """From an optimizer.devices.DeviceFingerprint (the cache key's fuller record of the device)."""
        return cls(fingerprint.kind, fingerprint.name, fingerprint.total_memory_bytes, fingerprint.label)


@dataclass(frozen=True)
class MemoryFit:
    """Peak memory ~ intercept_bytes + per_sample_bytes * batch, fitted to the probes."""

    intercept_bytes: float
    per_sample_bytes: float


@dataclass(frozen=True)
class Tuning:
    """The max safe batch, the batch to serve and its wait, with every probe that led to them."""

    model: str
    weights: str
    device: DeviceInfo
    dtype: str
    memory_budget_bytes: int
    latency_budget_s: float | None  # per batch; None only from tune_on with no latency bound
    max_batch: int  # the largest size the search was allowed to try
    max_safe_batch: int  # the largest size measured within both budgets
    batch_size: int  # the size to serve (the throughput knee within the latency budget)
    batch_wait_timeout_s: float  # how long a partial batch waits for more requests
    serve_latency_s: float  # one batch of `batch_size`, as measured
    serve_throughput: float  # samples/s at `batch_size`
    batch1_throughput: float | None
    stopped_by: str  # what bounded the max safe batch (memory, latency, max_batch, oom...)
    decision: str  # the whole decision in one sentence, as logged
    notes: tuple[str, ...]
    base_bytes: int  # device memory with the model loaded and no batch
    memory_fit: MemoryFit | None
    probes: tuple[ProbeResult, ...]
    search_probe_count: int  # probes the max-safe-batch search ran (the rest sharpened the knee)
    oom_events: int
    predicted_skips: int
    tuning_s: float
    tuned_at: str
    cache: str = MEASURED  # MEASURED ("miss") or CACHED ("hit"): where this answer came from
    key: str = ""  # the tuning cache key

    @property
    def probe_count(self) -> int:
        """Probes that really ran (a size predicted over budget is recorded but not run)."""
        return sum(p.ran for p in self.probes)

    @property
    def from_cache(self) -> bool:
        return self.cache == CACHED

    def ok_sizes(self) -> list[int]:
        """The batch sizes this tuning ran within both budgets (they are warm in the process that measured)."""
        return [p.batch_size for p in self.probes if p.ok]

    def with_source(self, cache: str, key: str) -> "Tuning":
        return replace(self, cache=cache, key=key)

    def to_dict(self) -> dict:
        """JSON-able; `probe_count` and `from_cache` are included for readers of the JSON."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["probes"] = [p.to_dict() for p in self.probes]
        out["probe_count"] = self.probe_count
        out["from_cache"] = self.from_cache
        return out

    def stored(self) -> dict:
        """What the cache keeps: the measurement, not where this copy came from."""
        out = self.to_dict()
        for name in ("cache", "key", "probe_count", "from_cache"):
            out.pop(name, None)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Tuning":
        if not isinstance(data, dict):
            raise TuningFormatError(f"a tuning must be a JSON object, got {type(data).__name__}")
        try:
            device = data["device"]
            if not isinstance(device, dict):
                raise TuningFormatError("device must be an object")
            fit = data["memory_fit"]
            probes = data["probes"]
            notes = data["notes"]
            if not isinstance(probes, list) or not isinstance(notes, list):
                raise TuningFormatError("probes and notes must be lists")
            if not all(isinstance(n, str) for n in notes):
                raise TuningFormatError(f"notes must be strings, got {notes!r}")
            values = {
                "model": _typed(data, "model", str),
                "weights": _typed(data, "weights", str),
                "device": DeviceInfo(kind=_typed(device, "kind", str), name=_typed(device, "name", str),
                                     total_memory_bytes=_typed(device, "total_memory_bytes", int),
                                     label=_typed(device, "label", str)),
                "dtype": _typed(data, "dtype", str),
                "memory_budget_bytes": _typed(data, "memory_budget_bytes", int),
                "latency_budget_s": _typed(data, "latency_budget_s", float, optional=True),
                "max_batch": _typed(data, "max_batch", int),
                "max_safe_batch": _typed(data, "max_safe_batch", int),
                "batch_size": _typed(data, "batch_size", int),
                "batch_wait_timeout_s": _typed(data, "batch_wait_timeout_s", float),
                "serve_latency_s": _typed(data, "serve_latency_s", float),
                "serve_throughput": _typed(data, "serve_throughput", float),
                "batch1_throughput": _typed(data, "batch1_throughput", float, optional=True),
                "stopped_by": _typed(data, "stopped_by", str),
                "decision": _typed(data, "decision", str),
                "notes": tuple(notes),
                "base_bytes": _typed(data, "base_bytes", int),
                "memory_fit": None if fit is None else MemoryFit(_typed(fit, "intercept_bytes", float),
                                                                 _typed(fit, "per_sample_bytes", float)),
                "probes": tuple(_probe(p) for p in probes),
                "search_probe_count": _typed(data, "search_probe_count", int),
                "oom_events": _typed(data, "oom_events", int),
                "predicted_skips": _typed(data, "predicted_skips", int),
                "tuning_s": _typed(data, "tuning_s", float),
                "tuned_at": _typed(data, "tuned_at", str),
                "cache": data.get("cache", MEASURED) if data.get("cache") in (MEASURED, CACHED) else MEASURED,
                "key": data.get("key", "") if isinstance(data.get("key", ""), str) else "",
            }
        except KeyError as exc:
            raise TuningFormatError(f"field {exc.args[0]!r} is missing") from None
        except (TypeError, AttributeError) as exc:
            raise TuningFormatError(f"malformed tuning ({exc})") from None
        return cls(**values)


TUNING_FIELDS = tuple(f.name for f in fields(Tuning))


def _typed(data: Any, name: str, kind: type, optional: bool = False):
    """data[name] as `kind`, refusing what JSON can smuggle in: bools as numbers, NaN/inf, 7.5 as an int."""
    if not isinstance(data, dict):
        raise TuningFormatError(f"expected an object holding {name!r}")
    value = data[name]
    if value is None and optional:
        return None
    if kind is str:
        if not isinstance(value, str):
            raise TuningFormatError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TuningFormatError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TuningFormatError(f"{name} must be finite, got {value!r}")
    if kind is int:
        if int(value) != value:
            raise TuningFormatError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _probe(data: Any) -> ProbeResult:
    if not isinstance(data, dict):
        raise TuningFormatError(f"a probe must be an object, got {data!r}")
    outcome = _typed(data, "outcome", str)
    if outcome not in OUTCOMES:
        raise TuningFormatError(f"probe outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    return ProbeResult(
        batch_size=_typed(data, "batch_size", int),
        outcome=outcome,
        peak_bytes=_typed(data, "peak_bytes", int, optional=True),
        latency_s=_typed(data, "latency_s", float, optional=True),
        throughput=_typed(data, "throughput", float, optional=True),
        predicted_bytes=_typed(data, "predicted_bytes", int, optional=True),
        repeats=_typed(data, "repeats", int),
        # absent from tunings stored before batches could overlap: those never did
        period_s=_typed(data, "period_s", float, optional=True) if "period_s" in data else None,
    )


__all__ = ["Tuning", "DeviceInfo", "MemoryFit", "TuningFormatError", "MEASURED", "CACHED", "TUNING_FIELDS"]
