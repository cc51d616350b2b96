"""The warm-up mechanism on its own: which sizes it runs, in what order, and where it stops."""
from __future__ import annotations

from serve.replica.warmup import SizeWarmer, size_ranges


class FakeClock:
    """Each batch of n takes n seconds of this clock, so a budget stop is exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recording_warmer(budget_s=1e9, fail_at=None):
    clock, ran = FakeClock(), []

    def run_batch(n):
        if n == fail_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ran.append(n)
        clock.now += n

    return SizeWarmer(run_batch, budget_s=budget_s, clock=clock), ran


def test_runs_the_max_size_first_then_every_cold_size_from_one_up():
    warmer, ran = recording_warmer()
    warmer.mark_warm([1, 2, 4])  # what the tuning probed
    report = warmer.warm(6)
    assert ran == [6, 3, 5]
    assert report.warmed == [6, 3, 5] and report.already_warm == [1, 2, 4] and report.left_cold == []
    assert report.first_run_s == {6: 6, 3: 3, 5: 5} and report.seconds == 14
    assert "3, 5-6" in report.describe() and "already run: 1-2, 4" in report.describe()
    assert "first runs 3000-6000 ms, slowest at batch 6" in report.describe()
    assert warmer.warm(6).warmed == [] and ran == [6, 3, 5]  # the second call finds nothing cold
    assert "nothing to warm" in warmer.warm(6).describe()


def test_a_raised_max_warms_only_the_new_sizes():
    warmer, ran = recording_warmer()
    warmer.warm(3)
    warmer.mark_warm([5, 4])  # served batches
    report = warmer.warm(6)
    assert ran == [3, 1, 2, 6] and report.warmed == [6]
    assert "warmed batch sizes 6 in 6.0 s" in report.describe() and "(first run 6000 ms)" in report.describe()


def test_the_time_budget_leaves_the_middle_sizes_cold_and_says_why():
    warmer, ran = recording_warmer(budget_s=10)
    report = warmer.warm(8)
    assert ran == [8, 1, 2]  # 8 s, 9 s, then the third run crosses 10 s and the next is not started
    assert report.left_cold == [3, 4, 5, 6, 7] and "10 s warm-up budget ran out" in report.stopped_by
    assert "left cold: 3-7" in report.describe()


def test_a_failing_size_stops_the_warm_up_without_raising():
    warmer, ran = recording_warmer(fail_at=2)
    report = warmer.warm(4)
    assert ran == [4, 1] and report.left_cold == [2, 3]
    assert "batch 2 raised RuntimeError: CUDA out of memory" in report.stopped_by
    assert 2 in warmer.cold_sizes(4)  # the size that failed is not counted warm


def test_size_ranges_reads_well():
    assert size_ranges([]) == "none"
    assert size_ranges([5]) == "5"
    assert size_ranges([3, 1, 2, 5, 9, 10, 10]) == "1-3, 5, 9-10"


def test_a_failing_size_frees_memory_once_and_a_budget_stop_does_not():
    cleanups = []
    clock = FakeClock()

    def run_batch(n):
        clock.now += n
        if n == 2:
            raise RuntimeError("CUDA out of memory")

    SizeWarmer(run_batch, clock=clock, on_error=lambda: cleanups.append("cleanup")).warm(4)
    assert cleanups == ["cleanup"]
    SizeWarmer(run_batch, budget_s=1, clock=clock, on_error=lambda: cleanups.append("again")).warm(4)
    assert cleanups == ["cleanup"]  # 4 ran, then the budget stopped it before 2


def test_before_traffic_only_the_sizes_a_queue_forms_first_then_the_rest_one_at_a_time():
    warmer, ran = recording_warmer()
    warmer.mark_warm([2])  # what the tuning probed
    first = warmer.warm(6, warmer.first_sizes(6))
    assert ran == [6, 1] and first.warmed == [6, 1] and first.already_warm == [2]
    first.before_traffic, first.background = list(first.warmed), "running"
    assert "warmed batch sizes 1, 6 before traffic" in first.describe()
    warmer.mark_warm([4])  # a batch of 4 was served meanwhile: it is not run again
    for size in warmer.cold_sizes(6):
        first.absorb(warmer.warm(6, [size]))
    assert ran == [6, 1, 3, 5] and first.warmed == [6, 1, 3, 5] and first.in_background == [3, 5]
    first.background = "done"
    assert "(3, 5 between served batches)" in first.describe() and warmer.cold_sizes(6) == []


def test_first_sizes_of_a_max_batch_of_one_is_one_size():
    assert SizeWarmer.first_sizes(1) == [1] and SizeWarmer.first_sizes(8) == [8, 1]
