"""A replica's start-up, phase by phase: where the seconds before its first answer went.

A cached start, with no tuning at all, can still spend tens of seconds before the first answer
(docs/benchmarks.md §8, §13); without this nothing says where. Each phase is timed at its edges (time.time(), wall clock, so a benchmark can lay the
phases of every replica and its own launch on one axis; process start from psutil's create_time):

  worker        the process's start -> this package's modules began importing (Ray's worker start,
                the deployment's deserialisation)
  imports       serve/optimizer/deployments modules and the model family's libraries (torch, ...)
  constructed   imports done -> the replica's constructor (Ray's actor set-up between them)
  spec          the model family's spec (its module)
  libraries     the family's libraries (torch, torchvision, transformers, ...), which the families
                import lazily: without this phase they would hide in the device's or the load's
  device        the device and its memory meter (CUDA's context, NVML)
  model_load    the weights (or synthetic weights of the architecture) onto the device
  tuning        the cache read, or the tuning on a miss (`cache` says which)
  warm_up       the batch sizes run before traffic (serve/replica/warmup.py); the replica is ready then
  first_request ready -> the first batch this replica served ended: Ray marking the replica running,
                the router finding it, the client's next try, and that batch itself

GET /<route>/tuning shows it as `startup`; each phase is logged as it ends.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("ray.serve")

PHASES = ("worker", "imports", "constructed", "spec", "libraries", "device", "model_load", "tuning", "warm_up", "first_request")


def import_libraries(distributions) -> str:
    """Import a spec's `library_packages` (distribution names: opencv-python is imported by the
    family itself); returns the modules imported, for the phase's note."""
    import importlib

    done = []
    for name in distributions:
        try:
            importlib.import_module(name.replace("-", "_"))
            done.append(name)
        except ImportError:
            continue
    return ", ".join(done)


def process_started_at() -> float | None:
    """This process's start (seconds since the epoch), from psutil; None without it."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: the phase is left out
        return None


class StartupTimeline:
    """Phase edges in wall-clock seconds; `phase(name)` ends a phase now, the next begins there."""

    def __init__(self, model: str, imports_began_at: float, imports_ended_at: float):
        self.model = model
        self.process_started_at = process_started_at()
        self.edges: list[tuple[str, float]] = []  # (phase, when it ended)
        self.notes: dict[str, str] = {}
        if self.process_started_at is not None:
            self.edges.append(("worker", imports_began_at))
        self.began_at = self.process_started_at if self.process_started_at is not None else imports_began_at
        self.edges.append(("imports", imports_ended_at))

    def phase(self, name: str, note: str | None = None) -> float:
        """End phase `name` now; returns its seconds."""
        now = time.time()
        previous = self.edges[-1][1]
        self.edges.append((name, now))
        if note:
            self.notes[name] = note
        seconds = now - previous
        log.info("autobatch: %s: start-up %s %.1f s%s", self.model, name, seconds, f" ({note})" if note else "")
        if name == "warm_up":
            log.info("autobatch: %s: ready %.1f s after its process started: %s", self.model,
                     now - self.began_at, self.describe())
        return seconds

    def done(self, name: str) -> bool:
        return any(phase == name for phase, _ in self.edges)

    def seconds(self) -> dict[str, float]:
        out, previous = {}, self.began_at
        for name, ended in self.edges:
            out[name] = round(ended - previous, 3)
            previous = ended
        return out

    def describe(self) -> str:
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds().items())

    def to_dict(self) -> dict:
        ends = dict(self.edges)
        return {
            "process_started_at": self.process_started_at,
            "began_at": self.began_at,
            "seconds": self.seconds(),
            "ended_at": {name: round(t, 3) for name, t in ends.items()},
            "ready_after_s": round(ends["warm_up"] - self.began_at, 3) if "warm_up" in ends else None,
            "first_answer_after_s": round(ends["first_request"] - self.began_at, 3) if "first_request" in ends else None,
            "notes": dict(self.notes),
            "phases": [p for p in PHASES if p in ends],
        }
