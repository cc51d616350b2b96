"""When a replica warms its batch sizes: the first ones before traffic, the rest between batches.

serve/replica/warmup.py's SizeWarmer knows which sizes are warm and runs one; this decides when, so that
no request waits out a size's first run and no batch waits behind more than one size's warm-up
(each runs under the model lock, DeviceLocks.exclusive). A new call (reconfigure) replaces a
warm-up still running. The report is what GET /tuning shows under `warm_sizes`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .warmup import SizeWarmer

log = logging.getLogger("ray.serve")


def run_example_batch(spec, meter, n: int) -> None:
    """One run of a batch of `n` example samples, waited for on the device: what warms size `n`."""
    spec.predict(spec.example_batch(n))
    meter.synchronize()


class WarmUpSchedule:
    def __init__(self, warmer: SizeWarmer, locks, executor, label: Callable[[], str],
                 set_serving_batch: Callable[[int], dict | None] | None = None):
        self.warmer, self._locks, self._executor, self._label = warmer, locks, executor, label
        self.report: dict | None = None
        self._task: asyncio.Task | None = None  # sizes warmed between served batches
        # the spec's own preparation for a served size (ModelSpec.set_serving_batch: CUDA graphs),
        # before any size is warmed, so that the warm-up runs what serving will run
        self._set_serving_batch = set_serving_batch
        self.graphs = None  # what it reported (a report with to_dict(), or a dict), kept live for GET /tuning

    async def before_traffic(self, size: int, fixed_sample_shape: bool) -> None:
        """The spec's preparation for the served size, then the sizes a batch queue forms first; the
        rest in the background."""
        if self._set_serving_batch is not None:
            if self._task is not None:
                self._task.cancel()
            async with self._locks.exclusive():
                try:
                    self.graphs = await asyncio.get_running_loop().run_in_executor(self._executor, self._set_serving_batch, size)
                except Exception as exc:  # noqa: BLE001 - the eager forward still serves; say why it is eager
                    log.exception("autobatch: %s: preparing batch %d for serving failed", self._label(), size)
                    self.graphs = {"state": "failed", "why": f"{type(exc).__name__}: {exc}",
                                   "summary": f"preparing batch {size} for serving failed ({type(exc).__name__}: {exc}); "
                                              "the eager forward serves"}
            if self.graphs:
                log.info("autobatch: %s: %s", self._label(), self.graphs_report()["summary"])
        if not fixed_sample_shape or self.warmer.budget_s <= 0:
            if self.report is None:
                why = ("its batch shapes also follow the input (prompt lengths)" if not fixed_sample_shape
                       else "warm_sizes_budget_s is 0")
                self.report = {"skipped": why}
                log.info("autobatch: %s: batch sizes not warmed before traffic: %s", self._label(), why)
            return
        if self._task is not None:
            self._task.cancel()
        loop = asyncio.get_running_loop()
        async with self._locks.exclusive():
            report = await loop.run_in_executor(self._executor, self.warmer.warm, size, self.warmer.first_sizes(size))
        report.before_traffic = list(report.warmed)
        report.background = "running" if self.warmer.cold_sizes(size) and not report.left_cold else None
        self.report = report.to_dict()
        log.info("autobatch: %s: %s", self._label(), report.describe())
        if report.background:
            self._task = loop.create_task(self._between_batches(report))

    def graphs_report(self) -> dict | None:
        """The spec's serving preparation as GET /tuning shows it, with its counts as of now."""
        return self.graphs.to_dict() if hasattr(self.graphs, "to_dict") else self.graphs

    async def _between_batches(self, report) -> None:
        """One cold size at a time under the model lock, so a batch waits at most one size's run."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        size = report.max_batch_size
        for cold in self.warmer.cold_sizes(size):
            if time.perf_counter() - started >= self.warmer.budget_s:
                report.left_cold = self.warmer.cold_sizes(size)
                report.stopped_by = f"the {self.warmer.budget_s:g} s warm-up budget ran out"
                break
            async with self._locks.exclusive():
                part = await loop.run_in_executor(self._executor, self.warmer.warm, size, [cold])
            report.absorb(part)
            self.report = report.to_dict()
            if part.left_cold:
                break
        report.already_warm = [s for s in self.warmer.warm_sizes(size) if s not in report.warmed]
        report.background = "done"
        self.report = report.to_dict()
        log.info("autobatch: %s: %s", self._label(), report.describe())
