"""What one replica's batches did since it started, for GET /tuning's `stats`.

Prometheus has the same counts (serve/replica/metrics.py), summed over replicas and sampled; this is the
replica's own exact record, which the tests and the benchmarks read per replica.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ServingReport:
    """The batch settings a replica applied last, and why: GET /tuning's `serving` (less what the
    replica adds as of the moment: the batcher, the admission, the autoscaling)."""

    max_batch_size: int
    batch_wait_timeout_s: float
    pinned_batch_size: int | None
    oom_cap: int | None  # the max batch an out-of-memory while serving taught
    max_ongoing_requests: int | None
    notes: tuple[str, ...]  # why the size or wait differ from the tuning's (serve/replica/settings.py)
    overlap: bool
    tuned_batch_wait_timeout_s: float
    faults: dict | None

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes)}


@dataclass
class ServingStats:
    samples_served: int = 0
    serving_ooms: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # batch size -> batches formed of that size
    errors: Counter = field(default_factory=Counter)  # HTTP status (str) -> requests answered with it
    shed: Counter = field(default_factory=Counter)  # reason (serve/replica/admission.py SHED_REASONS) -> requests refused or dropped

    def batch_formed(self, size: int) -> None:
        self.batch_sizes[size] += 1

    @property
    def batches(self) -> int:
        return sum(self.batch_sizes.values())

    @property
    def largest_batch(self) -> int:
        return max(self.batch_sizes, default=0)

    def to_dict(self, batch_item_retries: int, overlapped_batches: int = 0) -> dict:
        return {
            "batches": self.batches,
            "samples_served": self.samples_served,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "largest_batch": self.largest_batch,
            "serving_ooms": self.serving_ooms,
            "batch_item_retries": batch_item_retries,
            # batches put on the device while the one before them computed (batch_runner.py)
            "overlapped_batches": overlapped_batches,
            "errors": dict(self.errors),
            "shed": dict(self.shed),
        }
