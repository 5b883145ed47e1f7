"""bench_cpu_gemm_kinds.py's GEMMs on a small shape: each kind's result matches float64 on the
same inputs (at full size the same check caught raw pointers into freed tensors), and the rate
is finite."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_gemm_kinds as bench


@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("k", [16, 96])
def test_each_gemm_kind_matches_float64(kind, k):
    r = bench.measure(kind, 8, 40, k, min_seconds=0.01)
    if r is None:
        pytest.skip(f"this torch's libtorch_cpu has no MKL {kind} GEMM")
    assert r["max_rel_err"] < 1e-5, r
    assert math.isfinite(r["gflops"]) and r["gflops"] > 0, r
