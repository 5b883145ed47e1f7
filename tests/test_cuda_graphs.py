"""No host synchronization inside a CUDA op (issue 6): the ops capture into a CUDA graph, and
none synchronizes in an eager call either.

The ops check index values on the device by default (csrc/cuda/index_checks.h), so they run only
device work; a graph captures those checks too. Replaying a graph on new input values must give
what an eager call gives on them, and a step run under ``torch.cuda.set_sync_debug_mode("error")``
must not raise (with KDFAST_CUDA_HOST_CHECKS=1, which copies the indices to the host, it does).
Runs only where kdfast has CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import kdfast

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and kdfast's CUDA kernels")

B, D, DT, V, K = 24, 16, 32, 1000, 8


def _capture(step, inputs):
    """A CUDA graph of ``step(*inputs)`` (warmed up on a side stream first), and its static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(*inputs)
    return graph, outputs


def _fresh(inputs, seed):
    """New values for the floating inputs, written in place (the graph reads their memory)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for t in inputs:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype))


def _check_replay(step, inputs):
    graph, outputs = _capture(step, inputs)
    for seed in (1, 2):
        _fresh(inputs, seed)
        graph.replay()
        torch.cuda.synchronize()
        expected = step(*inputs)
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_linear_kd_with_int_target_captures():
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B, D, device="cuda", generator=gen, requires_grad=True)
    W = torch.randn(V, D, device="cuda", generator=gen, requires_grad=True)
    th = torch.randn(B, DT, device="cuda", generator=gen)
    tW = torch.randn(V, DT, device="cuda", generator=gen)
    y = torch.randint(0, V, (B,), device="cuda", generator=gen)
    y[3] = -100  # an ignored row

    def step(h, W, th, tW):
        loss = kdfast.fused_linear_distillation_loss(
            h, W, y, teacher_hidden=th, teacher_weight=tW, hard_weight=0.5, soft_weight=0.5, temperature=2.0
        )
        return (loss, *torch.autograd.grad(loss, (h, W)))

    _check_replay(step, [h, W, th, tW])


def test_fused_linear_double_distillation_with_multitarget_and_topk_captures():
    gen = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(B, D, device="cuda", generator=gen, requires_grad=True)
    W = torch.randn(V, D, device="cuda", generator=gen, requires_grad=True)
    teacher = torch.randn(B, V, device="cuda", generator=gen)
    logits, indices = teacher.topk(K, dim=1)
    lse = teacher.logsumexp(1)
    rows = [sorted(set(torch.randint(0, V, (1 + i % 4,)).tolist())) for i in range(B)]
    target = kdfast.MultiTarget.from_lists(rows, device="cuda")

    def step(h, W, logits, lse):
        loss = kdfast.fused_linear_distillation_loss(
            h, W, target, teacher_topk=kdfast.TopK(indices, logits, lse), hard_weight=0.0, double_weight=1.0
        )
        return (loss, *torch.autograd.grad(loss, (h, W)))

    inputs = [h, W, logits, lse]
    graph, outputs = _capture(step, inputs)
    _fresh([h, W], seed=3)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, step(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dense_distillation_loss_captures():
    gen = torch.Generator(device="cuda").manual_seed(2)
    f = torch.randn(B, V, device="cuda", generator=gen, requires_grad=True)
    s = torch.randn(B, V, device="cuda", generator=gen)
    y = torch.randint(0, V, (B,), device="cuda", generator=gen)

    def step(f, s):
        loss = kdfast.distillation_loss(f, y, s, hard_weight=0.3, soft_weight=0.3, double_weight=0.4, temperature=3.0)
        return (loss, *torch.autograd.grad(loss, (f,)))

    _check_replay(step, [f, s])


def _steps(dtype=torch.float32):
    """(name, step, inputs): forward and backward of the fused loss with each target kind and
    teacher form, of the dense loss, and teacher top-k labeling, on ``dtype`` inputs."""
    gen = torch.Generator(device="cuda").manual_seed(4)

    def randn(*shape, grad=False):
        return torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_(grad)

    h, W = randn(B, D, grad=True), randn(V, D, grad=True)
    th, tW = randn(B, DT), randn(V, DT)
    y = torch.randint(0, V, (B,), device="cuda", generator=gen)
    rows = [sorted(set(torch.randint(0, V, (1 + i % 4,)).tolist())) for i in range(B)]
    multi = kdfast.MultiTarget.from_lists(rows, device="cuda")
    teacher = randn(B, V)
    logits, indices = teacher.topk(K, dim=1)
    topk = kdfast.TopK(indices, logits, teacher.logsumexp(1))

    def linear_kd(h, W):
        loss = kdfast.fused_linear_distillation_loss(
            h, W, y, teacher_hidden=th, teacher_weight=tW, hard_weight=0.5, soft_weight=0.5, temperature=2.0
        )
        return (loss, *torch.autograd.grad(loss, (h, W)))

    def multi_topk_dd(h, W):
        loss = kdfast.fused_linear_distillation_loss(h, W, multi, teacher_topk=topk, hard_weight=0.5, double_weight=0.5)
        return (loss, *torch.autograd.grad(loss, (h, W)))

    def dense(f):
        loss = kdfast.distillation_loss(f, y, teacher, hard_weight=0.5, double_weight=0.5)
        return (loss, *torch.autograd.grad(loss, (f,)))

    def labeling(th, tW):
        return kdfast.teacher_topk(th, tW, k=K, temperature=2.0)

    f = randn(B, V, grad=True)
    return [
        ("linear_kd", linear_kd, (h, W)),
        ("multi_topk_dd", multi_topk_dd, (h, W)),
        ("dense", dense, (f,)),
        ("labeling", labeling, (th, tW)),
    ]


def _run_without_syncs(step, inputs):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return step(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_op_synchronizes(dtype):
    for name, step, inputs in _steps(dtype):
        step(*inputs)  # first call: kernel attributes, cuBLAS handles, workspaces
        outputs = _run_without_syncs(step, inputs)
        assert all(torch.isfinite(t.float()).all() for t in outputs if isinstance(t, torch.Tensor)), name


def test_host_index_checks_synchronize(monkeypatch):
    """The test above can fail: the host checks' copy of the indices is a sync it catches."""
    monkeypatch.setenv("KDFAST_CUDA_HOST_CHECKS", "1")
    _, step, inputs = _steps()[0]
    step(*inputs)
    with pytest.raises(RuntimeError, match="synchroniz"):
        _run_without_syncs(step, inputs)
