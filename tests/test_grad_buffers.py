"""The CPU fused loss's grad_weight block: huge pages and reuse (csrc/cpu/grad_buffers.h).

A reused block holds the previous step's gradient, so these tests check that every element
is written again (filtered tiles included), that the block is kept and freed as documented,
and that ``KDFAST_CPU_GRAD_CACHE=0`` turns it off.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.ops import cpu_cache_bytes, empty_cpu_cache

MIB = 2**20
V, D, B = 9001, 64, 6  # grad_weight 2.2 MiB in float32: one 4 MiB block (whole 2 MiB pages)
BLOCK = 4 * MIB


@pytest.fixture(autouse=True)
def _clean_cache(monkeypatch):
    monkeypatch.delenv("KDFAST_CPU_GRAD_CACHE", raising=False)
    empty_cpu_cache()
    yield
    empty_cpu_cache()


def _problem(seed: int, peaked: bool):
    """A hard-CE problem. peaked: the first 64 classes' logits ~30 above the rest, so the
    other tiles' gradients fall under the filter and the backward zeroes them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g, dtype=torch.float32)
    w = 0.1 * torch.randn(V, D, generator=g)
    if peaked:
        w[:64] = h.mean(0) * (30.0 / h.mean(0).square().sum())  # f = h . w ~ 30 for every row
        target = torch.randint(0, 64, (B,), generator=g)
    else:
        target = torch.randint(0, V, (B,), generator=g)
    return h.requires_grad_(True), w.requires_grad_(True), target


def _grad_weight(h, w, target, **kw) -> torch.Tensor:
    w.grad = None
    kdfast.fused_linear_distillation_loss(h, w, target, tile_size=256, **kw).backward()
    return w.grad


def test_block_is_kept_reused_and_fully_rewritten(monkeypatch):
    h, w, target = _problem(0, peaked=False)
    first = _grad_weight(h, w, target)
    assert bool((first[64:].abs() > 0).all(dim=1).any()), "the first gradient must be nonzero outside tile 0"
    first_ptr = first.data_ptr()
    del first
    w.grad = None
    assert cpu_cache_bytes() == BLOCK

    # the same block, holding the first gradient, now takes a gradient that is zero in every
    # filtered tile: each element must be the one a fresh (plain at::empty) buffer gets
    h2, w2, target2 = _problem(1, peaked=True)
    reused = _grad_weight(h2, w2, target2)
    assert reused.data_ptr() == first_ptr
    assert cpu_cache_bytes() == 0  # in use
    monkeypatch.setenv("KDFAST_CPU_GRAD_CACHE", "0")
    fresh = _grad_weight(h2.detach().requires_grad_(True), w2.detach().requires_grad_(True), target2)
    assert bool((fresh[256:] == 0).all()), "the problem must filter (zero) the tiles after the first"
    assert torch.equal(reused, fresh)
    # and both equal the unfused loss's gradient
    w_ref = w2.detach().requires_grad_(True)
    kdfast.distillation_loss(torch.nn.functional.linear(h2.detach(), w_ref), target2).backward()
    torch.testing.assert_close(reused, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_empty_cpu_cache_frees_only_an_idle_block():
    h, w, target = _problem(2, peaked=False)
    grad = _grad_weight(h, w, target)
    assert empty_cpu_cache() == 0  # the block is w.grad's
    del grad
    w.grad = None
    assert cpu_cache_bytes() == BLOCK
    assert empty_cpu_cache() == BLOCK
    assert cpu_cache_bytes() == 0
    assert empty_cpu_cache() == 0


def test_off_switch_keeps_nothing(monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_GRAD_CACHE", "0")
    h, w, target = _problem(3, peaked=False)
    _grad_weight(h, w, target)
    w.grad = None
    assert cpu_cache_bytes() == 0


def test_one_block_kept_a_block_of_another_size_replaces_it():
    h, w, target = _problem(4, peaked=False)
    _grad_weight(h, w, target)
    w.grad = None
    assert cpu_cache_bytes() == BLOCK
    big = (0.1 * torch.randn(3 * V, D)).requires_grad_(True)  # 6.6 MiB: an 8 MiB block
    grad = _grad_weight(h, big, target)
    assert cpu_cache_bytes() == 0  # the 4 MiB block was freed, not kept beside the new one
    assert grad.shape == (3 * V, D)
    del grad
    big.grad = None
    assert cpu_cache_bytes() == 8 * MIB


def test_small_gradients_are_plain_tensors():
    h, _, target = _problem(5, peaked=False)
    w = (0.1 * torch.randn(1000, D)).requires_grad_(True)  # 256 KB
    _grad_weight(h, w, target % 1000)
    w.grad = None
    assert cpu_cache_bytes() == 0


def test_block_storage_resizes_and_serializes(tmp_path):
    h, w, target = _problem(6, peaked=False)
    grad = _grad_weight(h, w, target)
    before = grad.clone()
    grad.resize_(V + 5000, D)  # the storage is resizable: the old values move to the new block
    assert torch.equal(grad[:V], before)
    torch.save(grad, tmp_path / "g.pt")
    assert torch.equal(torch.load(tmp_path / "g.pt")[:V], before)


def test_profiler_sees_the_block():
    from torch.profiler import ProfilerActivity, profile

    h, w, target = _problem(7, peaked=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _grad_weight(h, w, target)
    usage = [e.cpu_memory_usage for e in prof.key_averages() if e.key == "kdfast::fused_linear_loss_backward"]
    assert usage and usage[0] >= BLOCK, usage
