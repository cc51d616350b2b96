"""Fault injection for tests and drills: a deployment's user_config may name it only where the
replica's environment sets AUTOBATCH_TEST_FAULTS=1 (the tests set it through the cluster's
runtime_env env_vars); anywhere else a `faults` key is an error, so a production config cannot
inject failures by mistake.

    user_config: {"faults": {"oom_above": 2, "poison_header": "x-autobatch-poison"}}

- oom_above: N   predict raises an out-of-memory error (a MemoryError, which every meter counts as an
                 OOM) for any batch larger than N, so the replica's real split-and-retry path runs.
- poison_header: a request carrying this header (any value) decodes normally but makes predict
                 raise for any batch that contains it, so the real per-item retry path runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from optimizer.devices import SimulatedOutOfMemory

KNOWN = ("oom_above", "poison_header")
TEST_SWITCH = "AUTOBATCH_TEST_FAULTS"  # "1" in a replica's environment: user_config may inject faults


def faults_allowed() -> bool:
    return os.environ.get(TEST_SWITCH) == "1"


class InjectedFault(ValueError):
    """What a poisoned item raises inside predict."""


@dataclass(frozen=True)
class Faults:
    oom_above: int | None = None
    poison_header: str | None = None

    @classmethod
    def from_config(cls, config: dict | None) -> "Faults":
        if not config:
            return cls()
        if not faults_allowed():
            raise ValueError(f"user_config 'faults' injects failures for tests and is accepted only where the "
                             f"replica's environment sets {TEST_SWITCH}=1 (e.g. runtime_env env_vars); "
                             f"remove 'faults' from this user_config")
        if not isinstance(config, dict):
            raise ValueError(f"user_config 'faults' must be a mapping, got {config!r}")
        unknown = sorted(set(config) - set(KNOWN))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(KNOWN)}")
        oom_above = config.get("oom_above")
        if oom_above is not None and (not isinstance(oom_above, int) or oom_above < 0):
            raise ValueError(f"faults.oom_above must be a whole number >= 0, got {oom_above!r}")
        header = config.get("poison_header")
        return cls(oom_above=oom_above, poison_header=str(header).lower() if header else None)

    @property
    def active(self) -> bool:
        return self.oom_above is not None or self.poison_header is not None

    def describe(self) -> dict | None:
        """The active faults (None when off), for GET /tuning."""
        if not self.active:
            return None
        return {k: v for k, v in (("oom_above", self.oom_above), ("poison_header", self.poison_header)) if v is not None}

    def is_poisoned(self, headers) -> bool:
        return bool(self.poison_header) and self.poison_header in headers

    def before_predict(self, items: list) -> None:
        """Called in the worker thread with the batch about to run; raises the injected faults."""
        if self.oom_above is not None and len(items) > self.oom_above:
            raise SimulatedOutOfMemory(
                f"injected out of memory: batch of {len(items)} is over faults.oom_above={self.oom_above}"
            )
        if any(getattr(item, "poisoned", False) for item in items):
            raise InjectedFault("injected fault: a poisoned item is in this batch")
