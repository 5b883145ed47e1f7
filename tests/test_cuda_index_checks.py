"""The CUDA ops' device-side checks of index values (csrc/cuda/index_checks.cu, issue 6).

By default the CUDA ops check target, MultiTarget and TopK index values on the device, so that no
op waits for it (tests/test_cuda_graphs.py checks that none synchronizes). A bad value prints a
line naming the argument, the entry and the value (``kdfast: `` and the host check's message) and
stops the kernel with a device-side assertion. On a GPU that ends the process's CUDA context, so
each case runs in a subprocess there; under the emulation (KDFAST_CUDA_EMU=1) the launch fails
with the assertion in the test's process. With KDFAST_CUDA_HOST_CHECKS=1 the same inputs raise the
host check's ValueError, word for word (the message tests of test_fused_linear.py and
test_distillation_loss.py run that way, fixture ``host_index_checks``).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA_EMU, DEVICES

import kdfast

# (collected only under the emulation or where kdfast has CUDA kernels: conftest.collect_ignore)
emulated = pytest.mark.skipif(not CUDA_EMU, reason="in the test's process only under the emulation")
on_the_gpu = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and kdfast's CUDA kernels")

B, D, V = 4, 3, 6


def _fused(device, target, **teacher):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, D, generator=gen).to(device).requires_grad_(True)
    W = torch.randn(V, D, generator=gen).to(device).requires_grad_(True)
    loss = kdfast.fused_linear_distillation_loss(h, W, target, **teacher)
    loss.backward()
    return loss


def _multi(device, indptr, indices):
    target = kdfast.MultiTarget(torch.tensor(indptr, device=device), torch.tensor(indices, device=device))
    return _fused(device, target)


def _topk(device, indices):
    idx = torch.tensor(indices, device=device)
    topk = kdfast.TopK(idx, torch.randn(idx.shape, device=device), torch.full((B,), 3.0, device=device))
    return _fused(device, None, teacher_topk=topk, hard_weight=0.0, double_weight=1.0)


def _dense(device, target):
    x = torch.randn(B, V, device=device, requires_grad=True)
    loss = kdfast.distillation_loss(x, torch.tensor(target, device=device))
    loss.backward()
    return loss


# name -> (a call on a device, the message of its bad value: the host check's ValueError and,
# after "kdfast: ", the device check's printed line)
CASES = {
    "target": (
        lambda dev: _fused(dev, torch.tensor([0, 1, 7, 2], device=dev)),
        "target[2] = 7 is outside [0, 6) and is not ignore_index (-100)",
    ),
    "target_negative": (
        lambda dev: _fused(dev, torch.tensor([0, -1, -100, 2], device=dev)),
        "target[1] = -1 is outside [0, 6) and is not ignore_index (-100)",
    ),
    "dense_target": (
        lambda dev: _dense(dev, [0, 1, 2, 6]),
        "target[3] = 6 is outside [0, 6) and is not ignore_index (-100)",
    ),
    "multi_unsorted": (
        lambda dev: _multi(dev, [0, 2, 2, 3, 5], [3, 1, 4, 0, 5]),
        "target.indices of row 0 must be sorted ascending; got 3 before 1",
    ),
    "multi_index_too_large": (
        lambda dev: _multi(dev, [0, 3, 3, 4, 6], [0, 2, 6, 1, 3, 4]),
        "target.indices[2] = 6 (row 0) is outside [0, 6)",
    ),
    "multi_indptr_start": (
        lambda dev: _multi(dev, [1, 2, 2, 3, 6], [0, 2, 5, 1, 3, 4]),
        "target.indptr[0] must be 0, got 1",
    ),
    "multi_indptr_end": (
        lambda dev: _multi(dev, [0, 2, 2, 3, 5], [0, 2, 5, 1, 3, 4]),
        "target.indptr[-1] = 5 but target.indices has 6 entries",
    ),
    "multi_indptr_decreasing": (
        lambda dev: _multi(dev, [0, 3, 2, 3, 6], [0, 2, 5, 1, 3, 4]),
        "target.indptr must be non-decreasing; indptr[2] = 2 < indptr[1] = 3",
    ),
    "topk_index_too_large": (
        lambda dev: _topk(dev, [[0, 6], [1, 2], [3, 4], [5, 0]]),
        "teacher_topk.indices[0, 1] = 6 is outside [0, 6)",
    ),
    "topk_index_repeated": (
        lambda dev: _topk(dev, [[0, 1], [1, 2], [4, 4], [5, 0]]),
        "teacher_topk.indices[2] holds class 4 more than once",
    ),
}


def _graph_replay(device):
    """A CUDA graph of a fused step captured on good targets, replayed after one was made bad in
    place: the graph holds the device check too."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, D, generator=gen).to(device).requires_grad_(True)
    W = torch.randn(V, D, generator=gen).to(device).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3], device=device)

    def step():
        loss = kdfast.fused_linear_distillation_loss(h, W, y)
        return torch.autograd.grad(loss, (h, W))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    y[1] = V
    graph.replay()


# cases that need a GPU (run in a subprocess there)
GPU_CASES = {"graph_replay": (_graph_replay, "target[1] = 6 is outside [0, 6) and is not ignore_index (-100)")}


def _printed() -> None:
    """Flush C stdio, where the device checks' printf lines wait (CUDA's and the emulation's)."""
    ctypes.CDLL(None).fflush(None)


@emulated
@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_stops_the_kernel_under_the_emulation(case, monkeypatch, capfd):
    call, message = CASES[case]
    monkeypatch.delenv("KDFAST_CUDA_HOST_CHECKS", raising=False)
    capfd.readouterr()
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: .*index_checks\.cu.*Assertion `kdfast: "):
        call("cpu")
    _printed()
    assert f"kdfast: {message}\n" in capfd.readouterr().out
    # the host checks say the same, as a ValueError
    monkeypatch.setenv("KDFAST_CUDA_HOST_CHECKS", "1")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call("cpu")


@emulated
def test_good_values_pass_the_device_checks_under_the_emulation(monkeypatch):
    """Edge values the checks must let through: ignore_index rows, rows without positives, class
    0 and V - 1, and an empty batch; each gives what the CPU kernels give."""
    import cuda_emulation

    monkeypatch.delenv("KDFAST_CUDA_HOST_CHECKS", raising=False)
    before = cuda_emulation.launch_count()
    losses = [
        _fused("cpu", torch.tensor([0, -100, V - 1, 2])),
        _multi("cpu", [0, 0, 2, 2, 3], [0, V - 1, 3]),
        _topk("cpu", [[0, V - 1], [1, 2], [4, 3], [5, 0]]),
        _dense("cpu", [V - 1, -100, 0, 2]),
    ]
    assert all(torch.isfinite(loss) for loss in losses)
    assert cuda_emulation.launch_count() > before
    h = torch.randn(0, D, requires_grad=True)
    empty = kdfast.MultiTarget(torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    out = kdfast.fused_linear_distillation_loss(h, torch.randn(V, D), empty, reduction="sum")
    assert out.item() == 0.0


_SUBPROCESS = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_cuda_index_checks import CASES, GPU_CASES
{{**CASES, **GPU_CASES}}[{case!r}][0]("cuda")
torch.cuda.synchronize()
print("no error")
"""


@on_the_gpu
@pytest.mark.parametrize("case", ["target", "multi_unsorted", "topk_index_repeated", "graph_replay"])
def test_bad_value_is_a_device_side_assert_on_the_gpu(case):
    """On a GPU, in a subprocess (the assertion ends its CUDA context): one case per check kernel,
    and a CUDA graph's replay."""
    env = {k: v for k, v in os.environ.items() if k != "KDFAST_CUDA_HOST_CHECKS"}
    script = _SUBPROCESS.format(tests=str(Path(__file__).parent), case=case)
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert triggered" in run.stderr, run.stderr
    message = {**CASES, **GPU_CASES}[case][1]
    assert f"kdfast: {message}" in run.stdout + run.stderr, run.stdout + run.stderr
