"""The CUDA ops capture into a CUDA graph: no host synchronization inside an op (issue 6).

While a stream is being captured the ops skip the host-side checks of index values (a copy
to the host is not allowed then) and run only device work; replaying the graph on new input
values must give what an eager call gives on them. Runs only where kdfast has CUDA kernels.
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
