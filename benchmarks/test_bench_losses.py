"""pytest-benchmark cases of the loss benchmark, at a size that runs in seconds.

    pytest benchmarks/ --benchmark-only                     # all cases
    pytest benchmarks/ --benchmark-only -k ce_kd --benchmark-compare

Forward+backward of kdfast and of PyTorch eager for the three cases of
``bench_losses.py`` (hard CE; hard CE + soft KD at T=2 with a dense teacher;
double distillation), B=64, V=100,000, float32, CPU. Timing only (no peak memory:
``bench_losses.py`` measures that in fresh processes). In ``make test`` (CI) they run with
``--benchmark-disable``: each step once, untimed, for its checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_losses

BATCH = 64
CLASSES = 100_000


@pytest.fixture(scope="module", params=bench_losses.CASES)
def case_inputs(request):
    case = request.param
    return case, bench_losses.make_inputs(case, BATCH, CLASSES)


@pytest.mark.parametrize("impl", bench_losses.IMPLS)
def test_forward_backward(benchmark, case_inputs, impl):
    case, (f, y, s) = case_inputs
    if impl == "kdfast":
        pytest.importorskip("kdfast", reason="the kdfast extension is not built")
    step, reset = bench_losses.make_step(impl, case, f, y, s)
    benchmark.group = f"{case} B={BATCH} V={CLASSES}"
    benchmark.extra_info.update(
        case=case, impl=impl, batch=BATCH, classes=CLASSES, dtype="float32", threads=torch.get_num_threads()
    )
    loss = benchmark.pedantic(step, setup=reset, rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
    assert f.grad is not None and f.grad.shape == f.shape
