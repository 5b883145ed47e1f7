"""bench_labeling.py's correctness check on a small batch (the full script takes a minute)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_labeling


def test_check_agrees_with_eager_on_a_small_batch():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(8, 32, generator=g), torch.randn(500, 32, generator=g) / 3, torch.randn(500, generator=g)
    c = bench_labeling.check(h, w, b, k=5, temperature=1.5, chunk=8)
    assert c["ok"], c
    assert c["indices_equal_fraction"] == 1.0
    assert c["kdfast_lse_err_f64"] < 1e-4 and c["kdfast_values_err_f64"] < 1e-4
    assert len(bench_labeling.check_lines(c)) >= 3
