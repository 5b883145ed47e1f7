"""pytest-benchmark cases of the fused linear benchmark, at a size that runs in seconds.

    pytest benchmarks/test_bench_fused_linear.py --benchmark-only
    pytest benchmarks/ --benchmark-only -k dd_topk --benchmark-compare

Forward+backward (gradients of the student hidden and weight) of
``kdfast.fused_linear_distillation_loss`` and of PyTorch eager for the five cases of
``bench_fused_linear.py`` (hard CE; CE + KD and double distillation with the teacher on
the fly; double distillation with a top-32 teacher; pick-all-labels), B=64, d_s=64,
d_t=512, V=100,000, float32, CPU. Timing only (no peak memory: ``bench_fused_linear.py``
measures that in fresh processes). Not part of CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_linear

BATCH = 64
CLASSES = 100_000
DIM = 64
TEACHER_DIM = 512


@pytest.fixture(scope="module", params=bench_fused_linear.CASES)
def case_inputs(request):
    case = request.param
    return case, bench_fused_linear.make_inputs(case, BATCH, CLASSES, DIM, TEACHER_DIM)


@pytest.mark.parametrize("impl", bench_fused_linear.IMPLS)
def test_forward_backward(benchmark, case_inputs, impl):
    case, x = case_inputs
    if impl == "kdfast":
        pytest.importorskip("kdfast", reason="the kdfast extension is not built")
    step, reset = bench_fused_linear.make_step(impl, case, x)
    benchmark.group = f"{case} B={BATCH} d={DIM} V={CLASSES}"
    benchmark.extra_info.update(
        case=case, impl=impl, batch=BATCH, classes=CLASSES, d=DIM,
        d_t=TEACHER_DIM if case in bench_fused_linear.ON_THE_FLY else None,
        dtype="float32", threads=torch.get_num_threads(),
    )
    loss = benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
    assert x.h.grad is not None and x.h.grad.shape == x.h.shape
    assert x.W.grad is not None and x.W.grad.shape == x.W.shape
