"""Tests of ``kdfast.fused_linear_distillation_loss`` (its op, module, autograd and bad-input errors).

Two oracles, both on the student logits ``F.linear(h, W, b)`` made densely:

* (a) ``kdfast.distillation_loss`` (the dense op) in the inputs' dtype;
* (b) :mod:`kdfast.reference` in float64 (plain PyTorch).

A ``MultiTarget`` (pick-all-labels) is checked against expanding every row into one row per
positive with int targets. A top-k teacher is checked against the dense loss with teacher logits
``-inf`` outside the top-k (soft and sigmoid-double terms); its ``one_minus_prob`` double term has
an explicit reference below (weights from the stored log-partition, positives renormalized over k).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import kdfast
from kdfast import MultiTarget, TopK, reference

FORWARD_OP = torch.ops.kdfast.fused_linear_loss_forward.default
BACKWARD_OP = torch.ops.kdfast.fused_linear_loss_backward.default

REDUCTIONS = ["none", "sum", "mean"]
FORMS = ["dense", "linear", "topk"]
TARGET_KINDS = ["int", "multi"]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# Every term alone and combined; scale/shift deliberately not (1, 0).
TERMS = {
    "hard": {"hard_weight": 1.0},
    "hard_smoothed": {"hard_weight": 1.0, "label_smoothing": 0.1},
    "soft": {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": 2.0},
    "double_sigmoid": {
        "hard_weight": 0.0,
        "double_weight": 1.0,
        "negative_weighting": "sigmoid",
        "negative_scale": 2.5,
        "negative_shift": 0.7,
    },
    "double_one_minus_prob": {"hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "one_minus_prob"},
    "combined": {
        "hard_weight": 0.7,
        "soft_weight": 1.3,
        "double_weight": 0.4,
        "temperature": 3.0,
        "negative_scale": 0.5,
        "negative_shift": -1.0,
        "label_smoothing": 0.05,
    },
    "combined_one_minus_prob": {
        "hard_weight": 0.2,
        "soft_weight": 0.5,
        "double_weight": 1.5,
        "temperature": 0.5,
        "negative_weighting": "one_minus_prob",
        "label_smoothing": 0.2,
    },
}


def _needs_teacher(kwargs):
    return kwargs.get("soft_weight", 0) > 0 or kwargs.get("double_weight", 0) > 0


def _has_fused_kernel(device):
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::fused_linear_loss_forward", key)


@pytest.fixture
def fdevice(device):
    """The shared ``device`` fixture, restricted to devices the fused op has a kernel for."""
    if not _has_fused_kernel(device):
        pytest.skip(f"fused_linear_loss has no {device} kernel in this build")
    return device


# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    hidden: torch.Tensor  # [B, d_s]
    weight: torch.Tensor  # [V, d_s]
    bias: torch.Tensor | None  # [V]
    target: Any  # int64 [B], MultiTarget or None
    form: str | None  # "dense", "linear", "topk" or None
    teacher: Any  # [B, V] tensor, (hidden, weight, bias) tuple, or TopK

    @property
    def B(self):
        return self.hidden.shape[0]

    @property
    def V(self):
        return self.weight.shape[0]

    def teacher_kwargs(self) -> dict:
        if self.form == "dense":
            return {"teacher_logits": self.teacher}
        if self.form == "linear":
            th, tw, tb = self.teacher
            return {"teacher_hidden": th, "teacher_weight": tw, "teacher_bias": tb}
        if self.form == "topk":
            return {"teacher_topk": self.teacher}
        return {}

    def dense_teacher(self, dtype):
        """The teacher for the dense oracles: [B, V] logits in ``dtype`` (a top-k teacher: -inf outside
        the top-k), or for a top-k teacher a (logits, lse) pair so the explicit reference can use lse."""
        if self.form == "dense":
            return self.teacher.to(dtype)
        if self.form == "linear":
            th, tw, tb = self.teacher
            return F.linear(th.detach().to(dtype), tw.detach().to(dtype), None if tb is None else tb.detach().to(dtype))
        if self.form == "topk":
            idx, logits, lse = self.teacher.indices, self.teacher.logits.detach(), self.teacher.lse
            s = torch.full((self.B, self.V), -torch.inf, dtype=dtype, device=idx.device)
            s.scatter_(1, idx, logits.to(dtype))
            return s, lse.to(dtype)
        return None


def _multi_target(B, V, g, device, *, empty_rows=(1,), max_positives=4):
    rows = []
    for i in range(B):
        c = 0 if i in empty_rows else int(torch.randint(1, max_positives + 1, (1,), generator=g))
        c = min(c, V)
        rows.append(sorted(torch.randperm(V, generator=g)[:c].tolist()))
    mt = MultiTarget.from_lists(rows, device=device)
    assert mt.num_rows == B
    return mt


def _problem(
    B,
    d,
    V,
    *,
    seed,
    form="dense",
    target_kind="int",
    bias=True,
    dtype=torch.float64,
    device="cpu",
    d_t=None,
    k=None,
    scale=2.0,
    ignore=(1, 4),
    ignore_index=-100,
    teacher_bias=True,
):
    """Student hidden/weight/bias, a target and a teacher from a fixed seed; logits of size ~``scale``.
    Everything is drawn in float64 and rounded once to ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    h = randn(B, d)
    W = randn(V, d, s=scale / max(d, 1) ** 0.5)
    b = randn(V, s=0.5) if bias else None
    if target_kind == "int":
        target = torch.randint(0, V, (B,), generator=g)
        for i in ignore:
            if i < B:
                target[i] = ignore_index
        target = target.to(device)
    elif target_kind == "multi":
        target = _multi_target(B, V, g, device)
    else:
        target = None
    teacher = None
    if form == "dense":
        teacher = randn(B, V, s=scale)
    elif form == "linear":
        d_t = d_t or d + 4
        assert d_t != d
        teacher = (randn(B, d_t), randn(V, d_t, s=scale / d_t**0.5), randn(V, s=0.5) if teacher_bias else None)
    elif form == "topk":
        k = k or min(5, V)
        full = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
        logits, idx = full.topk(k, dim=1)
        perm = torch.argsort(torch.rand(B, k, generator=g), dim=1)  # any order within a row
        idx, logits = idx.gather(1, perm), logits.gather(1, perm)
        lse = torch.logsumexp(full, dim=1)
        teacher = TopK(idx.to(device), logits.to(device, dtype), lse.to(device, dtype))
    return Problem(h, W, b, target, form, teacher)


# ----------------------------------------------------------------------------- oracles


def _topk_reference(f, target, teacher, **kwargs):
    """Dense reference for a top-k teacher given as (logits with -inf outside the top-k, lse).

    Soft term and sigmoid weights: the dense loss on those logits (softmax renormalized over the k
    classes, w = 1 - sigmoid(-inf) = 1 outside). one_minus_prob: w_j = 1 - exp(s_j - lse) from the
    stored full log-partition inside the top-k and 1 outside; positives softmax(s) over the k."""
    s, lse = teacher
    if kwargs.get("double_weight", 0) == 0 or kwargs.get("negative_weighting", "sigmoid") != "one_minus_prob":
        return reference.distillation_loss(f, target, s, **kwargs)
    reduction = kwargs.pop("reduction", "mean")
    double_weight = kwargs.pop("double_weight")
    ignore_index = kwargs.get("ignore_index", -100)
    base = reference.distillation_loss(f, target, s, double_weight=0.0, reduction="none", **kwargs)
    inside = torch.isfinite(s)
    log_w = torch.where(inside, torch.log1p(-torch.exp(torch.where(inside, s, 0.0) - lse[:, None])), 0.0)
    q = torch.softmax(s, dim=-1)
    dot = torch.where(q > 0, q * f, torch.zeros_like(f)).sum(-1)
    double = torch.logsumexp(f + log_w, dim=-1) - dot
    counted = (
        target != ignore_index if target is not None else torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
    )
    loss = base + double_weight * torch.where(counted, double, torch.zeros_like(double))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum()


def _expand_rows(target: MultiTarget):
    """(row of each positive, the positive): the pick-all-labels expansion."""
    counts = target.indptr[1:] - target.indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    return rows, target.indices


def _dense_loss(fn, f, target, teacher, kwargs):
    """``fn(f, target, teacher, **kwargs)``; a MultiTarget is expanded into one row per positive."""
    if not isinstance(target, MultiTarget):
        return fn(f, target, teacher, **kwargs)
    rows, tgt = _expand_rows(target)
    if isinstance(teacher, tuple):
        t = tuple(x[rows] for x in teacher)
    else:
        t = None if teacher is None else teacher[rows]
    reduction = kwargs.get("reduction", "mean")
    per = fn(f[rows], tgt, t, **dict(kwargs, reduction="none"))
    if reduction == "none":
        return torch.zeros(f.shape[0], dtype=per.dtype, device=per.device).index_add(0, rows, per)
    if reduction == "sum":
        return per.sum()
    return per.sum() / rows.numel()


def _leaf(t, dtype=None):
    if t is None:
        return None
    x = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return x.requires_grad_(True)


def _backward(loss, leaves, grad_out):
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(device=loss.device, dtype=loss.dtype)
    loss.backward(g)
    return loss.detach(), tuple(None if x is None else x.grad for x in leaves)


def _run_fused(p: Problem, kwargs, grad_out=None, **extra):
    """Fused loss and (grad_hidden, grad_weight, grad_bias) on fresh leaves. The teacher is passed
    even to a hard-only loss (which must not read it)."""
    h, W, b = _leaf(p.hidden), _leaf(p.weight), _leaf(p.bias)
    loss = kdfast.fused_linear_distillation_loss(
        h, W, p.target, student_bias=b, **p.teacher_kwargs(), **kwargs, **extra
    )
    return _backward(loss, (h, W, b), grad_out)


def _run_dense(fn, p: Problem, kwargs, grad_out=None, dtype=None):
    """Loss and gradients of ``fn`` on ``F.linear(h, W, b)`` (optionally upcast), the dense way."""
    dtype = dtype or p.hidden.dtype
    h, W, b = _leaf(p.hidden, dtype), _leaf(p.weight, dtype), _leaf(p.bias, dtype)
    teacher = p.dense_teacher(dtype) if _needs_teacher(kwargs) else None
    if p.form == "topk" and teacher is not None:
        if fn is kdfast.distillation_loss:
            teacher = teacher[0]  # (a): only for soft/sigmoid terms, see _oracle_applies
        else:
            fn = _topk_reference
    elif isinstance(teacher, tuple):
        teacher = teacher[0]
    loss = _dense_loss(fn, F.linear(h, W, b), p.target, teacher, kwargs)
    return _backward(loss, (h, W, b), grad_out)


def _dense_op_applies(p: Problem, kwargs):
    """The dense op (oracle a) computes the top-k teacher's one_minus_prob weights from the renormalized
    softmax, not the stored lse: it is an oracle there only when no such term is present."""
    return not (
        p.form == "topk" and kwargs.get("double_weight", 0) > 0 and kwargs.get("negative_weighting") == "one_minus_prob"
    )


def _tols(dtype, kwargs=None, reduction="mean", B=1, V=1):
    """(loss tolerance, gradient tolerance) against the float64 reference. float64 tight (an fp32
    accumulation would fail it); float32 a few ulps of the row quantities, scaled by the term
    weights, T**2 (loss) / T (gradient) for the soft term, and the rows a "sum" adds up."""
    kwargs = kwargs or {}
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}, {"rtol": 1e-9, "atol": 1e-11}
    T = kwargs.get("temperature", 1.0) if kwargs.get("soft_weight", 0) else 1.0
    w = max(1.0, kwargs.get("hard_weight", 1.0) + kwargs.get("soft_weight", 0.0) + kwargs.get("double_weight", 0.0))
    rows = B if reduction == "sum" else 1
    loss_tol = {"rtol": 1e-5, "atol": 1e-5 * w * max(1.0, T * T) * max(1, rows)}
    grad_tol = {"rtol": 1e-4, "atol": 2e-6 * w * max(1.0, T) * max(1, rows)}
    return loss_tol, grad_tol


GRAD_NAMES = ("grad_hidden", "grad_weight", "grad_bias")


def _same_tols(dtype):
    """Two runs of the same computation: equal up to the order in which threads' partial row
    statistics and grad_hidden are merged, and BLAS results that may depend on buffer alignment."""
    if dtype == torch.float64:
        tol = {"rtol": 1e-12, "atol": 1e-13}
    elif dtype == torch.float32:
        tol = {"rtol": 2e-6, "atol": 1e-7}
    else:  # one rounding of the output
        tol = {"rtol": torch.finfo(dtype).eps, "atol": 1e-5}
    return tol, tol


def _assert_same(got, expected, loss_tol, grad_tol, what):
    (loss, grads), (e_loss, e_grads) = got, expected
    assert loss.shape == e_loss.shape, what
    assert_close(loss.to(e_loss.dtype), e_loss, **loss_tol, msg=lambda m: f"{what}: loss: {m}")
    for name, g, e in zip(GRAD_NAMES, grads, e_grads):
        if e is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g is not None, f"{what}: {name} missing"
        assert g.shape == e.shape, f"{what}: {name} shape"
        assert_close(g.to(e.dtype), e, **grad_tol, msg=lambda m, name=name: f"{what}: {name}: {m}")


def _compare(p: Problem, kwargs, grad_out=None, tols=None, **extra):
    """The fused loss against (a) the dense op in the same dtype and (b) the float64 reference.
    Returns the fused (loss, grads)."""
    dtype = p.hidden.dtype
    fused = _run_fused(p, kwargs, grad_out, **extra)
    loss, grads = fused
    assert loss.dtype == dtype and loss.device == p.hidden.device
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    reduction = kwargs.get("reduction", "mean")
    if tols is None:
        tols = _tols(dtype, kwargs, reduction, p.B, p.V)
    ref = _run_dense(reference.distillation_loss, p, kwargs, grad_out, torch.float64)
    _assert_same(fused, ref, *tols, what="vs float64 reference")
    if _dense_op_applies(p, kwargs):
        dense = _run_dense(kdfast.distillation_loss, p, kwargs, grad_out)
        # both in `dtype`: the sum of both errors against float64
        lt, gt = tols
        double = ({k: 2 * v for k, v in lt.items()}, {k: 2 * v for k, v in gt.items()})
        _assert_same(
            fused,
            (dense[0].double(), tuple(None if x is None else x.double() for x in dense[1])),
            *double,
            what="vs kdfast.distillation_loss(F.linear(...))",
        )
    return fused


def _grad_out(p: Problem, reduction, seed=100):
    if reduction != "none":
        return None
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(p.B, generator=g, dtype=torch.float64)).to(p.hidden.device, p.hidden.dtype)


# ----------------------------------------------------------------------------- the matrix

# the tile size cycles with the reduction, so every (form, term, target, bias, exact, dtype)
# combination runs with several tiles and a ragged last one (V = 83), and with one auto tile
TILE_FOR_REDUCTION = {"none": 16, "sum": 64, "mean": None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "filtered"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("form", FORMS)
def test_matches_dense_and_reference(form, term, target_kind, bias, reduction, exact, dtype, fdevice):
    kwargs = dict(TERMS[term], reduction=reduction)
    p = _problem(6, 5, 83, seed=1, form=form, target_kind=target_kind, bias=bias, dtype=dtype, device=fdevice)
    _compare(p, kwargs, _grad_out(p, reduction), exact=exact, tile_size=TILE_FOR_REDUCTION[reduction])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("term", ["soft", "combined", "combined_one_minus_prob"])
@pytest.mark.parametrize("form", FORMS)
def test_temperatures(form, term, target_kind, temperature, dtype, fdevice):
    kwargs = dict(TERMS[term], temperature=temperature, reduction="sum")
    p = _problem(5, 6, 70, seed=2, form=form, target_kind=target_kind, dtype=dtype, device=fdevice, scale=3.0)
    _compare(p, kwargs, exact=True, tile_size=16)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("term", ["hard_smoothed", "soft", "combined"])
def test_ignore_index(term, ignore_index, fdevice):
    """Ignored rows contribute nothing (also to the teacher terms), get zero gradients, are 0 under
    "none" and are not counted by "mean"; ignore_index may be a valid class."""
    ignored = [0, 3, 4]
    for reduction in REDUCTIONS:
        kwargs = dict(TERMS[term], reduction=reduction, ignore_index=ignore_index)
        p = _problem(7, 4, 29, seed=3, device=fdevice, ignore=ignored, ignore_index=ignore_index)
        if ignore_index == 3:
            p.target[p.target == 3] = 5
            p.target[ignored] = 3
        loss, (gh, _, _) = _compare(p, kwargs, _grad_out(p, reduction), tile_size=8)
        assert torch.all(gh[ignored] == 0)
        if reduction == "none":
            assert torch.all(loss[ignored] == 0)


def test_all_rows_ignored_like_cross_entropy(fdevice):
    p = _problem(4, 3, 9, seed=4, device=fdevice, ignore=range(4))
    for reduction in REDUCTIONS:
        loss, grads = _run_fused(p, {"reduction": reduction}, tile_size=4)
        x = F.linear(_leaf(p.hidden), p.weight, p.bias)
        expected = F.cross_entropy(x, p.target, reduction=reduction)
        assert_close(loss, expected.detach(), equal_nan=True)  # NaN for mean, 0 for sum
        for g in grads:
            assert torch.all(g == 0)


# ----------------------------------------------------------------------------- pick-all-labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("term", ["hard", "hard_smoothed", "combined", "combined_one_minus_prob"])
def test_pick_all_labels_equals_expanded_rows(term, dtype, fdevice):
    """A row with positives Y counts as |Y| rows (x, y); rows without positives are skipped; "mean"
    divides by the number of positives (checked by hand here, not only through _dense_loss)."""
    p = _problem(9, 4, 50, seed=5, form="linear", target_kind="multi", dtype=dtype, device=fdevice)
    mt = p.target
    counts = (mt.indptr[1:] - mt.indptr[:-1]).tolist()
    assert 0 in counts and max(counts) > 1
    kwargs = dict(TERMS[term])
    loss_none, (gh, _, _) = _compare(p, dict(kwargs, reduction="none"), _grad_out(p, "none"), tile_size=16)
    empty = [i for i, c in enumerate(counts) if c == 0]
    assert torch.all(loss_none[empty] == 0) and torch.all(gh[empty] == 0)
    loss_sum, _ = _run_fused(p, dict(kwargs, reduction="sum"), tile_size=16)
    loss_mean, _ = _run_fused(p, dict(kwargs, reduction="mean"), tile_size=16)
    assert int(mt.num_positives()) == sum(counts)
    tol = {"rtol": 1e-12, "atol": 0} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 0}
    assert_close(loss_mean, loss_sum / sum(counts), **tol)
    assert_close(loss_sum, loss_none.sum(), **({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}))
    # one positive per row is the int target
    single = MultiTarget.from_lists([[i % 50] for i in range(9)], device=fdevice)
    int_target = torch.arange(9, device=fdevice) % 50
    for reduction in REDUCTIONS:
        kw = dict(kwargs, reduction=reduction)
        a = _run_fused(Problem(p.hidden, p.weight, p.bias, single, p.form, p.teacher), kw, tile_size=16)
        b = _run_fused(Problem(p.hidden, p.weight, p.bias, int_target, p.form, p.teacher), kw, tile_size=16)
        _assert_same(a, b, *_tols(dtype, kw, reduction, 9), what=f"single-positive MultiTarget {reduction}")


# ----------------------------------------------------------------------------- top-k teacher


@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("term", ["soft", "double_sigmoid", "double_one_minus_prob", "combined_one_minus_prob"])
def test_topk_teacher_sizes(term, k, fdevice):
    """k = 1, a few, and k = V (then the softmax over k is the full softmax and the stored lse is
    the logits' own LSE: the top-k teacher equals the dense one, for every term)."""
    V = 40
    p = _problem(6, 3, V, seed=6, form="topk", target_kind="int", k=k, device=fdevice)
    kwargs = dict(TERMS[term], reduction="none")
    got = _compare(p, kwargs, _grad_out(p, "none"), tile_size=16)
    if k == V:
        full = torch.full((6, V), -torch.inf, dtype=torch.float64, device=fdevice).scatter(
            1, p.teacher.indices, p.teacher.logits
        )
        dense = Problem(p.hidden, p.weight, p.bias, p.target, "dense", full)
        assert_close(p.teacher.lse, torch.logsumexp(full, 1))
        expected = _run_fused(dense, kwargs, _grad_out(p, "none"), tile_size=16)
        _assert_same(got, expected, *_tols(torch.float64), what="top-k with k = V vs dense teacher")


def test_topk_one_minus_prob_uses_stored_lse(fdevice):
    """The one_minus_prob weights read the stored lse: changing it changes the loss (and matches
    the explicit reference with that lse), while soft/sigmoid terms do not depend on it."""
    p = _problem(5, 4, 30, seed=7, form="topk", target_kind="int", k=4, device=fdevice)
    shifted = TopK(p.teacher.indices, p.teacher.logits, p.teacher.lse + 0.75)
    q = Problem(p.hidden, p.weight, p.bias, p.target, "topk", shifted)
    omp = dict(TERMS["double_one_minus_prob"], reduction="none")
    a, _ = _compare(p, omp, tile_size=8)
    b, _ = _compare(q, omp, tile_size=8)
    counted = p.target != -100
    assert (a - b)[counted].abs().min() > 1e-4
    assert torch.all(a[~counted] == 0) and torch.all(b[~counted] == 0)
    soft = dict(TERMS["combined"], reduction="none")
    assert_close(
        _run_fused(p, soft, tile_size=8)[0], _run_fused(q, soft, tile_size=8)[0], **_same_tols(p.hidden.dtype)[0]
    )


# ----------------------------------------------------------------------------- shapes, tiles, layouts


@pytest.mark.parametrize("tile", [16, 64, None], ids=["tile16", "tile64", "auto"])
@pytest.mark.parametrize("d", [1, 3, 13])
@pytest.mark.parametrize("V", [1, 7, 1031])
@pytest.mark.parametrize("form", FORMS)
def test_odd_shapes(form, V, d, tile, fdevice):
    term = "combined" if V == 1 else "combined_one_minus_prob"  # V = 1: 1 - p = 0, log w = -inf
    p = _problem(5, d, V, seed=8 + V + d, form=form, target_kind="int", device=fdevice, ignore=(2,), d_t=d + 2)
    _compare(p, dict(TERMS[term], reduction="none"), _grad_out(p, "none"), exact=True, tile_size=tile)
    if V > 1:
        pm = _problem(5, d, V, seed=9 + V + d, form=form, target_kind="multi", device=fdevice, d_t=d + 2)
        _compare(pm, dict(TERMS["combined"], reduction="mean"), exact=True, tile_size=tile)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
def test_odd_shapes_float32_large_v(dtype, fdevice):
    p = _problem(7, 13, 1031, seed=10, form="linear", target_kind="multi", dtype=dtype, device=fdevice, d_t=3)
    _compare(p, dict(TERMS["combined_one_minus_prob"], reduction="none"), _grad_out(p, "none"), tile_size=64)


def test_many_rows_and_tiles(fdevice):
    """Enough tiles for every thread to take several (parallel_for over tiles + merged row
    accumulators), float32, every term, some ignored rows."""
    p = _problem(
        33,
        8,
        2053,
        seed=11,
        form="dense",
        target_kind="int",
        dtype=torch.float32,
        device=fdevice,
        ignore=range(0, 33, 5),
    )
    _compare(p, dict(TERMS["combined"], reduction="none"), _grad_out(p, "none"), tile_size=16)


def test_tile_size_does_not_change_the_result(fdevice):
    p = _problem(6, 5, 301, seed=12, form="topk", target_kind="multi", device=fdevice, k=7)
    kwargs = dict(TERMS["combined_one_minus_prob"], reduction="none")
    results = [
        _run_fused(p, kwargs, _grad_out(p, "none"), tile_size=t, exact=True) for t in (1, 16, 64, 300, 301, 10**6, None)
    ]
    for r in results[1:]:
        _assert_same(r, results[0], *_tols(torch.float64), what="tile sizes")


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout."""
    if t.dim() == 1:
        base = torch.zeros(2 * t.shape[0] + 1, dtype=t.dtype, device=t.device)
        base[1::2] = t
        out = base[1::2]
    elif kind == "transposed":
        out = t.t().contiguous().t()
    else:  # column stride 2 with a row offset
        base = torch.zeros(t.shape[0] + 1, 2 * t.shape[1] + 3, dtype=t.dtype, device=t.device)
        base[1:, 3::2] = t
        out = base[1:, 3::2]
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(form, layout, fdevice):
    """Non-contiguous hidden/weight/bias/teacher inputs give the contiguous result; the gradients
    reach the non-contiguous leaves."""
    p = _problem(6, 5, 45, seed=13, form=form, target_kind="multi", device=fdevice, d_t=7)
    other = "strided" if layout == "transposed" else "transposed"
    teacher = p.teacher
    if form == "dense":
        teacher = _strided(teacher, layout)
    elif form == "linear":
        teacher = (_strided(teacher[0], other), _strided(teacher[1], layout), _strided(teacher[2], layout))
    else:
        teacher = TopK(
            _strided(teacher.indices, layout), _strided(teacher.logits, other), _strided(teacher.lse, layout)
        )
    kwargs = dict(TERMS["combined_one_minus_prob"], reduction="none")
    g = _grad_out(p, "none")
    expected = _compare(p, kwargs, g, tile_size=16)
    h, W, b = (
        _strided(p.hidden, layout).requires_grad_(True),
        _strided(p.weight, other).requires_grad_(True),
        _strided(p.bias, layout).requires_grad_(True),
    )
    assert not (h.is_contiguous() or W.is_contiguous() or b.is_contiguous())
    q = Problem(
        h, W, b, MultiTarget(_strided(p.target.indptr, layout), _strided(p.target.indices, layout)), form, teacher
    )
    loss = kdfast.fused_linear_distillation_loss(
        h, W, q.target, student_bias=b, **q.teacher_kwargs(), **kwargs, tile_size=16
    )
    got = _backward(loss, (h, W, b), g)
    _assert_same(got, expected, *_tols(torch.float64), what=f"non-contiguous {layout}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("form", FORMS)
def test_upstream_gradient_not_one(form, dtype, fdevice):
    p = _problem(7, 4, 61, seed=14, form=form, target_kind="int", dtype=dtype, device=fdevice)
    kwargs = dict(TERMS["combined"])
    g = 3 * _grad_out(p, "none", seed=15)
    g[2] = 0.0
    _compare(p, dict(kwargs, reduction="none"), g, tile_size=16)
    _compare(p, dict(kwargs, reduction="mean"), torch.tensor(-2.5, dtype=dtype, device=fdevice), tile_size=16)


def test_only_some_inputs_require_grad(fdevice):
    p = _problem(5, 4, 33, seed=16, form="dense", device=fdevice)
    kwargs = dict(TERMS["combined"], reduction="sum")
    _, (e_h, e_w, _) = _run_fused(p, kwargs, tile_size=8)
    W = p.weight.clone().requires_grad_(True)
    kdfast.fused_linear_distillation_loss(
        p.hidden, W, p.target, student_bias=p.bias, **p.teacher_kwargs(), **kwargs, tile_size=8
    ).backward()
    assert_close(W.grad, e_w, **_same_tols(W.dtype)[1])
    h = p.hidden.clone().requires_grad_(True)
    kdfast.fused_linear_distillation_loss(
        h, p.weight, p.target, student_bias=p.bias, **p.teacher_kwargs(), **kwargs, tile_size=8
    ).backward()
    assert_close(h.grad, e_h, **_same_tols(h.dtype)[1])
    with torch.no_grad():
        loss = kdfast.fused_linear_distillation_loss(h, W, p.target, **p.teacher_kwargs(), **kwargs)
    assert not loss.requires_grad


# ----------------------------------------------------------------------------- teacher gets no gradient


@pytest.mark.parametrize("form", FORMS)
def test_teacher_gets_no_gradient(form, fdevice):
    p = _problem(4, 3, 20, seed=17, form=form, device=fdevice)
    if form == "dense":
        teacher = p.teacher.clone().requires_grad_(True)
        leaves = [teacher]
    elif form == "linear":
        teacher = tuple(t.clone().requires_grad_(True) for t in p.teacher)
        leaves = list(teacher)
    else:
        teacher = TopK(
            p.teacher.indices, p.teacher.logits.clone().requires_grad_(True), p.teacher.lse.clone().requires_grad_(True)
        )
        leaves = [teacher.logits, teacher.lse]
    q = Problem(p.hidden, p.weight, p.bias, p.target, form, teacher)
    for term in ("soft", "double_sigmoid", "combined_one_minus_prob"):
        h = p.hidden.clone().requires_grad_(True)
        loss = kdfast.fused_linear_distillation_loss(h, p.weight, p.target, **q.teacher_kwargs(), **TERMS[term])
        loss.backward()
        assert h.grad is not None and torch.any(h.grad != 0)
        for leaf in leaves:
            assert leaf.grad is None


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("weighting", ["sigmoid", "one_minus_prob"])
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form, target_kind, weighting, fdevice):
    """float64 gradcheck w.r.t. hidden, weight and bias, several tiles (V = 11, tile 4)."""
    p = _problem(3, 2, 11, seed=18, form=form, target_kind=target_kind, device=fdevice, ignore=(1,), k=3)
    kwargs = dict(TERMS["combined"], negative_weighting=weighting, reduction="none", tile_size=4, exact=True)
    teacher_kwargs = p.teacher_kwargs()

    def fn(h, W, b):
        return kdfast.fused_linear_distillation_loss(h, W, p.target, student_bias=b, **teacher_kwargs, **kwargs)

    inputs = (_leaf(p.hidden), _leaf(p.weight), _leaf(p.bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_second_derivative_is_an_error(fdevice):
    """The op is differentiable once: differentiating its gradients again raises (it used to
    give a silent zero), and a create_graph=True backward still gives the right first gradients."""
    p = _problem(3, 2, 11, seed=23, form="linear", target_kind="int", device=fdevice)
    kwargs = dict(TERMS["combined"], tile_size=4, exact=True)
    h, W, b = _leaf(p.hidden), _leaf(p.weight), _leaf(p.bias)
    loss = kdfast.fused_linear_distillation_loss(h, W, p.target, student_bias=b, **p.teacher_kwargs(), **kwargs)
    gh, gw = torch.autograd.grad(loss, (h, W), create_graph=True)
    _, expected = _run_dense(reference.distillation_loss, p, dict(TERMS["combined"]), dtype=torch.float64)
    assert_close(gh.detach(), expected[0], **_tols(torch.float64)[1])
    assert_close(gw.detach(), expected[1], **_tols(torch.float64)[1])
    with pytest.raises(RuntimeError, match="fused_linear_loss_backward has no second derivative"):
        (gh.pow(2).sum() + gw.sum()).backward()


# ----------------------------------------------------------------------------- opcheck


def _op_args(p: Problem, kwargs, *, tile_size=0, filter_eps=0.0):
    """The positional arguments of fused_linear_loss_forward for a problem."""
    int_target = p.target if isinstance(p.target, torch.Tensor) else None
    indptr, indices = (p.target.indptr, p.target.indices) if isinstance(p.target, MultiTarget) else (None, None)
    t_logits = p.teacher if p.form == "dense" else None
    th, tw, tb = p.teacher if p.form == "linear" else (None, None, None)
    ti, tl, ts = (p.teacher.indices, p.teacher.logits, p.teacher.lse) if p.form == "topk" else (None, None, None)
    k = dict(TERMS["hard"], **kwargs)
    return (
        p.hidden,
        p.weight,
        p.bias,
        int_target,
        indptr,
        indices,
        t_logits,
        th,
        tw,
        tb,
        ti,
        tl,
        ts,
        k.get("hard_weight", 1.0),
        k.get("soft_weight", 0.0),
        k.get("double_weight", 0.0),
        k.get("temperature", 1.0),
        k.get("negative_weighting", "sigmoid"),
        k.get("negative_scale", 1.0),
        k.get("negative_shift", 0.0),
        k.get("label_smoothing", 0.0),
        k.get("ignore_index", -100),
        tile_size,
        filter_eps,
    )


def _opcheck_problems(device):
    def grad_leaves(p):
        return Problem(_leaf(p.hidden), _leaf(p.weight), _leaf(p.bias), p.target, p.form, p.teacher)

    return {
        "dense_int_bias": (grad_leaves(_problem(4, 3, 19, seed=19, form="dense", device=device)), TERMS["combined"], 8),
        "linear_multi": (
            grad_leaves(_problem(4, 3, 19, seed=20, form="linear", target_kind="multi", bias=False, device=device)),
            TERMS["combined_one_minus_prob"],
            4,
        ),
        "topk_no_target_float32": (
            grad_leaves(_problem(4, 3, 19, seed=21, form="topk", target_kind=None, dtype=torch.float32, device=device)),
            dict(TERMS["double_one_minus_prob"], soft_weight=0.5),
            0,
        ),
    }


@pytest.mark.parametrize("case", ["dense_int_bias", "linear_multi", "topk_no_target_float32"])
def test_opcheck_forward(case, fdevice):
    p, kwargs, tile = _opcheck_problems(fdevice)[case]
    args = _op_args(p, kwargs, tile_size=tile)
    torch.library.opcheck(FORWARD_OP, args)
    losses, stats = FORWARD_OP(*args)
    assert losses.shape == (p.B,) and losses.dtype == p.hidden.dtype
    assert stats.shape == (p.B, kdfast.ops.NUM_ROW_STATS)
    assert stats.dtype == kdfast.ops.stats_dtype(p.hidden.dtype)


def test_cuda_ops_are_the_ones_the_cuda_glue_registers():
    """kdfast.ops.CUDA_OPS is csrc/cuda_ops.cpp's TORCH_LIBRARY_IMPL(kdfast, CUDA) block, and a
    build has either all of their CUDA kernels or none (none with a CPU torch)."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "cuda_ops.cpp").read_text()
    block = source[source.index("TORCH_LIBRARY_IMPL(kdfast, KDFAST_CUDA_DISPATCH_KEY, m)"):]
    assert tuple(re.findall(r'm\.impl\("(\w+)"', block)) == kdfast.ops.CUDA_OPS
    missing = kdfast.ops.missing_cuda_kernels()
    if torch.version.cuda is None:
        assert missing == list(kdfast.ops.CUDA_OPS)
    else:
        assert missing in ([], list(kdfast.ops.CUDA_OPS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
@pytest.mark.parametrize("moved", ["grad_losses", "stats"])
def test_backward_rejects_inputs_on_another_device(moved):
    """A host grad_losses or stats next to CUDA inputs would hand the CUDA kernels a host pointer."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::fused_linear_loss_backward", "CUDA"):
        pytest.skip("kdfast was built without its CUDA kernels")
    p = _problem(5, 4, 33, seed=23, form="dense", ignore=())
    p = Problem(p.hidden.cuda(), p.weight.cuda(), None, p.target.cuda(), p.form, p.teacher.cuda())
    args = _op_args(p, {})
    _, stats = FORWARD_OP(*args)
    g = torch.ones(p.B, device="cuda", dtype=stats.dtype)
    if moved == "grad_losses":
        g = g.cpu()
    else:
        stats = stats.cpu()
    with pytest.raises(ValueError, match=f"{moved} is on cpu but student_hidden is on cuda"):
        BACKWARD_OP(*((g,) + args[:13] + (stats,) + args[13:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
@pytest.mark.parametrize("on_host", ["target", "multi_target", "teacher_topk", "teacher_logits"])
def test_targets_and_teachers_on_another_device(on_host):
    """CUDA student tensors with a host target or teacher: a clear error naming it, not a host
    pointer handed to the CUDA kernels."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::fused_linear_loss_forward", "CUDA"):
        pytest.skip("kdfast was built without its CUDA kernels")
    # everything on CUDA, then the one argument under test back on the host
    form = "topk" if on_host == "teacher_topk" else "dense"
    p = _problem(5, 4, 33, seed=24, form=form, ignore=(), k=3, device="cuda")
    kwargs = {"target": p.target, "teacher_topk" if form == "topk" else "teacher_logits": p.teacher}
    if on_host == "multi_target":
        kwargs["target"] = _multi_target(5, 33, torch.Generator().manual_seed(25), "cpu")
    else:
        kwargs[on_host] = kwargs[on_host].to("cpu")
    name = {"multi_target": "target.indptr", "teacher_topk": "teacher_topk.indices"}.get(on_host, on_host)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} is on cpu but student_hidden is on cuda"):
        kdfast.fused_linear_distillation_loss(_leaf(p.hidden), p.weight, **kwargs, hard_weight=0.5, soft_weight=0.5)


@pytest.mark.parametrize("case", ["dense_int_bias", "linear_multi"])
def test_opcheck_backward(case, fdevice):
    p, kwargs, tile = _opcheck_problems(fdevice)[case]
    # the backward op's own autograd only raises (no second derivative): inputs that do not
    # require grad, so that opcheck's autograd tests do not differentiate it
    p = Problem(
        p.hidden.detach(), p.weight.detach(), None if p.bias is None else p.bias.detach(), p.target, p.form, p.teacher
    )
    args = _op_args(p, kwargs, tile_size=tile)
    _, stats = FORWARD_OP(*args)
    g = _grad_out(p, "none", seed=22)
    bwd_args = (g,) + args[:13] + (stats,) + args[13:]
    torch.library.opcheck(BACKWARD_OP, bwd_args)
    gh, gw, gb = BACKWARD_OP(*bwd_args)
    # the backward op is the gradient of sum(g * losses)
    _, expected = _run_dense(reference.distillation_loss, p, dict(kwargs, reduction="none"), g, torch.float64)
    _, tol = _tols(torch.float64)
    assert_close(gh, expected[0], **tol)
    assert_close(gw, expected[1], **tol)
    if p.bias is None:
        assert gb.shape == (0,)
    else:
        assert_close(gb, expected[2], **tol)


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_multitarget_topk(fdevice):
    torch._dynamo.reset()
    kwargs = dict(TERMS["combined_one_minus_prob"], reduction="mean", tile_size=16)

    def loss_fn(h, W, b, target, topk):
        return kdfast.fused_linear_distillation_loss(h, W, target, student_bias=b, teacher_topk=topk, **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    p = _problem(6, 5, 50, seed=23, form="topk", target_kind="multi", dtype=torch.float32, device=fdevice)
    results = []
    for fn in (compiled, loss_fn):
        h, W, b = _leaf(p.hidden), _leaf(p.weight), _leaf(p.bias)
        results.append(_backward(fn(h, W, b, p.target, p.teacher), (h, W, b), None))
    _assert_same(
        results[0], results[1], {"rtol": 1e-6, "atol": 1e-6}, {"rtol": 1e-6, "atol": 1e-7}, what="compiled vs eager"
    )


def test_torch_compile_fullgraph_linear_teacher_none(fdevice):
    torch._dynamo.reset()
    kwargs = dict(TERMS["combined"], reduction="none", tile_size=8)

    def loss_fn(h, W, target, th, tw, tb):
        return kdfast.fused_linear_distillation_loss(
            h, W, target, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, **kwargs
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    p = _problem(5, 4, 37, seed=24, form="linear", target_kind="int", device=fdevice)
    g = _grad_out(p, "none")
    results = []
    for fn in (compiled, loss_fn):
        h, W = _leaf(p.hidden), _leaf(p.weight)
        out = _backward(fn(h, W, p.target, *p.teacher), (h, W), g)
        results.append((out[0], out[1] + (None,)))
    _assert_same(results[0], results[1], *_same_tols(torch.float64), what="compiled vs eager")


# ----------------------------------------------------------------------------- bf16


def _low_precision_dense(p: Problem, kwargs, grad_out):
    """The same maths in the inputs' low precision by PyTorch: F.linear in bf16, then the reference."""
    return _run_dense(reference.distillation_loss, p, kwargs, grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("term", ["hard_smoothed", "soft", "double_sigmoid", "double_one_minus_prob", "combined"])
@pytest.mark.parametrize("form", FORMS)
def test_half_precision_within_twice_low_precision_reference_error(form, term, reduction, dtype, fdevice, cpu_bf16_gemm):
    """bf16 (and fp16) inputs (fp32 accumulation inside), exact=True: the error against the float64
    reference on the same rounded inputs is at most 2x that of F.linear + the reference computed in
    that dtype by PyTorch, plus one rounding of the output (half an ulp of its largest value)."""
    target_kind = "multi" if term == "combined" else "int"
    p = _problem(8, 16, 203, seed=25, form=form, target_kind=target_kind, dtype=dtype, device=fdevice)
    kwargs = dict(TERMS[term], reduction=reduction)
    g = _grad_out(p, reduction)
    loss, grads = _run_fused(p, kwargs, g, exact=True, tile_size=32)
    assert loss.dtype == dtype and all(x.dtype == dtype for x in grads)
    exact_loss, exact_grads = _run_dense(reference.distillation_loss, p, kwargs, g, torch.float64)
    low_loss, low_grads = _low_precision_dense(p, kwargs, g)
    half_ulp = torch.finfo(dtype).eps / 2
    for what, got, low, exact in zip(
        ("loss",) + GRAD_NAMES, (loss,) + grads, (low_loss,) + low_grads, (exact_loss,) + exact_grads
    ):
        err = (got.double() - exact).abs().max().item()
        err_low = (low.double() - exact).abs().max().item()
        bound = 2 * err_low + half_ulp * exact.abs().max().item()
        assert err <= bound, (
            f"{what}: kdfast {dtype} error {err:.3g} > 2 x PyTorch-{dtype} error {err_low:.3g} + half ulp"
        )


@pytest.mark.parametrize("term", ["hard_smoothed", "combined", "combined_one_minus_prob"])
@pytest.mark.parametrize("form", FORMS)
def test_float32_with_tf32_allowed_within_tf32_error(form, term, fdevice, set_tf32):
    """float32 inputs with torch.backends.cuda.matmul.allow_tf32 on: CUDA's fused kernels then
    multiply in tf32 (10-bit mantissas), the CPU keeps float32. Loss and gradients within 2^-8 of
    their largest float64 value (tf32 rounds each product's inputs by up to 2^-11; measured
    2e-4 to 1e-3 of it under the emulation)."""
    set_tf32(True)
    p = _problem(70, 24, 300, seed=45, form=form, target_kind="multi", dtype=torch.float32, d_t=40, k=7,
                 device=fdevice)
    kwargs = dict(TERMS[term], reduction="none")
    g = _grad_out(p, "none")
    loss, grads = _run_fused(p, kwargs, g, exact=True)
    assert loss.dtype == torch.float32 and all(x.dtype == torch.float32 for x in grads)
    exact_loss, exact_grads = _run_dense(reference.distillation_loss, p, kwargs, g, torch.float64)
    for what, got, want in zip(("loss",) + GRAD_NAMES, (loss,) + grads, (exact_loss,) + exact_grads):
        err = (got.double() - want).abs().max().item()
        assert err <= 2.0**-8 * want.abs().max().item(), f"{what}: error {err:.3g} of {want.abs().max().item():.3g}"


@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_cpu_bf16_gemm_matches_float32_gemm(form, target_kind, monkeypatch):
    """CPU, bf16 inputs: MKL's bf16 GEMM (dL/dF as bf16 hi + lo) and the upcast float32 GEMMs give
    the same loss and gradients up to one bf16 rounding (or 2^-16 of the largest entry, the split's
    error, where a sum cancels to a small value), in at most 1% of the entries (dL/dF rounded to bf16
    alone, without lo, moves ~10% of grad_weight's entries by a rounding at B = 64), and errors
    against float64 no larger than the float32 path's by more than that."""
    monkeypatch.setenv("KDFAST_CPU_BF16_GEMM", "1")
    if not kdfast.ops.cpu_bf16_gemm_status().startswith("on"):
        pytest.skip(f"the CPU bf16 GEMM is not available: {kdfast.ops.cpu_bf16_gemm_status()}")
    p = _problem(64, 40, 3001, seed=31, form=form, target_kind=target_kind, dtype=torch.bfloat16, scale=2.0)
    kwargs = dict(TERMS["combined"], reduction="sum")
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("KDFAST_CPU_BF16_GEMM", mode)
        results[mode] = _run_fused(p, kwargs, exact=True, tile_size=256)
    (loss, grads), (loss32, grads32) = results["1"], results["0"]
    _, exact = _run_dense(reference.distillation_loss, p, kwargs, None, torch.float64)
    eps = torch.finfo(torch.bfloat16).eps
    assert_close(loss.float(), loss32.float(), rtol=eps, atol=0)
    for name, g, g32, e in zip(GRAD_NAMES, grads, grads32, exact):
        g, g32 = g.double(), g32.double()
        slack = 2.0**-16 * g32.abs().max()
        assert torch.all((g - g32).abs() <= eps * g32.abs() + slack), f"{name}: more than one rounding apart"
        differ = (g != g32).double().mean().item()
        assert differ <= 0.01, f"{name}: {differ:.1%} of the entries differ"
        err, err32 = (g - e).abs().max().item(), (g32 - e).abs().max().item()
        assert err <= err32 + slack, f"{name}: error {err:.3g} against float64, float32 path {err32:.3g}"


# ----------------------------------------------------------------------------- gradient filtering


def _peaked_problem(dtype, device, seed=26):
    """Each row's target logit ~10 above the others (V = 4096): background softmax entries ~4e-5,
    below filter_eps = 1e-3, so only the tiles holding a target are kept."""
    B, d, V = 8, 16, 4096
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=torch.float64)
    h = h / h.norm(dim=1, keepdim=True)
    W = 0.05 * torch.randn(V, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B,), generator=g)
    W[target] = 10.0 * h  # f_y = 10 ||h||^2 = 10
    bias = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    return Problem(h.to(device, dtype), W.to(device, dtype), bias.to(device, dtype), target.to(device), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_filtered_gradient_within_stated_bound(dtype, fdevice, cpu_bf16_gemm):
    """exact=False with filter_eps: the gradient differs from exact (tiles are really skipped), but
    by at most filter_eps * |g_i| * sum_j ||W_j|| per grad_hidden row and filter_eps * sum_i |g_i| ||h_i||
    per grad_weight row (per the docstring: each skipped entry moves grad_hidden[i] by
    <= eps |g_i| ||W_j|| and grad_weight[j] by <= eps |g_i| ||h_i||). A skipped tile's grad_weight rows
    are zero, a kept tile's equal the exact ones, and every skipped tile's true |dL/df| is below the
    threshold."""
    eps, tile = 1e-3, 64
    p = _peaked_problem(dtype, fdevice)
    kwargs = {"reduction": "none", "label_smoothing": 0.0}
    g = _grad_out(p, "none", seed=27)
    g[3] = 0.0  # a zero upstream gradient: its row's threshold is 0
    _, exact = _run_fused(p, kwargs, g, exact=True, tile_size=tile)
    _, filt = _run_fused(p, kwargs, g, exact=False, filter_eps=eps, tile_size=tile)
    (eh, ew, eb), (fh, fw, fb) = exact, filt
    # the filtered result really differs from exact: most tiles skipped
    skipped = [t for t in range(0, p.V, tile) if torch.all(fw[t : t + tile] == 0) and torch.any(ew[t : t + tile] != 0)]
    assert len(skipped) >= p.V // tile - p.B - 1, f"only {len(skipped)} tiles skipped"
    if dtype == torch.float32:  # (in bf16 the grad_hidden change may be below one rounding)
        assert (fh - eh).abs().max() > 1e-5, "grad_hidden unchanged by filtering"
    kept = [t for t in range(0, p.V, tile) if t not in skipped]
    same = _same_tols(dtype)[1]
    for t in kept:
        assert_close(fw[t : t + tile], ew[t : t + tile], **same, msg=lambda m, t=t: f"kept tile {t}: grad_weight: {m}")
        assert_close(fb[t : t + tile], eb[t : t + tile], **same, msg=lambda m, t=t: f"kept tile {t}: grad_bias: {m}")
    for t in skipped:
        assert torch.all(fb[t : t + tile] == 0)
    # every skipped tile is negligible by the float64 reference: |dL/df_ij| <= eps |g_i|
    h64, W64, b64 = p.hidden.double(), p.weight.double(), p.bias.double()
    f = F.linear(h64, W64, b64).requires_grad_(True)
    reference.distillation_loss(
        f, p.target, reduction="none", **{k: v for k, v in kwargs.items() if k != "reduction"}
    ).backward(g.double())
    for t in skipped:
        G = f.grad[:, t : t + tile].abs()
        assert torch.all(G <= eps * g.double().abs()[:, None] * 1.01 + 1e-12), f"tile {t} skipped but not negligible"
    # the stated bound
    gabs = g.double().abs()
    slack = torch.finfo(dtype).eps  # one rounding of the output, relative
    bound_h = eps * gabs * W64.norm(dim=1).sum() + slack * eh.double().abs().amax(1)
    diff_h = (fh.double() - eh.double()).abs().amax(1)
    assert torch.all(diff_h <= bound_h), f"grad_hidden off by {diff_h.tolist()} > {bound_h.tolist()}"
    bound_w = eps * (gabs * h64.norm(dim=1)).sum() + slack * ew.double().abs().amax(1)
    diff_w = (fw.double() - ew.double()).abs().amax(1)
    assert torch.all(diff_w <= bound_w), f"grad_weight off by {diff_w.max().item()} > {bound_w.min().item()}"
    bound_b = eps * gabs.sum() + slack * eb.double().abs()
    assert torch.all((fb.double() - eb.double()).abs() <= bound_b)


def test_default_filter_eps():
    assert kdfast.default_filter_eps(torch.float64) == 0.0
    assert kdfast.default_filter_eps(torch.float32) == 2.0**-24
    assert kdfast.default_filter_eps(torch.bfloat16) == 2.0**-12
    assert kdfast.default_filter_eps(torch.float16) == 2.0**-12


def test_filtering_off_in_float64_and_with_exact(fdevice):
    """float64 defaults to no filtering: exact=False gives exactly exact=True; so does filter_eps=0."""
    p = _peaked_problem(torch.float64, fdevice)
    g = _grad_out(p, "none")
    a = _run_fused(p, {"reduction": "none"}, g, exact=True, tile_size=64)
    b = _run_fused(p, {"reduction": "none"}, g, exact=False, tile_size=64)
    p32 = _peaked_problem(torch.float32, fdevice)
    c = _run_fused(p32, {"reduction": "none"}, g.float(), exact=True, tile_size=64)
    d = _run_fused(p32, {"reduction": "none"}, g.float(), exact=False, filter_eps=0.0, tile_size=64)
    e = _run_fused(p32, {"reduction": "none"}, g.float(), exact=True, filter_eps=0.5, tile_size=64)  # exact wins
    for x, y in ((a, b), (c, d), (c, e)):
        _assert_same(x, y, *_same_tols(x[0].dtype), what="filtering off")
        assert torch.all((x[1][1] == 0) == (y[1][1] == 0))  # no tile zeroed


# ----------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, kdfast

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    B, d, V = 64, 16, 2_000_000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, d, generator=g).requires_grad_(True)
    W = (0.25 * torch.randn(V, d, generator=g)).requires_grad_(True)
    b = torch.zeros(V).requires_grad_(True)
    target = torch.randint(0, V, (B,), generator=g)
    multi = kdfast.MultiTarget.from_lists([{int(target[i]), (int(target[i]) * 7 + 1) % V} for i in range(B)])
    k = 32
    idx = torch.randint(0, V, (B, k), generator=g)
    topk = kdfast.TopK(idx, torch.randn(B, k, generator=g) + 3.0, torch.full((B,), 15.0))
    # warm up (thread pools, allocator) on a small problem
    kdfast.fused_linear_distillation_loss(
        h.detach().requires_grad_(True), W[:1000].detach().requires_grad_(True), target % 1000).backward()
    cases = {
        "hard": dict(target=target),
        "pal_topk_double": dict(target=multi, teacher_topk=topk, hard_weight=0.5, double_weight=1.0,
                                soft_weight=0.5, negative_weighting="one_minus_prob"),
    }
    out = {}
    for name, kw in cases.items():
        reset_peak()
        base = status("VmRSS")
        loss = kdfast.fused_linear_distillation_loss(h, W, student_bias=b, **kw)
        loss.backward()
        peak = status("VmHWM")
        returned = sum(t.grad.numel() * t.grad.element_size() for t in (h, W, b))
        out[name] = {"growth": peak - base, "returned": returned, "loss": loss.item()}
        h.grad = W.grad = b.grad = None
        del loss
    # control: the measurement sees one [B, V] float buffer
    reset_peak()
    base = status("VmRSS")
    logits = torch.ones(B, V)
    out["control"] = {"growth": status("VmHWM") - base, "returned": 0, "loss": float(logits[0, 0])}
    del logits
    print(json.dumps(out))
    """
)


def test_memory_no_batch_times_classes_allocation():
    """B = 64, V = 2,000,000, d = 16, float32 forward + backward: the peak RSS growth beyond the
    returned gradients must stay well under one [B, V] float buffer (512 MB)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    import json

    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one_bv_buffer = 64 * 2_000_000 * 4
    control = result.pop("control")
    assert control["growth"] >= 0.95 * one_bv_buffer, f"the RSS measurement missed a [B, V] buffer: {control}"
    assert set(result) == {"hard", "pal_topk_double"}
    for name, r in result.items():
        assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e6, (name, r)
        extra = r["growth"] - r["returned"]
        assert extra < 128 * 2**20, (
            f"{name}: peak RSS growth {r['growth'] / 2**20:.0f} MiB, {extra / 2**20:.0f} MiB beyond the returned "
            f"gradients (one B x V float buffer is {one_bv_buffer / 2**20:.0f} MiB)"
        )


# ----------------------------------------------------------------------------- API surface


@pytest.mark.parametrize("form", ["dense", "topk", "linear_teacher", "tuple2", "tuple3"])
def test_module_equals_function(form, fdevice):
    base_form = {"linear_teacher": "linear", "tuple2": "linear", "tuple3": "linear"}.get(form, form)
    p = _problem(5, 4, 40, seed=28, form=base_form, target_kind="multi", device=fdevice, teacher_bias=form != "tuple2")
    kwargs = dict(TERMS["combined_one_minus_prob"], reduction="sum", tile_size=16)
    if form == "linear_teacher":
        teacher = kdfast.LinearTeacher(*p.teacher)
    elif form == "tuple2":
        teacher = p.teacher[:2]
    else:
        teacher = p.teacher
    module = kdfast.FusedLinearDistillationLoss(**kwargs)
    assert isinstance(module, torch.nn.Module)
    assert "one_minus_prob" in repr(module)
    h, W, b = _leaf(p.hidden), _leaf(p.weight), _leaf(p.bias)
    got = _backward(module(W, h, p.target, b, teacher=teacher), (h, W, b), None)
    expected = _run_fused(p, kwargs)
    _assert_same(got, expected, *_same_tols(torch.float64), what=f"module {form}")
    # hard-only module without a teacher
    module = kdfast.FusedLinearDistillationLoss(label_smoothing=0.1)
    h, W = _leaf(p.hidden), _leaf(p.weight)
    got = _backward(module(W, h, p.target), (h, W), None)
    expected = _run_fused(Problem(p.hidden, p.weight, None, p.target, None, None), {"label_smoothing": 0.1})
    assert_close(got[0], expected[0], **_same_tols(torch.float64)[0])
    assert_close(got[1][1], expected[1][1], **_same_tols(torch.float64)[1])


def test_module_rejects_forward_arguments_as_keywords():
    with pytest.raises(TypeError, match="teacher_logits"):
        kdfast.FusedLinearDistillationLoss(teacher_logits=torch.zeros(1, 1))


def test_dlpack_numpy_inputs():
    p = _problem(4, 3, 15, seed=29, form="dense", dtype=torch.float32)
    kwargs = dict(TERMS["combined"], reduction="none")
    expected = kdfast.fused_linear_distillation_loss(
        p.hidden, p.weight, p.target, student_bias=p.bias, teacher_logits=p.teacher, **kwargs
    )
    loss = kdfast.fused_linear_distillation_loss(
        p.hidden.numpy(),
        p.weight.numpy(),
        p.target.numpy(),
        student_bias=p.bias.numpy(),
        teacher_logits=p.teacher.numpy(),
        **kwargs,
    )
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float32
    assert_close(loss, expected, **_same_tols(torch.float32)[0])
    q = _problem(4, 3, 15, seed=29, form="linear", dtype=torch.float32)
    th, tw, tb = q.teacher
    expected = kdfast.fused_linear_distillation_loss(
        q.hidden, q.weight, q.target, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, **kwargs
    )
    loss = kdfast.fused_linear_distillation_loss(
        q.hidden.numpy(),
        q.weight.numpy(),
        q.target.numpy(),
        teacher_hidden=th.numpy(),
        teacher_weight=tw.numpy(),
        teacher_bias=tb.numpy(),
        **kwargs,
    )
    assert_close(loss, expected, **_same_tols(torch.float32)[0])
    with pytest.raises(TypeError, match="student_hidden"):
        kdfast.fused_linear_distillation_loss(p.hidden.tolist(), p.weight, p.target)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    B, d, V = 4, 3, 6
    p = _problem(B, d, V, seed=30, form="dense", ignore=())
    h, W, b, t, s = p.hidden, p.weight, p.bias, p.target, p.teacher
    lin = _problem(B, d, V, seed=31, form="linear", d_t=5).teacher
    topk = _problem(B, d, V, seed=32, form="topk", k=3).teacher
    mt = MultiTarget.from_lists([[0, 2], [], [5], [1, 3, 4]])
    soft = {"hard_weight": 0.0, "soft_weight": 1.0}

    def mt_with(indptr=None, indices=None):
        return MultiTarget(
            mt.indptr if indptr is None else torch.tensor(indptr),
            mt.indices if indices is None else torch.tensor(indices),
        )

    def topk_with(**kw):
        return topk._replace(**kw)

    return {
        # name: (args, kwargs, exception, message pattern)
        # --- what the dense op rejects
        "integer_hidden": ((h.long(), W, t), {}, TypeError, "student_hidden"),
        "1d_hidden": ((h[0], W, t[:1]), {}, ValueError, "student_hidden"),
        "reduction_unknown": ((h, W, t), {"reduction": "avg"}, ValueError, "reduction"),
        "hard_weight_negative": ((h, W, t), {"hard_weight": -1.0}, ValueError, "hard_weight"),
        "soft_weight_negative": ((h, W, t), {"soft_weight": -0.5, "teacher_logits": s}, ValueError, "soft_weight"),
        "all_weights_zero": ((h, W, t), {"hard_weight": 0.0, "teacher_logits": s}, ValueError, "weight"),
        "temperature_zero": ((h, W, t), dict(soft, temperature=0.0, teacher_logits=s), ValueError, "temperature"),
        "temperature_negative": ((h, W, t), dict(soft, temperature=-1.0, teacher_logits=s), ValueError, "temperature"),
        "negative_scale_zero": (
            (h, W, t),
            {"double_weight": 1.0, "negative_scale": 0.0, "teacher_logits": s},
            ValueError,
            "negative_scale",
        ),
        "negative_weighting_unknown": (
            (h, W, t),
            {"double_weight": 1.0, "negative_weighting": "softmax", "teacher_logits": s},
            ValueError,
            "negative_weighting",
        ),
        "label_smoothing_above_1": ((h, W, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        "soft_without_teacher": ((h, W, t), {"soft_weight": 1.0}, ValueError, "teacher"),
        "double_without_teacher": ((h, W, t), {"hard_weight": 0.0, "double_weight": 1.0}, ValueError, "teacher"),
        "hard_without_target": ((h, W, None), dict(soft, hard_weight=1.0, teacher_logits=s), ValueError, "target"),
        "target_int32": ((h, W, t.int()), {}, TypeError, "target"),
        "target_shape": ((h, W, t[:3]), {}, ValueError, "target"),
        "teacher_logits_shape": ((h, W, t), dict(soft, teacher_logits=s[:, :5]), ValueError, "teacher_logits"),
        "teacher_logits_dtype": ((h, W, t), dict(soft, teacher_logits=s.float()), TypeError, "teacher_logits"),
        "filter_eps_negative": ((h, W, t), {"filter_eps": -1.0}, ValueError, "filter_eps"),
        "tile_size_negative": ((h, W, t), {"tile_size": -4}, ValueError, "tile_size"),
        "tile_size_float": ((h, W, t), {"tile_size": 2.9}, TypeError, "tile_size"),
        "tile_size_string": ((h, W, t), {"tile_size": "4"}, TypeError, "tile_size"),
        "filter_eps_inf": ((h, W, t), {"filter_eps": float("inf")}, ValueError, "filter_eps"),
        "filter_eps_negative_exact": ((h, W, t), {"filter_eps": -1.0, "exact": True}, ValueError, "filter_eps"),
        "exact_not_bool": ((h, W, t), {"exact": "no"}, TypeError, "exact"),
        "ignore_index_float": ((h, W, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        "ignore_index_none": ((h, W, t), {"ignore_index": None}, TypeError, "ignore_index"),
        "temperature_inf": ((h, W, t), dict(soft, temperature=float("inf"), teacher_logits=s), ValueError, "temperature"),
        # 1/temperature overflows float32 (it gave NaN losses); float64 accumulation takes it
        "temperature_below_float32": ((h.float(), W.float(), t), dict(soft, temperature=1e-39, teacher_logits=s.float()),
                                      ValueError, r"temperature must be in \[2\.9\d*e-39, .*Float accumulation"),
        "hard_weight_inf": ((h, W, t), {"hard_weight": float("inf")}, ValueError, "hard_weight"),
        "negative_shift_nan": (
            (h, W, t), {"double_weight": 1.0, "negative_shift": float("nan"), "teacher_logits": s}, ValueError,
            "negative_shift",
        ),
        # --- the student's linear layer
        "d_mismatch": ((h, W[:, :2], t), {}, ValueError, r"student_weight has d = 2 but student_hidden has d = 3"),
        "weight_dtype": ((h, W.float(), t), {}, TypeError, "student_weight"),
        "weight_1d": ((h, W[:, 0], t), {}, ValueError, "student_weight"),
        "bias_shape": ((h, W, t), {"student_bias": b[:5]}, ValueError, "student_bias"),
        "bias_2d": ((h, W, t), {"student_bias": b[None]}, ValueError, "student_bias"),
        "bias_dtype": ((h, W, t), {"student_bias": b.float()}, TypeError, "student_bias"),
        # --- the teacher
        "teacher_weight_V": (
            (h, W, t),
            dict(soft, teacher_hidden=lin[0], teacher_weight=lin[1][:5]),
            ValueError,
            "teacher_weight",
        ),
        "teacher_weight_d_t": (
            (h, W, t),
            dict(soft, teacher_hidden=lin[0], teacher_weight=lin[1][:, :4]),
            ValueError,
            "teacher_weight",
        ),
        "teacher_hidden_B": (
            (h, W, t),
            dict(soft, teacher_hidden=lin[0][:3], teacher_weight=lin[1]),
            ValueError,
            "teacher_hidden",
        ),
        "teacher_hidden_only": ((h, W, t), dict(soft, teacher_hidden=lin[0]), ValueError, "teacher_weight"),
        "teacher_bias_without_weight": ((h, W, t), dict(soft, teacher_bias=lin[2]), ValueError, "teacher_bias"),
        "teacher_bias_with_dense": (
            (h, W, t),
            dict(soft, teacher_logits=s, teacher_bias=lin[2]),
            ValueError,
            "teacher_bias",
        ),
        "teacher_bias_shape": (
            (h, W, t),
            dict(soft, teacher_hidden=lin[0], teacher_weight=lin[1], teacher_bias=lin[2][:4]),
            ValueError,
            "teacher_bias",
        ),
        "two_teachers_dense_topk": (
            (h, W, t),
            dict(soft, teacher_logits=s, teacher_topk=topk),
            ValueError,
            "teacher_logits and teacher_topk",
        ),
        "two_teachers_dense_linear": (
            (h, W, t),
            dict(soft, teacher_logits=s, teacher_hidden=lin[0], teacher_weight=lin[1]),
            ValueError,
            "teacher_logits and teacher_hidden",
        ),
        "two_teachers_linear_topk": (
            (h, W, t),
            dict(soft, teacher_topk=topk, teacher_hidden=lin[0], teacher_weight=lin[1]),
            ValueError,
            "teacher_hidden/teacher_weight and teacher_topk",
        ),
        "topk_not_a_topk": ((h, W, t), dict(soft, teacher_topk=tuple(topk[:3])), TypeError, "teacher_topk"),
        "topk_k_above_V": (
            (h, W, t),
            dict(soft, teacher_topk=TopK(torch.zeros(B, 7, dtype=torch.long), torch.zeros(B, 7), topk.lse)),
            ValueError,
            r"teacher_topk has k = 7\b",
        ),
        "topk_k_zero": (
            (h, W, t),
            dict(soft, teacher_topk=TopK(torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, 0), topk.lse)),
            ValueError,
            r"teacher_topk has k = 0\b",
        ),
        "topk_logits_shape": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(logits=topk.logits[:, :2])),
            ValueError,
            "teacher_topk.logits",
        ),
        "topk_lse_shape": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(lse=topk.lse[:3])),
            ValueError,
            "teacher_topk.lse",
        ),
        "topk_indices_rows": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(indices=topk.indices[:3], logits=topk.logits[:3])),
            ValueError,
            "teacher_topk.indices",
        ),
        "topk_indices_int32": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(indices=topk.indices.int())),
            TypeError,
            "teacher_topk.indices",
        ),
        "topk_index_too_large": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(indices=topk.indices.clone().index_fill_(1, torch.tensor([1]), V))),
            ValueError,
            r"teacher_topk.indices\[0, 1\] = 6",
        ),
        "topk_index_negative": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(indices=topk.indices.clone().index_fill_(1, torch.tensor([2]), -1))),
            ValueError,
            r"teacher_topk.indices\[0, 2\] = -1",
        ),
        "topk_index_repeated": (
            (h, W, t),
            dict(soft, teacher_topk=topk_with(indices=topk.indices.clone().index_copy_(1, torch.tensor([2]),
                                                                                   topk.indices[:, :1]))),
            ValueError,
            r"teacher_topk.indices\[0\] holds class \d+ more than once",
        ),
        "topk_lse_not_at_temperature_1": (  # one_minus_prob reads exp(s - lse): lse must be LSE(s)
            (h, W, t),
            {"hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "one_minus_prob",
             "teacher_topk": topk_with(temperature=2.0)},
            ValueError,
            r"teacher_topk.temperature = 2.0",
        ),
        # --- MultiTarget
        "multi_unsorted": ((h, W, mt_with(indices=[0, 2, 5, 3, 1, 4])), {}, ValueError, "target.indices.*sorted"),
        "multi_index_too_large": (
            (h, W, mt_with(indices=[0, 2, 6, 1, 3, 4])),
            {},
            ValueError,
            r"target.indices\[2\] = 6",
        ),
        "multi_index_negative": (
            (h, W, mt_with(indices=[-1, 2, 5, 1, 3, 4])),
            {},
            ValueError,
            r"target.indices\[0\] = -1",
        ),
        "multi_indptr_short": ((h, W, mt_with(indptr=[0, 2, 2, 3])), {}, ValueError, "target.indptr"),
        "multi_indptr_long": ((h, W, mt_with(indptr=[0, 2, 2, 3, 6, 6])), {}, ValueError, "target.indptr"),
        "multi_indptr_start": ((h, W, mt_with(indptr=[1, 2, 2, 3, 6])), {}, ValueError, r"target.indptr\[0\]"),
        "multi_indptr_end": ((h, W, mt_with(indptr=[0, 2, 2, 3, 5])), {}, ValueError, r"target.indptr\[-1\]"),
        "multi_indptr_decreasing": ((h, W, mt_with(indptr=[0, 3, 2, 3, 6])), {}, ValueError, "target.indptr"),
        "multi_indptr_int32": ((h, W, MultiTarget(mt.indptr.int(), mt.indices)), {}, TypeError, "target.indptr"),
        "multi_indices_2d": ((h, W, MultiTarget(mt.indptr, mt.indices[None])), {}, ValueError, "target.indices"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_naming_the_argument(case, host_index_checks):
    args, kwargs, exception, pattern = _bad_cases()[case]
    with pytest.raises(exception, match=pattern):
        kdfast.fused_linear_distillation_loss(*args, **kwargs)


def test_module_rejects_a_teacher_of_no_known_form():
    p = _problem(4, 3, 6, seed=33, form="linear", d_t=5)
    module = kdfast.FusedLinearDistillationLoss(hard_weight=0.0, soft_weight=1.0)
    with pytest.raises(TypeError, match="teacher must be"):
        module(p.weight, p.hidden, teacher={"hidden": p.teacher[0]})
    # a list is taken as the (hidden, weight[, bias]) tuple
    expected = module(p.weight, p.hidden, teacher=tuple(p.teacher))
    assert torch.equal(module(p.weight, p.hidden, teacher=list(p.teacher)), expected)


def test_numpy_scalar_keywords_are_accepted():
    """numpy scalars (as a config file or an array lookup gives) are numbers like any other."""
    p = _problem(4, 3, 6, seed=34, form="dense")
    kwargs = {"hard_weight": 0.5, "soft_weight": 0.5, "temperature": 2.0, "ignore_index": -100, "tile_size": 4}
    expected = kdfast.fused_linear_distillation_loss(p.hidden, p.weight, p.target, teacher_logits=p.teacher, **kwargs)
    np_kwargs = {"hard_weight": np.float32(0.5), "soft_weight": np.float64(0.5), "temperature": np.float32(2.0),
                     "ignore_index": np.int64(-100), "tile_size": np.int32(4)}
    got = kdfast.fused_linear_distillation_loss(p.hidden, p.weight, p.target, teacher_logits=p.teacher, **np_kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "bad_target, ignore_index",
    [(6, -100), (1000, -100), (-1, -100), (-100, -1)],
    ids=["V", "far_above_V", "minus_1", "default_ignore_index_not_ignored"],
)
def test_target_out_of_range_raises(bad_target, ignore_index, fdevice, host_index_checks):
    """Target values are checked by the kernel (a ValueError naming target), also by the raw op
    (on the CUDA code path with host checks on; its default device check:
    test_cuda_index_checks.py)."""
    p = _problem(4, 3, 6, seed=33, form="dense", ignore=(), device=fdevice)
    p.target[2] = bad_target
    h = _leaf(p.hidden)
    with pytest.raises(ValueError, match=rf"target\[2\] = {bad_target}\b"):
        kdfast.fused_linear_distillation_loss(
            h,
            p.weight,
            p.target,
            ignore_index=ignore_index,
            reduction="none",
            teacher_logits=p.teacher,
            **TERMS["combined"],
        )
    with pytest.raises(ValueError, match="target"):
        FORWARD_OP(*_op_args(p, {"ignore_index": ignore_index}))


@pytest.mark.parametrize(
    "case",
    [
        "multi_unsorted",
        "multi_index_too_large",
        "multi_indptr_start",
        "multi_indptr_end",
        "topk_index_too_large",
        "topk_index_repeated",
        "topk_k_above_V",
        "d_mismatch",
        "teacher_weight_V",
    ],
)
def test_raw_op_rejects_bad_input_too(case, fdevice, host_index_checks):
    """The op checks what the Python layer may not (values, and shapes when called directly), on
    every device (on CUDA: the glue's checks, csrc/cuda_ops.cpp)."""
    args, kwargs, exception, pattern = _bad_cases()[case]
    h, W, target = args
    kw = dict(TERMS["hard"], **kwargs)
    teacher = {k: kw.pop(k) for k in list(kw) if k.startswith("teacher")}
    form, t = None, None
    if "teacher_topk" in teacher:
        form, t = "topk", teacher["teacher_topk"]
    elif "teacher_hidden" in teacher:
        form, t = "linear", (teacher["teacher_hidden"], teacher["teacher_weight"], None)
    p = Problem(h, W, None, target, form, t)
    op_args = [a.to(fdevice) if isinstance(a, torch.Tensor) else a for a in _op_args(p, kw)]
    with pytest.raises(exception, match=pattern):
        FORWARD_OP(*op_args)
