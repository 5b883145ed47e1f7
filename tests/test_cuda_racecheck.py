"""Racecheck of the CUDA kernels without a GPU: tests/cuda_emu/racecheck.py runs a small case of
each kernel in csrc/cuda under the CUDA emulation built with ThreadSanitizer, whose fibers are
ordered only by what orders a GPU's threads (__syncthreads, __syncwarp, the launch's start and end).

On a GPU machine the real kernels are checked by compute-sanitizer's racecheck instead
(benchmarks/gpu_check.sh), so these tests skip there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import racecheck

pytestmark = [
    pytest.mark.skipif(racecheck.tsan_runtime() is None, reason="the C++ compiler has no ThreadSanitizer runtime"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, compute-sanitizer racecheck checks the kernels"),
]


def _racecheck(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(racecheck.__file__)), "--logs", str(tmp_path), *args],
        check=False, capture_output=True, text=True, timeout=1800,
    )


def test_every_kernel_runs_without_a_reported_race(tmp_path):
    result = _racecheck(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "racecheck: 0 race(s) reported" in result.stdout
    launched = next(line for line in result.stdout.splitlines() if line.startswith("launches per kernel: "))
    for kernel in racecheck.kdfast_kernels():
        assert f"{kernel} " in launched, f"{kernel} was not launched: {launched}"
    assert len(racecheck.kdfast_kernels()) >= 19  # (the parse of csrc/cuda finds them all)


def test_the_check_reports_the_emulator_self_test_races(tmp_path):
    """The two racy self-test kernels (a word written by every thread between two barriers; lane 0
    reading the other lanes' stored accumulator without a __syncwarp) are reported: the check can fail."""
    result = _racecheck(tmp_path, "--selftest")
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    assert "self-test races found: racy_write_kernel yes, wmma_product_kernel yes" in result.stdout
    assert re.search(r"data race \S*tests/cuda_emu/selftest\.cu:\d+ in racy_write_kernel", result.stdout)
