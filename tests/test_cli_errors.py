"""The CLI answers a bad path or argument with one line on stderr and a non-zero exit: never a
traceback, never a hang (issue 15, item 3). Each case runs `python -m autobatch` as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1",
           "AUTOBATCH_CACHE": str(cache_dir / "tuning.json"), "AUTOBATCH_CACHE_LOCK_TIMEOUT_S": "5"}
    env.pop("AUTOBATCH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "autobatch", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


CASES = {
    "cache-clear-proc": (["cache", "clear", "--cache", "/proc/x.json"], "/proc/x.json"),
    "show-proc": (["show", "--cache", "/proc/x.json"], "/proc/x.json"),
    "cache-clear-directory": (["cache", "clear", "--cache", "{tmp}"], "is a directory"),
    "show-directory": (["show", "--cache", "{tmp}"], "is a directory"),
    "tune-cache-directory": (["tune", "resnet50", "--cache", "{tmp}"], "is a directory"),
    "tune-cache-proc": (["tune", "resnet50", "--cache", "/proc/x.json"], "writable directory"),
    "memory-budget-inf": (["tune", "resnet50", "--memory-budget-mb", "inf"], "finite"),
    "memory-budget-huge": (["tune", "resnet50", "--memory-budget-mb", "1e30"], "exceeds the device"),
    "memory-budget-zero": (["tune", "resnet50", "--memory-budget-mb", "0"], "positive"),
    "latency-nan": (["tune", "resnet50", "--latency-budget-ms", "nan"], "finite"),
    "latency-negative": (["tune", "resnet50", "--latency-budget-ms", "-5"], "positive"),
    "latency-text": (["tune", "resnet50", "--latency-budget-ms", "fast"], "not a number"),
    "memory-fraction-over-one": (["tune", "resnet50", "--memory-fraction", "1.5"], "(0, 1]"),
    "margin-nan": (["tune", "resnet50", "--margin", "nan"], "finite"),
    "max-batch-zero": (["tune", "resnet50", "--max-batch", "0"], "at least 1"),
    "repeats-negative": (["tune", "resnet50", "--repeats", "-1"], "at least 1"),
    "unknown-model": (["tune", "nosuch"], "unknown model"),
    "missing-weights": (["tune", "resnet50", "--weights", "/nonexistent.pth"], "does not exist"),
    "unknown-command": (["frobnicate"], "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_a_nonzero_exit(case, tmp_path):
    args, expected = CASES[case]
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cache_dir=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("autobatch")
