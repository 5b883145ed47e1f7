"""Tests of ``kdfast.distillation_loss`` (and its op, module and bad-input errors).

The oracle is :mod:`kdfast.reference` (plain PyTorch, run in float64 on the same
inputs upcast exactly); torch's own ``F.cross_entropy`` and ``F.kl_div`` pin the
hard and soft terms where they apply.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

import kdfast
from kdfast import reference

FORWARD_OP = torch.ops.kdfast.distillation_loss_forward.default
BACKWARD_OP = torch.ops.kdfast.distillation_loss_backward.default

REDUCTIONS = ["none", "sum", "mean"]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# Every term alone and combined; scale/shift are deliberately not (1, 0).
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
    "double_one_minus_prob": {
        "hard_weight": 0.0,
        "double_weight": 1.0,
        "negative_weighting": "one_minus_prob",
        "negative_scale": 2.5,
        "negative_shift": 0.7,
    },
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
TERMS_WITH_TEACHER = [name for name, kw in TERMS.items() if kw.get("soft_weight", 0) or kw.get("double_weight", 0)]


# ----------------------------------------------------------------------------- helpers


def _inputs(B, V, *, seed, dtype=torch.float64, device="cpu", scale=2.0, ignore=(), ignore_index=-100):
    """Student logits, target and teacher logits drawn from a fixed seed (target rows in
    ``ignore`` are set to ``ignore_index``)."""
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
    teacher = scale * torch.randn(B, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B,), generator=g)
    for i in ignore:
        target[i] = ignore_index
    return student.to(device, dtype), target.to(device), teacher.to(device, dtype)


def _needs_teacher(kwargs):
    return kwargs.get("soft_weight", 0) > 0 or kwargs.get("double_weight", 0) > 0


def _tols(dtype, kwargs=None, reduction="mean", B=1):
    """(loss tolerance, gradient tolerance) for comparing kdfast in ``dtype`` with the
    float64 reference. float64 is tight (an fp32 accumulation would fail it); float32
    allows a few ulps of the row quantities, which the soft term scales by T**2 (loss)
    and T (gradient), and which a "sum" adds up over the rows."""
    kwargs = kwargs or {}
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}, {"rtol": 1e-10, "atol": 1e-12}
    T = kwargs.get("temperature", 1.0)
    w = max(1.0, kwargs.get("hard_weight", 1.0) + kwargs.get("soft_weight", 0.0) + kwargs.get("double_weight", 0.0))
    rows = B if reduction == "sum" else 1
    loss_tol = {"rtol": 1e-5, "atol": 1e-5 * w * max(1.0, T * T) * max(1, rows)}
    grad_tol = {"rtol": 1e-5, "atol": 1e-6 * w * max(1.0, T)}
    return loss_tol, grad_tol


def _run(fn, student, target, teacher, kwargs, grad_out=None, dtype=None):
    """Loss and student gradient of ``fn`` on (a copy of) the inputs, optionally upcast."""
    x = student.detach().clone() if dtype is None else student.detach().to(dtype)
    x.requires_grad_(True)
    s = None if teacher is None else (teacher if dtype is None else teacher.to(dtype))
    loss = fn(x, target, s, **kwargs)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(device=loss.device, dtype=loss.dtype)
    loss.backward(g)
    return loss.detach(), x.grad


def _compare(kwargs, student, target=None, teacher=None, *, grad_out=None, tols=None):
    """Run kdfast and the float64 reference on the same inputs; compare loss and gradient.

    Returns kdfast's (loss, grad)."""
    loss, grad = _run(kdfast.distillation_loss, student, target, teacher, kwargs, grad_out)
    ref_loss, ref_grad = _run(reference.distillation_loss, student, target, teacher, kwargs, grad_out, torch.float64)
    assert loss.dtype == student.dtype
    assert loss.device == student.device
    assert loss.shape == ref_loss.shape
    assert grad is not None and grad.shape == student.shape and grad.dtype == student.dtype
    if tols is None:
        tols = _tols(student.dtype, kwargs, kwargs.get("reduction", "mean"), student.shape[0])
    loss_tol, grad_tol = tols
    assert_close(loss.to(torch.float64), ref_loss, equal_nan=True, **loss_tol)
    assert_close(grad.to(torch.float64), ref_grad, equal_nan=True, **grad_tol)
    return loss, grad


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("term", list(TERMS))
def test_terms_match_reference(term, reduction, dtype, device):
    kwargs = dict(TERMS[term], reduction=reduction)
    student, target, teacher = _inputs(8, 37, seed=1, dtype=dtype, device=device)
    if kwargs["hard_weight"] == 0:
        target = None  # every row counts
    _compare(kwargs, student, target, teacher if _needs_teacher(kwargs) else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("term", ["soft", "combined", "combined_one_minus_prob"])
def test_temperatures(term, temperature, dtype, device):
    kwargs = dict(TERMS[term], temperature=temperature)
    student, target, teacher = _inputs(6, 29, seed=2, dtype=dtype, device=device, scale=3.0)
    _compare(kwargs, student, target, teacher)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("term", ["hard", "hard_smoothed", "soft", "double_sigmoid", "combined"])
def test_ignore_index(term, ignore_index, reduction, dtype, device):
    """Ignored rows contribute to no term (also the teacher terms), are 0 under "none",
    get a zero gradient, and are not counted by "mean"; ignore_index may be a valid class."""
    kwargs = dict(TERMS[term], reduction=reduction, ignore_index=ignore_index)
    ignored = [0, 3, 4]
    student, target, teacher = _inputs(
        7, 11, seed=3, dtype=dtype, device=device, ignore=ignored, ignore_index=ignore_index
    )
    if ignore_index == 3:
        target[target == 3] = 5
        target[ignored] = 3
    g = (
        torch.randn(7, generator=torch.Generator().manual_seed(30), dtype=dtype).to(device)
        if reduction == "none"
        else None
    )
    loss, grad = _compare(kwargs, student, target, teacher, grad_out=g)
    assert torch.all(grad[ignored] == 0)
    if reduction == "none":
        assert torch.all(loss[ignored] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_rows_ignored_like_cross_entropy(label_smoothing, reduction, device):
    student, _, teacher = _inputs(4, 9, seed=4, device=device)
    target = torch.full((4,), -100, device=device)
    expected, expected_grad = _run(
        F.cross_entropy, student, target, None, {"label_smoothing": label_smoothing, "reduction": reduction}
    )
    for kwargs in ({"label_smoothing": label_smoothing}, dict(TERMS["combined"], label_smoothing=label_smoothing)):
        loss, grad = _compare(dict(kwargs, reduction=reduction), student, target, teacher)
        assert_close(loss, expected, equal_nan=True)  # NaN for "mean", 0 for "sum", zeros for "none"
        assert_close(grad, expected_grad)  # zero, not NaN
    if reduction == "mean":
        assert torch.isnan(loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_hard_term_equals_cross_entropy(label_smoothing, reduction, dtype, device):
    student, target, _ = _inputs(9, 23, seed=5, dtype=dtype, device=device, ignore=[2, 7])
    kwargs = {"label_smoothing": label_smoothing, "reduction": reduction}
    loss, grad = _run(kdfast.distillation_loss, student, target, None, kwargs)
    expected, expected_grad = _run(F.cross_entropy, student, target, None, kwargs)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(loss, expected, **tol)
    assert_close(grad, expected_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_soft_term_equals_kl_div_and_hinton_gradient(temperature, dtype, device):
    T = temperature
    B = 5
    student, _, teacher = _inputs(B, 31, seed=6, dtype=dtype, device=device)

    def torch_kd(f, _target, s):
        return T * T * F.kl_div(F.log_softmax(f / T, -1), F.softmax(s / T, -1), reduction="batchmean")

    kwargs = {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": T}
    loss, grad = _run(kdfast.distillation_loss, student, None, teacher, kwargs)
    expected, expected_grad = _run(torch_kd, student, None, teacher, {})
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 2e-5 * max(1, T * T)}
    assert_close(loss, expected, **tol)
    assert_close(grad, expected_grad, **tol)
    # Hinton: d(T^2 KL)/df = T (softmax(f/T) - softmax(s/T)), divided by B for "mean"
    hinton = T * (torch.softmax(student.double() / T, -1) - torch.softmax(teacher.double() / T, -1)) / B
    assert_close(grad.double(), hinton, **(tol if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6 * max(1, T)}))


def test_reference_sigmoid_weights_exact_in_both_tails(device):
    """The oracle's sigmoid log-weights log(1 - sigmoid(z)) = -softplus(z) against 50-digit decimal
    arithmetic, in float64, past F.softplus's threshold of 20 too (where it returns z itself, up to
    e^-20 short: 1e-9 of a double-distillation loss, which the kernels compute exactly)."""
    from decimal import Decimal, localcontext

    z = torch.tensor([-40.0, -5.0, 0.0, 5.0, 21.0, 25.0, 36.0], dtype=torch.float64)
    got = reference.log_negative_weights(z, "sigmoid", negative_scale=1.0, negative_shift=0.0)
    with localcontext() as ctx:
        ctx.prec = 50
        for zi, g in zip(z.tolist(), got.tolist()):
            exact = -(max(Decimal(zi), Decimal(0)) + (1 + (-abs(Decimal(zi))).exp()).ln())
            assert abs((Decimal(g) - exact) / exact) < 1e-15, (zi, g, exact)
    # the kernels are exact there too: weights with a (s - b) = 35 and 20.5, then 60.75 and 50.75
    f = torch.tensor([[2.0, 27.0], [1.0, 3.0]], dtype=torch.float64, device=device)
    s = torch.tensor([[14.7, 8.9], [25.0, 21.0]], dtype=torch.float64, device=device)
    kwargs = {"hard_weight": 0.0, "double_weight": 1.0, "negative_scale": 2.5, "negative_shift": 0.7,
              "reduction": "none"}
    torch.testing.assert_close(kdfast.distillation_loss(f, None, s, **kwargs),
                               reference.distillation_loss(f, None, s, **kwargs), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- shapes, layouts, values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("V", [1, 2, 7, 8, 13, 16, 17, 31, 33, 64, 65, 1031])
@pytest.mark.parametrize("term", ["hard_smoothed", "combined", "combined_one_minus_prob"])
def test_vocab_sizes(term, V, dtype, device):
    """V = 1 and V not a multiple of any vector width (tails of the vectorized loops)."""
    kwargs = dict(TERMS[term], reduction="sum")
    if V == 1 and kwargs.get("negative_weighting") == "one_minus_prob":
        kwargs["negative_weighting"] = "sigmoid"  # 1 - p = 0 for the only class: log w = -inf, loss -inf
    student, target, teacher = _inputs(5, V, seed=7 + V, dtype=dtype, device=device, ignore=[1])
    _, grad = _compare(kwargs, student, target, teacher)
    if V == 1:  # one class: the hard and soft terms and the gradient are 0 (up to rounding)
        hard = kdfast.distillation_loss(
            student, target, teacher, hard_weight=1.0, soft_weight=1.0, label_smoothing=0.1, reduction="none"
        )
        assert_close(hard, torch.zeros_like(hard), rtol=0, atol=1e-6)
        assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("term", ["combined", "combined_one_minus_prob"])
def test_many_rows(term, dtype, device):
    """Enough rows to be split between threads (at::parallel_for), some ignored."""
    B = 517
    student, target, teacher = _inputs(B, 67, seed=31, dtype=dtype, device=device, ignore=range(0, B, 7))
    grad_out = torch.randn(B, generator=torch.Generator().manual_seed(32), dtype=dtype).to(device)
    _compare(dict(TERMS[term], reduction="none"), student, target, teacher, grad_out=grad_out)
    _compare(dict(TERMS[term], reduction="mean"), student, target, teacher)


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "hard_weight": 1.0,
            "soft_weight": 1.0,
            "double_weight": 0.5,
            "temperature": 2.0,
            "negative_scale": 1.5,
            "negative_shift": 0.5,
            "label_smoothing": 0.1,
        },
        {"hard_weight": 0.5, "double_weight": 1.0, "negative_weighting": "one_minus_prob"},
    ],
    ids=["hard+soft+double_sigmoid", "hard+double_one_minus_prob"],
)
def test_amazon670k_vocab(kwargs, device):
    """V = 670,091 (Amazon-670K) in float32 against the float64 reference."""
    student, target, teacher = _inputs(2, 670_091, seed=8, dtype=torch.float32, device=device)
    # fp32 sums over 670k classes: allow ~1e-5 relative error in the partition sums
    _compare(kwargs, student, target, teacher, tols=({"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-4, "atol": 1e-9}))


_LAYOUTS = {
    # build a [B, V] view of a bigger base tensor, the strides of which are not (V, 1)
    "transposed": (lambda B, V: (V, B), lambda base, B, V: base.t()),
    "column_stride_2": (lambda B, V: (B + 2, 2 * V + 3), lambda base, B, V: base[1 : B + 1, 3 : 3 + 2 * V : 2]),
    "row_padded": (lambda B, V: (B, V + 5), lambda base, B, V: base[:, 5:]),
    "expanded_rows": (lambda B, V: (1, V), lambda base, B, V: base.expand(B, V)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("term", ["hard_smoothed", "combined", "combined_one_minus_prob"])
def test_non_contiguous_inputs(term, layout, dtype, device):
    B, V = 6, 19
    shape, view = _LAYOUTS[layout]
    g = torch.Generator().manual_seed(9)
    f_base = (2 * torch.randn(*shape(B, V), generator=g, dtype=torch.float64)).to(device, dtype)
    s_base = (2 * torch.randn(*shape(B, V), generator=g, dtype=torch.float64)).to(device, dtype)
    target = torch.randint(0, V, (2 * B,), generator=g).to(device)[::2]
    assert not target.is_contiguous()
    kwargs = dict(TERMS[term], reduction="sum")
    results = []
    for fn, ref_dtype in ((kdfast.distillation_loss, dtype), (reference.distillation_loss, torch.float64)):
        base = f_base.to(ref_dtype).clone().requires_grad_(True)
        student, teacher = view(base, B, V), view(s_base.to(ref_dtype), B, V)
        assert not student.is_contiguous() and not teacher.is_contiguous()
        loss = fn(student, target, teacher, **kwargs)
        loss.backward()
        results.append((loss.detach(), base.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    loss_tol, grad_tol = _tols(dtype, kwargs, "sum", B)
    assert_close(loss.double(), ref_loss, **loss_tol)
    assert_close(grad.double(), ref_grad, **grad_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("term", ["hard_smoothed", "soft", "double_sigmoid", "combined_one_minus_prob"])
def test_upstream_gradient_not_one(term, dtype, device):
    B = 7
    student, target, teacher = _inputs(B, 21, seed=11, dtype=dtype, device=device, ignore=[5])
    grad_out = 3 * torch.randn(B, generator=torch.Generator().manual_seed(12), dtype=dtype).to(device)
    _compare(dict(TERMS[term], reduction="none"), student, target, teacher, grad_out=grad_out)
    # and a scalar upstream gradient != 1 through "mean"
    _compare(
        dict(TERMS[term], reduction="mean"),
        student,
        target,
        teacher,
        grad_out=torch.tensor(-2.5, dtype=dtype, device=device),
    )


# Logits of +-1e4 (exact +-1e4 with ties of the max, and 1e4 * randn) and rows with -inf.
# Where the student and the teacher are both -inf (q = 0, and 0 * inf = 0 by the reference's
# convention) every term stays finite; likewise where only the teacher is -inf. Where only the
# student is -inf, the teacher terms and label smoothing put positive mass on a -inf logit: the
# loss is +inf and the gradient stays finite (softmax - q).
_EXTREME_CASES = ["pm_1e4", "inf_both", "inf_teacher", "inf_student"]


def _extreme_inputs(case, dtype, device):
    B, V = 6, 24
    g = torch.Generator().manual_seed(13)
    student = 1e4 * torch.randn(B, V, generator=g, dtype=torch.float64)
    teacher = 1e4 * torch.randn(B, V, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(B, V, generator=g) < 0.5, -1.0, 1.0).double()
    student[0], teacher[0] = 1e4 * sign[0], -1e4 * sign[0]
    student[1], teacher[1] = 1e4 * sign[1], 1e4 * sign[1]
    student[4:], teacher[4:] = student[4:] / 1e4, teacher[4:] / 1e4  # two rows of moderate values
    if case == "inf_student":
        # a moderate teacher: its probabilities on the -inf classes must not underflow (in fp32
        # either), else 0 * inf = 0 and the row would be finite
        teacher = torch.randn(B, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B,), generator=g)
    mask = torch.rand(B, V, generator=g) < 0.3
    mask[torch.arange(B), target] = False  # the target and ...
    mask[torch.arange(B), (target + 1) % V] = False  # ... one more class per row stay finite
    mask[:, 0] = mask[:, 0] | (target != 0)  # every row has a -inf somewhere
    if case in ("inf_both", "inf_student"):
        student[mask] = -math.inf
    if case in ("inf_both", "inf_teacher"):
        teacher[mask] = -math.inf
    return student.to(device, dtype), target.to(device), teacher.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("case", _EXTREME_CASES)
@pytest.mark.parametrize(
    "term",
    ["hard", "hard_smoothed", "soft", "double_sigmoid", "double_one_minus_prob", "combined", "combined_one_minus_prob"],
)
def test_extreme_logits(term, case, dtype, device):
    kwargs = dict(TERMS[term], reduction="none")
    student, target, teacher = _extreme_inputs(case, dtype, device)
    if dtype == torch.float64:
        tols = ({"rtol": 1e-10, "atol": 1e-8}, {"rtol": 1e-10, "atol": 1e-12})
    else:
        # fp32 numbers near 1e4 / T (logits, a saved log-sum-exp) carry an absolute rounding of
        # up to ~1e-3, which exp() turns into a relative error of ~1e-3 of the softmax
        tols = ({"rtol": 1e-5, "atol": 2e-2}, {"rtol": 2e-3, "atol": 2e-3})
    loss, grad = _compare(kwargs, student, target, teacher, tols=tols)
    assert torch.isfinite(grad).all()
    smoothing = kwargs.get("label_smoothing", 0) > 0
    if (case == "inf_student" and _needs_teacher(kwargs)) or (case in ("inf_student", "inf_both") and smoothing):
        assert torch.all(loss == math.inf)
    else:
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_and_inf_propagate(device, dtype):
    # float32 takes the kernels' fast exponentials in finite rows: a NaN or +inf
    # row must still fall back to the exponential that keeps NaN
    student, target, teacher = _inputs(5, 17, seed=14, device=device, dtype=dtype)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    student[1, 4] = math.nan
    teacher[3, 2] = math.nan
    student[4, (target[4] + 1) % 17] = math.inf
    kwargs = dict(TERMS["combined"], reduction="none")
    loss = kdfast.distillation_loss(student, target, teacher, **kwargs)
    ref = reference.distillation_loss(student, target, teacher, **kwargs)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])
    assert not torch.isfinite(loss[4])
    assert_close(loss[[0, 2]], ref[[0, 2]], **tol)
    for reduction in ("sum", "mean"):
        assert torch.isnan(kdfast.distillation_loss(student, target, teacher, **dict(kwargs, reduction=reduction)))
    # the backward does not crash either, and rows without non-finite input keep their gradient
    x = student.clone().requires_grad_(True)
    kdfast.distillation_loss(x, target, teacher, **kwargs).sum().backward()
    xr = student.clone().requires_grad_(True)
    reference.distillation_loss(xr, target, teacher, **kwargs).sum().backward()
    assert_close(x.grad[[0, 2]], xr.grad[[0, 2]], **tol)
    # and a row with a NaN logit (student or teacher) or a +inf one has NaN gradients where the reference has
    assert torch.equal(torch.isnan(x.grad[[1, 3, 4]]), torch.isnan(xr.grad[[1, 3, 4]]))
    assert torch.isnan(x.grad[[1, 3, 4]]).any(dim=1).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("term", ["hard", "hard_smoothed", "soft", "combined"])
def test_empty_batch(term, reduction, device):
    kwargs = dict(TERMS[term], reduction=reduction)
    student, target, teacher = _inputs(0, 10, seed=15, device=device)
    if kwargs["hard_weight"] == 0:
        target = None
    loss, grad = _run(kdfast.distillation_loss, student, target, teacher, kwargs)
    expected, _ = _run(
        F.cross_entropy, student, torch.zeros(0, dtype=torch.int64, device=device), None, {"reduction": reduction}
    )
    assert loss.shape == expected.shape
    assert_close(loss, expected, equal_nan=True)  # [] for "none", 0 for "sum", NaN for "mean"
    assert grad.shape == (0, 10)


# ----------------------------------------------------------------------------- autograd, ops, compile


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("term", list(TERMS))
def test_gradcheck(term, reduction, device):
    kwargs = dict(TERMS[term], reduction=reduction)
    student, target, teacher = _inputs(3, 5, seed=16, device=device, ignore=[2] if reduction == "mean" else [])
    if kwargs["hard_weight"] == 0 and reduction == "none":
        target = None
    x = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: kdfast.distillation_loss(f, target, teacher, **kwargs), (x,))


def test_second_derivative_is_an_error(device):
    """The op is differentiable once: differentiating its gradient again raises (it used to give
    a silent zero), and a create_graph=True backward still gives the right first gradient."""
    student, target, teacher = _inputs(3, 5, seed=24, device=device)
    x = student.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kdfast.distillation_loss(x, target, teacher, **TERMS["combined"]), x, create_graph=True)
    (expected,) = torch.autograd.grad(reference.distillation_loss(x, target, teacher, **TERMS["combined"]), x)
    assert_close(g.detach(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="distillation_loss_backward has no second derivative"):
        g.pow(2).sum().backward()


def _op_args(
    student,
    target,
    teacher,
    hard_weight=1.0,
    soft_weight=0.0,
    double_weight=0.0,
    temperature=1.0,
    negative_weighting="sigmoid",
    negative_scale=1.0,
    negative_shift=0.0,
    label_smoothing=0.0,
    ignore_index=-100,
):
    return (
        student,
        target,
        teacher,
        hard_weight,
        soft_weight,
        double_weight,
        temperature,
        negative_weighting,
        negative_scale,
        negative_shift,
        label_smoothing,
        ignore_index,
    )


def _opcheck_cases(device):
    f64 = _inputs(4, 13, seed=17, device=device, ignore=[1])
    f32 = _inputs(3, 40, seed=18, dtype=torch.float32, device=device)
    return {
        "hard": (f64[0], f64[1], None, {}),
        "all_terms": (f64[0], f64[1], f64[2], dict(TERMS["combined"])),
        "one_minus_prob_no_target": (
            f64[0],
            None,
            f64[2],
            {"hard_weight": 0.0, "soft_weight": 0.3, "double_weight": 1.0, "negative_weighting": "one_minus_prob"},
        ),
        "float32": (f32[0], f32[1], f32[2], dict(TERMS["combined_one_minus_prob"])),
    }


@pytest.mark.parametrize("case", ["hard", "all_terms", "one_minus_prob_no_target", "float32"])
def test_opcheck_forward(case, device):
    student, target, teacher, kwargs = _opcheck_cases(device)[case]
    args = _op_args(student.clone().requires_grad_(True), target, teacher, **kwargs)
    torch.library.opcheck(FORWARD_OP, args)
    losses, stats = FORWARD_OP(*args)
    assert losses.shape == (student.shape[0],) and losses.dtype == student.dtype
    assert stats.shape == (student.shape[0], kdfast.ops.NUM_ROW_STATS)
    assert stats.dtype == kdfast.ops.stats_dtype(student.dtype)


@pytest.mark.parametrize("case", ["all_terms", "float32"])
def test_opcheck_backward(case, device):
    student, target, teacher, kwargs = _opcheck_cases(device)[case]
    args = _op_args(student, target, teacher, **kwargs)
    _, stats = FORWARD_OP(*args)
    grad_losses = torch.randn(student.shape[0], generator=torch.Generator().manual_seed(19), dtype=student.dtype)
    bwd_args = (grad_losses.to(device), student, target, teacher, stats) + args[3:]
    torch.library.opcheck(BACKWARD_OP, bwd_args)
    # the backward op is the gradient of sum(grad_losses * losses)
    _, ref_grad = _run(
        reference.distillation_loss,
        student,
        target,
        teacher,
        dict(kwargs, reduction="none"),
        grad_out=grad_losses,
        dtype=torch.float64,
    )
    _, grad_tol = _tols(student.dtype, kwargs)
    assert_close(BACKWARD_OP(*bwd_args).double(), ref_grad, **grad_tol)


@pytest.mark.parametrize(
    "backend, reduction, kwargs",
    [
        ("inductor", "mean", TERMS["combined"]),
        ("aot_eager", "none", dict(TERMS["combined_one_minus_prob"], ignore_index=-1)),
    ],
    ids=["inductor-combined-mean", "aot_eager-one_minus_prob-none"],
)
def test_torch_compile_fullgraph(backend, reduction, kwargs, device):
    torch._dynamo.reset()
    kwargs = dict(kwargs, reduction=reduction)

    def loss_fn(f, t, s):
        return kdfast.distillation_loss(f, t, s, **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    student, target, teacher = _inputs(
        6, 27, seed=20, dtype=torch.float32, device=device, ignore=[2], ignore_index=kwargs.get("ignore_index", -100)
    )
    grad_out = torch.randn(6, generator=torch.Generator().manual_seed(21)).to(device) if reduction == "none" else None
    loss, grad = _run(compiled, student, target, teacher, {}, grad_out)
    expected, expected_grad = _run(loss_fn, student, target, teacher, {}, grad_out)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------- half precision


def _assert_within_twice_low_precision_reference(kwargs, student, target, teacher, grad_out=None, extra_slack=0.0):
    """kdfast in the inputs' dtype is at most 2x as far from the float64 result as the reference
    computed in that dtype, on the same (rounded) inputs; the slack is one rounding of the output
    (half an ulp of the largest value), which no kernel can avoid."""
    dtype = student.dtype
    loss, grad = _run(kdfast.distillation_loss, student, target, teacher, kwargs, grad_out)
    exact_loss, exact_grad = _run(
        reference.distillation_loss, student, target, teacher, kwargs, grad_out, torch.float64
    )
    low_loss, low_grad = _run(reference.distillation_loss, student, target, teacher, kwargs, grad_out)
    assert loss.dtype == dtype and grad.dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2
    for what, got, low, exact in (("loss", loss, low_loss, exact_loss), ("grad", grad, low_grad, exact_grad)):
        err = (got.double() - exact).abs().max().item()
        err_low = (low.double() - exact).abs().max().item()
        bound = 2 * err_low + half_ulp * exact.abs().max().item() + extra_slack
        worst = divmod(int((got.double() - exact).abs().argmax()), exact.shape[-1]) if exact.dim() == 2 else None
        assert err <= bound, (
            f"{what}: kdfast error {err:.3g} > 2 x reference-{dtype} error {err_low:.3g} + slack "
            f"(worst at {worst if worst else int((got.double() - exact).abs().argmax())})"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("term", ["hard_smoothed", "soft", "double_sigmoid", "double_one_minus_prob", "combined"])
def test_half_precision_within_twice_reference_error(term, reduction, dtype, device):
    """bf16/fp16 (fp32 accumulation inside) against the reference computed in bf16/fp16."""
    kwargs = dict(TERMS[term], reduction=reduction)
    student, target, teacher = _inputs(16, 203, seed=22, dtype=dtype, device=device, ignore=[3])
    g = torch.randn(16, generator=torch.Generator().manual_seed(23)).to(device, dtype) if reduction == "none" else None
    _assert_within_twice_low_precision_reference(kwargs, student, target, teacher, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize(
    "term",
    ["soft", "double_sigmoid", "double_one_minus_prob", "hard+double_one_minus_prob", "combined_one_minus_prob"],
)
def test_confident_teacher_within_twice_reference_error(term, dtype, device):
    """A confident teacher (logits of scale 10 over 5 classes: top probability up to 1 - 1e-6)
    makes 1 - p_t cancel; the one_minus_prob weight log(1 - p_t) must not lose (much) more
    accuracy than the reference computed in the same dtype (log1p(-softmax(s))). The extra
    slack is the rounding of a saved fp32 log-sum-exp of these logits (|lse| <= ~50 here)."""
    if term == "hard+double_one_minus_prob":
        kwargs = {"hard_weight": 0.5, "double_weight": 1.0, "negative_weighting": "one_minus_prob"}
        kwargs["label_smoothing"] = 0.1
    else:
        kwargs = dict(TERMS[term])
    student, target, teacher = _inputs(64, 5, seed=33, dtype=dtype, device=device, scale=10.0)
    logit_scale = max(student.abs().max().item(), teacher.abs().max().item()) / kwargs.get("temperature", 1.0)
    _assert_within_twice_low_precision_reference(
        dict(kwargs, reduction="none"),
        student,
        target,
        teacher,
        extra_slack=4 * torch.finfo(torch.float32).eps * logit_scale * max(1.0, kwargs.get("temperature", 1.0)) ** 2,
    )


# ----------------------------------------------------------------------------- hypothesis


@st.composite
def _problems(draw):
    B = draw(st.integers(0, 6))
    V = draw(st.integers(1, 70))
    logits = hnp.arrays(np.float64, (B, V), elements=st.floats(-8, 8, allow_subnormal=False))
    student, teacher = draw(logits), draw(logits)
    ignore_index = draw(st.sampled_from([-100, -1]))
    target = draw(hnp.arrays(np.int64, (B,), elements=st.one_of(st.integers(0, V - 1), st.just(ignore_index))))
    weight = st.sampled_from([0.0, 0.5, 1.0, 2.25])
    hard_weight, soft_weight, double_weight = draw(weight), draw(weight), draw(weight)
    assume(hard_weight + soft_weight + double_weight > 0)
    negative_weighting = draw(st.sampled_from(["sigmoid", "one_minus_prob"]))
    if V == 1:
        negative_weighting = "sigmoid"  # one_minus_prob has log w = -inf at V = 1
    kwargs = {
        "hard_weight": hard_weight,
        "soft_weight": soft_weight,
        "double_weight": double_weight,
        "temperature": draw(st.floats(0.25, 5.0)),
        "negative_weighting": negative_weighting,
        "negative_scale": draw(st.floats(0.1, 3.0)),
        "negative_shift": draw(st.floats(-2.0, 2.0)),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5])),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    with_target = hard_weight > 0 or draw(st.booleans())
    with_teacher = soft_weight > 0 or double_weight > 0 or draw(st.booleans())
    return (
        torch.from_numpy(student),
        torch.from_numpy(target) if with_target else None,
        torch.from_numpy(teacher) if with_teacher else None,
        kwargs,
    )


@given(problem=_problems())
def test_hypothesis_matches_reference(problem, device):
    student, target, teacher, kwargs = problem
    student = student.to(device)
    target = None if target is None else target.to(device)
    teacher = None if teacher is None else teacher.to(device)
    _compare(kwargs, student, target, teacher, tols=({"rtol": 1e-9, "atol": 1e-9}, {"rtol": 1e-9, "atol": 1e-11}))


# ----------------------------------------------------------------------------- API surface


def test_module_equals_function(device):
    kwargs = dict(TERMS["combined_one_minus_prob"], reduction="sum", ignore_index=-7)
    student, target, teacher = _inputs(5, 12, seed=24, device=device, ignore=[0], ignore_index=-7)
    module = kdfast.DistillationLoss(**kwargs)
    assert isinstance(module, torch.nn.Module)
    assert "one_minus_prob" in repr(module)
    loss, grad = _run(lambda f, t, s: module(f, t, s), student, target, teacher, {})
    expected, expected_grad = _run(kdfast.distillation_loss, student, target, teacher, kwargs)
    assert torch.equal(loss, expected)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("term", TERMS_WITH_TEACHER)
def test_teacher_gets_no_gradient(term, device):
    student, target, teacher = _inputs(4, 10, seed=25, device=device)
    x = student.clone().requires_grad_(True)
    s = teacher.clone().requires_grad_(True)
    kdfast.distillation_loss(x, target, s, **TERMS[term]).backward()
    assert x.grad is not None
    assert s.grad is None


def test_dlpack_numpy_inputs():
    student, target, teacher = _inputs(4, 15, seed=26, dtype=torch.float32)
    kwargs = dict(TERMS["combined"], reduction="none")
    expected = kdfast.distillation_loss(student, target, teacher, **kwargs)
    loss = kdfast.distillation_loss(student.numpy(), target, teacher.numpy(), **kwargs)
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float32
    assert torch.equal(loss, expected)
    loss = kdfast.distillation_loss(student.numpy(), target.numpy())  # numpy target too
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(loss, kdfast.distillation_loss(student, target))
    with pytest.raises(TypeError, match="student_logits"):
        kdfast.distillation_loss(student.tolist(), target)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    f, t, s = _inputs(4, 6, seed=27)
    return {
        # name: (args, kwargs, exception, message pattern)
        "integer_logits": ((f.long(), t), {}, TypeError, "student_logits"),
        "1d_logits": ((f[0], t[:1]), {}, ValueError, "student_logits"),
        "3d_logits": ((f[None], t), {}, ValueError, "student_logits"),
        "target_shape": ((f, t[:3]), {}, ValueError, "target"),
        "target_2d": ((f, t[:, None]), {}, ValueError, "target"),
        "target_int32": ((f, t.int()), {}, TypeError, "target"),
        "target_float": ((f, t.double()), {}, TypeError, "target"),
        "teacher_shape": ((f, t, s[:, :5]), {"soft_weight": 1.0}, ValueError, "teacher_logits"),
        "teacher_rows": ((f, t, s[:3]), {"double_weight": 1.0}, ValueError, "teacher_logits"),
        "teacher_dtype": ((f, t, s.float()), {"soft_weight": 1.0}, TypeError, "teacher_logits"),
        "temperature_zero": ((f, t, s), {"soft_weight": 1.0, "temperature": 0.0}, ValueError, "temperature"),
        "temperature_negative": ((f, t, s), {"soft_weight": 1.0, "temperature": -2.0}, ValueError, "temperature"),
        "temperature_nan": ((f, t, s), {"soft_weight": 1.0, "temperature": math.nan}, ValueError, "temperature"),
        "hard_weight_negative": ((f, t), {"hard_weight": -1.0}, ValueError, "hard_weight"),
        "soft_weight_negative": ((f, t, s), {"soft_weight": -0.5}, ValueError, "soft_weight"),
        "double_weight_negative": ((f, t, s), {"double_weight": -0.5}, ValueError, "double_weight"),
        "negative_scale_zero": ((f, t, s), {"double_weight": 1.0, "negative_scale": 0.0}, ValueError, "negative_scale"),
        "negative_scale_negative": (
            (f, t, s),
            {"double_weight": 1.0, "negative_scale": -1.0},
            ValueError,
            "negative_scale",
        ),
        "all_weights_zero": ((f, t, s), {"hard_weight": 0.0}, ValueError, "weight"),
        "soft_without_teacher": ((f, t), {"soft_weight": 1.0}, ValueError, "teacher_logits"),
        "double_without_teacher": ((f, t), {"hard_weight": 0.0, "double_weight": 1.0}, ValueError, "teacher_logits"),
        "hard_without_target": ((f, None, s), {"soft_weight": 1.0}, ValueError, "target"),
        "reduction_unknown": ((f, t), {"reduction": "avg"}, ValueError, "reduction"),
        "negative_weighting_unknown": (
            (f, t, s),
            {"double_weight": 1.0, "negative_weighting": "softmax"},
            ValueError,
            "negative_weighting",
        ),
        "label_smoothing_above_1": ((f, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        "label_smoothing_negative": ((f, t), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        "target_on_meta": ((f, t.to("meta")), {}, ValueError, "target"),
        "teacher_on_meta": ((f, t, s.to("meta")), {"soft_weight": 1.0}, ValueError, "teacher_logits"),
        "weight_not_a_number": ((f, t), {"hard_weight": "1"}, TypeError, "hard_weight"),
        "temperature_inf": ((f, t, s), {"soft_weight": 1.0, "temperature": math.inf}, ValueError, "temperature"),
        "temperature_below_float32": ((f.float(), t, s.float()), {"soft_weight": 1.0, "temperature": 1e-39}, ValueError,
                                      r"temperature must be in \[2\.9\d*e-39, .*Float accumulation"),
        "hard_weight_inf": ((f, t), {"hard_weight": math.inf}, ValueError, "hard_weight"),
        "negative_shift_nan": (
            (f, t, s), {"double_weight": 1.0, "negative_shift": math.nan}, ValueError, "negative_shift",
        ),
        # a float ignore_index was truncated for the kernel but not for the mean's denominator
        "ignore_index_float": ((f, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        "ignore_index_string": ((f, t), {"ignore_index": "x"}, TypeError, "ignore_index"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_naming_the_argument(case):
    args, kwargs, exception, pattern = _bad_cases()[case]
    with pytest.raises(exception, match=pattern):
        kdfast.distillation_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "bad_target, ignore_index",
    [(6, -100), (1000, -100), (-1, -100), (-100, -1), (-5, -100)],
    ids=["V", "far_above_V", "minus_1", "default_ignore_index_not_ignored", "negative"],
)
@pytest.mark.parametrize("term", ["hard", "hard_smoothed", "combined"])
def test_target_out_of_range_raises(term, bad_target, ignore_index, device, host_index_checks):
    """Target values are checked by the kernel (TORCH_CHECK_VALUE: a ValueError naming target; on
    the CUDA code path with host checks on, its default device check: test_cuda_index_checks.py)."""
    student, target, teacher = _inputs(4, 6, seed=28, device=device)
    target[2] = bad_target
    x = student.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=rf"target\[2\] = {bad_target}\b"):
        kdfast.distillation_loss(x, target, teacher, ignore_index=ignore_index, reduction="none", **TERMS[term])
    with pytest.raises(ValueError, match="target"):  # the raw op checks too
        FORWARD_OP(*_op_args(student, target, teacher, ignore_index=ignore_index))
