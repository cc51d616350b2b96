"""The peers autobatch is compared with in tuning_vs_peers.py, each run the way its users run it:
Accelerate's `find_executable_batch_size` around the same forward, and Ultralytics' AutoBatch
(`check_train_batch_size`, what `yolo train batch=0.x` runs). tuning_vs_peers.py's docstring says
what each measures and how its answers are judged.

`BudgetGuard` makes "out of memory" mean "over the budget" for a method that only reacts to OOMs,
by the same meter every answer is judged by.
"""
from __future__ import annotations

import copy
import time

CPU_OOM_TEXT = "DefaultCPUAllocator: can't allocate memory"  # what accelerate recognises as a CPU OOM


class BudgetGuard:
    """Makes "out of memory" mean "over the budget" for a method that only reacts to OOMs.

    limit "meter" (default): a global forward hook reads autobatch's own meter after every module
    (CUDA: torch's reserved peak + memory outside torch; CPU: peak RSS) and raises the framework's
    OOM error once the peak passes the budget: the same definition of "fits" every method is judged
    by. limit "allocator" (CUDA only): torch.cuda.set_per_process_memory_fraction((budget - memory
    outside torch) / total), so the allocator raises real OOMs. Under such a cap the caching
    allocator frees its cached blocks and retries before it fails, so a batch can complete under the
    cap whose uncapped reserved peak (what a replica without a cap reserves, and what the final check
    measures) is over the budget: on an H200, YOLO11n-pose answers of 46 and 50 ran under a 1672 MiB
    cap and read 1818 and 1926 MiB uncapped."""

    def __init__(self, kind: str, meter, budget: int, limit: str = "meter"):
        if limit not in ("meter", "allocator"):
            raise ValueError(f"unknown limit {limit!r}; use meter or allocator")
        self.kind, self.meter, self.budget = kind, meter, budget
        self.limit = limit if kind == "cuda" else "meter"
        self.emulated = 0
        self._handle = None

    def __enter__(self):
        import torch

        if self.limit == "allocator":
            total = torch.cuda.get_device_properties(0).total_memory
            allowed = self.budget - self.meter.outside_torch_bytes
            torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, allowed / total)), 0)
        else:
            def check(module, args, output):
                self.check()

            self._handle = torch.nn.modules.module.register_module_forward_hook(check)
        return self

    def start_attempt(self) -> None:
        self.meter.cleanup()
        self.meter.reset_peak()

    def check(self) -> None:
        if self.limit != "meter":
            return
        peak = self.meter.peak_bytes()
        if peak > self.budget:
            self.emulated += 1
            # texts accelerate's should_reduce_batch_size recognises as an OOM
            what = "CUDA out of memory." if self.kind == "cuda" else CPU_OOM_TEXT
            raise RuntimeError(f"{what} (emulated: peak {peak / 2**20:.0f} MiB passed the {self.budget / 2**20:.0f} MiB budget)")

    def __exit__(self, *exc):
        import torch

        if self._handle is not None:
            self._handle.remove()
        if self.limit == "allocator":
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
        self.meter.cleanup()
        return False


def run_accelerate(spec, meter, kind: str, budget: int, start: int, repeats: int, limit: str = "meter") -> dict:
    try:
        from accelerate.utils import find_executable_batch_size
    except ImportError as exc:
        return {"found": None, "note": f"n/a (accelerate not importable: {exc})"}
    attempts: list[int] = []
    guard = BudgetGuard(kind, meter, budget, limit)

    @find_executable_batch_size(starting_batch_size=start)
    def fit(batch_size):
        attempts.append(batch_size)
        guard.start_attempt()
        batch = spec.example_batch(batch_size)
        for _ in range(1 + repeats):
            spec.predict(batch)
        guard.check()
        return batch_size

    started = time.perf_counter()
    found, failure = None, None
    with guard:
        try:
            found = fit()
        except Exception as exc:  # noqa: BLE001 - an error accelerate does not treat as OOM ends its search
            failure = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    ooms = max(0, len(attempts) - (1 if found else 0))
    real = ooms - guard.emulated
    if guard.limit == "allocator":
        note = f"{ooms} real allocator OOMs under set_per_process_memory_fraction"
    else:
        note = f"{guard.emulated} emulated OOMs (forward hook on the meter)" + (f" + {real} real" if real else "")
    return {"found": found, "probes": len(attempts), "ooms": ooms, "emulated_ooms": guard.emulated,
            "seconds": time.perf_counter() - started, "note": failure or note}


def run_ultralytics(spec, meter, kind: str, budget: int) -> dict:
    if spec.name != "yolo11n_pose":
        return {"found": None, "note": "n/a (YOLO models only)"}
    try:
        import torch
        import ultralytics.utils.autobatch as ub
    except ImportError as exc:
        return {"found": None, "note": f"n/a (ultralytics not importable: {exc})"}
    if kind != "cuda":
        # It returns its default batch without measuring anything on a CPU; show that, not a number.
        model = copy.deepcopy(spec.model).float()
        default = ub.check_train_batch_size(model, imgsz=spec.imgsz, amp=False, batch=0.5)
        return {"found": None, "note": f"n/a (CUDA only; on a CPU it returns its default batch {default} unmeasured)",
                "returned": default}
    profiled = {"sizes": [], "failed": 0}
    original = ub.profile_ops

    def counting_profile(inputs, ops, *args, **kwargs):
        results = original(inputs, ops, *args, **kwargs)
        profiled["sizes"] = [int(x.shape[0]) for x in inputs]
        profiled["failed"] = sum(r is None for r in results)
        return results

    meter.cleanup()
    free, _total = torch.cuda.mem_get_info(0)
    available = torch.cuda.memory_reserved(0) + free  # ultralytics' "available" (f)
    fraction = (budget - meter.outside_torch_bytes) / available
    note = f"fraction {fraction:.3f} of {available / 2**30:.1f} GiB available; training-step profile"
    if fraction >= 1:
        fraction, note = 0.999, note + " (clamped to 0.999: the budget is over what is free)"
    model = copy.deepcopy(spec.model).float()
    for p in model.parameters():
        p.requires_grad_(True)  # as in training, which is what it profiles
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # it refuses to measure otherwise
    ub.profile_ops = counting_profile
    started = time.perf_counter()
    try:
        found = int(ub.check_train_batch_size(model, imgsz=spec.imgsz, amp=True, batch=fraction))
    except Exception as exc:  # noqa: BLE001
        found, note = None, f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        ub.profile_ops = original
        torch.backends.cudnn.benchmark = benchmark_flag
        del model
        meter.cleanup()
    return {"found": found, "probes": len(profiled["sizes"]), "ooms": profiled["failed"],
            "seconds": time.perf_counter() - started, "note": note}
