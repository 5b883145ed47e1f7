"""bench_cpu_bf16.py end to end at a small shape (no CSV, no BENCHMARKS.md): every case and
implementation runs in its worker, and the two kdfast paths agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kdfast

SCRIPT = Path(__file__).resolve().parent / "bench_cpu_bf16.py"


def test_small_run_prints_the_table_and_the_checks(monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_BF16_GEMM", "1")
    if not kdfast.ops.cpu_bf16_gemm_status().startswith("on"):
        pytest.skip(f"the CPU bf16 GEMM is not available: {kdfast.ops.cpu_bf16_gemm_status()}")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch", "16", "--classes", "3000", "--teacher-dim", "64",
         "--repeats", "1", "--no-write"], capture_output=True, text=True, check=True,
    ).stdout
    for title in ("hard CE", "CE + KD", "teacher labeling"):
        assert title in out
    checks = [line for line in out.splitlines() if line.startswith("check (bf16 GEMM vs float32 GEMM)")]
    assert len(checks) == 3 and all(line.endswith("-> OK") for line in checks), out
    assert "bf16 GEMM: on: KDFAST_CPU_BF16_GEMM=1" in out


def test_bad_subset_is_an_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cases", "nope"], check=False, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "--cases" in proc.stderr
