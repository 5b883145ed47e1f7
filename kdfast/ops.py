"""Typed wrappers, fake kernels and autograd for the ``torch.ops.kdfast`` ops.

The schemas live in ``csrc/ops.cpp`` (one ``TORCH_LIBRARY(kdfast, m)`` block);
the kernels in ``csrc/cpu/`` (and ``csrc/cuda/`` for a CUDA build). This module
adds what torch needs to trace and differentiate them: a fake (meta) kernel
per op for ``torch.compile`` / ``opcheck``, and ``register_autograd`` for the
forward ops, whose backward is itself an op (differentiable once: differentiating
a backward op again raises).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _C  # loading the extension registers the ops

__all__ = [
    "CUDA_OPS",
    "NUM_ROW_STATS",
    "cpu_bf16_gemm_status",
    "cpu_cache_bytes",
    "distillation_loss_backward",
    "distillation_loss_forward",
    "effective_student_logits",
    "eigenprojection",
    "empty_cpu_cache",
    "fused_linear_loss_backward",
    "fused_linear_loss_forward",
    "missing_cuda_kernels",
    "teacher_topk",
]

# Per-row statistics saved by the forward for the backward; keep in sync with
# csrc/cpu/loss_math.h (RowStat): the maxima and log-sums of the five log-partitions
# LSE(f), LSE(f/T), LSE(f + log w), LSE(s/T), LSE(s).
NUM_ROW_STATS = 8


def cpu_bf16_gemm_status() -> str:
    """Whether the CPU kernels multiply bf16 inputs with MKL's bf16 x bf16 -> float32 GEMM now
    ("on: ...") or upcast them to float32 GEMMs ("off: ..."), and why.

    Both give the same logits (a product of two bf16 values is exact in float32); the bf16 GEMM
    runs on the CPU's matrix units (AMX), several times faster. The environment variable
    ``KDFAST_CPU_BF16_GEMM`` chooses, read at each op call: ``0`` off, ``1`` on wherever this torch
    exports MKL's GEMM (x86-64 builds), unset or ``auto`` on when the CPU also has AMX-BF16.
    The backward's float32 dL/dF enters the bf16 GEMMs as two bf16 terms (16 bits of it), so the
    bf16 gradients returned differ from the float32 path's by at most one rounding, in few entries.
    """
    return _C.cpu_bf16_gemm_status()


def empty_cpu_cache() -> int:
    """Free the ``grad_weight`` block the CPU fused loss keeps for reuse; return the bytes freed.

    The CPU backward of :func:`kdfast.fused_linear_distillation_loss` allocates ``grad_weight``
    (``V x d``: 171 MB at Amazon-670K's 670,091 classes and d = 64) on transparent huge pages,
    and when that tensor is freed (``optimizer.zero_grad()`` sets ``.grad`` to None) keeps one
    such block for the next backward asking for the same size. A training step then neither
    faults nor zeroes fresh pages: the hard-CE step at Amazon-670K's shape went from 0.47 to
    0.42-0.43 s on a 2-core Xeon (see ``BENCHMARKS.md``). The peak is unchanged (the next step
    uses the block at the same point), but between steps the block stays resident where malloc
    would have returned it to the kernel; call this after training to return it. ``KDFAST_CPU_GRAD_CACHE=0`` (read at each
    allocation) turns the huge pages and the kept block off. Blocks under 2 MiB are never kept.
    """
    return _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes of the ``grad_weight`` block kept for reuse (0 if none): see :func:`empty_cpu_cache`."""
    return _C.cpu_cache_bytes()


# The ops a CUDA build also implements for CUDA (csrc/cuda_ops.cpp's TORCH_LIBRARY_IMPL block);
# eigenprojection and effective_student_logits are CPU only.
CUDA_OPS = ("distillation_loss_forward", "distillation_loss_backward", "fused_linear_loss_forward",
            "fused_linear_loss_backward", "teacher_topk")


def missing_cuda_kernels() -> list[str]:
    """The ops of :data:`CUDA_OPS` that have no CUDA kernel registered: all of them when kdfast
    was built without CUDA, none for a CUDA build. Says nothing of whether a GPU is visible."""
    return [op for op in CUDA_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{op}", "CUDA")]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def distillation_loss_forward(
    student_logits: Tensor,
    target: Tensor | None,
    teacher_logits: Tensor | None,
    hard_weight: float,
    soft_weight: float,
    double_weight: float,
    temperature: float,
    negative_weighting: str,
    negative_scale: float,
    negative_shift: float,
    label_smoothing: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Per-row losses ``[B]`` (dtype of the logits) and row statistics ``[B, NUM_ROW_STATS]``."""
    return torch.ops.kdfast.distillation_loss_forward.default(
        student_logits, target, teacher_logits, hard_weight, soft_weight, double_weight,
        temperature, negative_weighting, negative_scale, negative_shift, label_smoothing,
        ignore_index,
    )


def distillation_loss_backward(
    grad_losses: Tensor,
    student_logits: Tensor,
    target: Tensor | None,
    teacher_logits: Tensor | None,
    stats: Tensor,
    hard_weight: float,
    soft_weight: float,
    double_weight: float,
    temperature: float,
    negative_weighting: str,
    negative_scale: float,
    negative_shift: float,
    label_smoothing: float,
    ignore_index: int,
) -> Tensor:
    """Gradient of ``sum(grad_losses * losses)`` with respect to the student logits."""
    return torch.ops.kdfast.distillation_loss_backward.default(
        grad_losses, student_logits, target, teacher_logits, stats, hard_weight, soft_weight,
        double_weight, temperature, negative_weighting, negative_scale, negative_shift,
        label_smoothing, ignore_index,
    )


@torch.library.register_fake("kdfast::distillation_loss_forward")
def _distillation_loss_forward_fake(student_logits, target, teacher_logits, *params):
    B = student_logits.shape[0]
    losses = student_logits.new_empty((B,))
    stats = student_logits.new_empty((B, NUM_ROW_STATS), dtype=stats_dtype(student_logits.dtype))
    return losses, stats


@torch.library.register_fake("kdfast::distillation_loss_backward")
def _distillation_loss_backward_fake(grad_losses, student_logits, *rest):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _distillation_loss_setup_context(ctx, inputs, output):
    student_logits, target, teacher_logits, *params = inputs
    ctx.save_for_backward(student_logits, target, teacher_logits, output[1])
    ctx.params = params


def _distillation_loss_autograd(ctx, grad_losses, grad_stats):
    student_logits, target, teacher_logits, stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = distillation_loss_backward(
            grad_losses, student_logits, target, teacher_logits, stats, *ctx.params
        )
    return (grad_student, None, None) + (None,) * len(ctx.params)


torch.library.register_autograd(
    "kdfast::distillation_loss_forward",
    _distillation_loss_autograd,
    setup_context=_distillation_loss_setup_context,
)


# ---------------------------------------------------------------------------
# fused_linear_loss: hidden [B, d] @ weight[V, d]^T (+ bias) and the loss, one op.
# Inputs after the student's: the 10 optional target/teacher tensors
# (target, target_indptr, target_indices, teacher_logits, teacher_hidden,
#  teacher_weight, teacher_bias, topk_indices, topk_logits, topk_lse), then the
# 9 loss keywords, tile_size and filter_eps.
# ---------------------------------------------------------------------------
FUSED_OPTIONAL_INPUTS = (
    "target", "target_indptr", "target_indices", "teacher_logits", "teacher_hidden",
    "teacher_weight", "teacher_bias", "topk_indices", "topk_logits", "topk_lse",
)


def fused_linear_loss_forward(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None, *rest
) -> tuple[Tensor, Tensor]:
    """Per-row losses ``[B]`` and row statistics ``[B, NUM_ROW_STATS]``; ``rest`` as in the schema."""
    return torch.ops.kdfast.fused_linear_loss_forward.default(student_hidden, student_weight, student_bias, *rest)


def fused_linear_loss_backward(grad_losses: Tensor, *inputs) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)``; ``grad_bias`` is empty without a bias."""
    return torch.ops.kdfast.fused_linear_loss_backward.default(grad_losses, *inputs)


@torch.library.register_fake("kdfast::fused_linear_loss_forward")
def _fused_linear_loss_forward_fake(student_hidden, student_weight, *rest):
    B = student_hidden.shape[0]
    losses = student_hidden.new_empty((B,))
    stats = student_hidden.new_empty((B, NUM_ROW_STATS), dtype=stats_dtype(student_hidden.dtype))
    return losses, stats


@torch.library.register_fake("kdfast::fused_linear_loss_backward")
def _fused_linear_loss_backward_fake(grad_losses, student_hidden, student_weight, student_bias, *rest):
    grad_hidden = torch.empty_like(student_hidden, memory_format=torch.contiguous_format)
    grad_weight = torch.empty_like(student_weight, memory_format=torch.contiguous_format)
    if student_bias is None:
        grad_bias = student_hidden.new_empty((0,))
    else:
        grad_bias = torch.empty_like(student_bias, memory_format=torch.contiguous_format)
    return grad_hidden, grad_weight, grad_bias


_NUM_FUSED_TENSORS = 3 + len(FUSED_OPTIONAL_INPUTS)


def _fused_setup_context(ctx, inputs, output):
    tensors = inputs[:_NUM_FUSED_TENSORS]
    ctx.save_for_backward(*tensors, output[1])
    ctx.params = inputs[_NUM_FUSED_TENSORS:]


def _fused_autograd(ctx, grad_losses, grad_stats):
    *tensors, stats = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = fused_linear_loss_backward(grad_losses, *tensors, stats, *ctx.params)
    has_bias = tensors[2] is not None
    grads = [
        grad_hidden if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if has_bias and ctx.needs_input_grad[2] else None,
    ]
    return tuple(grads) + (None,) * (len(tensors) - 3 + len(ctx.params))


torch.library.register_autograd(
    "kdfast::fused_linear_loss_forward", _fused_autograd, setup_context=_fused_setup_context
)


# The backward ops are differentiable once: without an autograd formula of their own, a
# backward(create_graph=True) would hand back gradients whose own gradient is silently zero.
# This formula makes differentiating them again an error instead.


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"kdfast.{op} has no second derivative: the gradients of kdfast's losses cannot be "
            "differentiated again (backward(create_graph=True) followed by another backward through them)"
        )

    return backward


def _no_context(ctx, inputs, output):
    pass


for _op in ("distillation_loss_backward", "fused_linear_loss_backward"):
    torch.library.register_autograd(f"kdfast::{_op}", _no_double_backward(_op), setup_context=_no_context)


# ---------------------------------------------------------------------------
# teacher_topk: per-row top-k logits, LSE, entropy and covered mass; no autograd
# (labels are data).
# ---------------------------------------------------------------------------


def teacher_topk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float, tile_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(indices [B, k], logits [B, k], lse [B], entropy [B], covered [B])``."""
    return torch.ops.kdfast.teacher_topk.default(hidden, weight, bias, k, temperature, tile_size)


@torch.library.register_fake("kdfast::teacher_topk")
def _teacher_topk_fake(hidden, weight, bias, k, temperature, tile_size):
    B = hidden.shape[0]
    dtype = stats_dtype(hidden.dtype)
    indices = hidden.new_empty((B, k), dtype=torch.int64)
    values = hidden.new_empty((B, k), dtype=dtype)
    row = hidden.new_empty((B,), dtype=dtype)
    return indices, values, row, torch.empty_like(row), torch.empty_like(row)


# ---------------------------------------------------------------------------
# eigenprojection (seed 001): ||W_t v_i|| for a trajectory of weights.
# Gradients (where ||W_t v_i|| > 0):
#   d/dW_t  = sum_i g[t, i] / n[t, i] * (W_t v_i) v_i^T
#   d/dv_i  = sum_t g[t, i] / n[t, i] * W_t^T (W_t v_i)
# ---------------------------------------------------------------------------


def eigenprojection(weights: Tensor, basis: Tensor) -> Tensor:
    """``out[t, i] = ||weights[t] @ basis[:, i]||`` for weights ``[T, k, d]`` and basis ``[d, r]`` -> ``[T, r]``."""
    return torch.ops.kdfast.eigenprojection.default(weights, basis)


@torch.library.register_fake("kdfast::eigenprojection")
def _eigenprojection_fake(weights, basis):
    return weights.new_empty((weights.shape[0], basis.shape[1]))


def _eigenprojection_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _eigenprojection_autograd(ctx, grad):
    weights, basis, norms = ctx.saved_tensors
    # a zero norm has no direction: its subgradient 0 is taken
    coef = torch.where(norms > 0, grad / torch.where(norms > 0, norms, 1), 0)  # [T, r]
    projected = (weights @ basis) * coef[:, None, :]  # [T, k, r]
    grad_weights = projected @ basis.T if ctx.needs_input_grad[0] else None
    grad_basis = torch.einsum("tkd,tkr->dr", weights, projected) if ctx.needs_input_grad[1] else None
    return grad_weights, grad_basis


torch.library.register_autograd(
    "kdfast::eigenprojection", _eigenprojection_autograd, setup_context=_eigenprojection_setup_context
)


# ---------------------------------------------------------------------------
# effective_student_logits (seed 004, eq. 3): the root z of
#   g(z) = (rho/T)(sigmoid(z/T) - sigmoid(z_t/T)) + (1 - rho)(sigmoid(z) - y).
# By the implicit function theorem, with g'(z) = (rho/T^2) sigmoid'(z/T) + (1 - rho) sigmoid'(z):
#   dz/dz_t = (rho/T^2) sigmoid'(z_t/T) / g'(z),   dz/dy = (1 - rho) / g'(z)
# (0 at an infinite root; 1 and 0 when rho = 1). Both are formed from log sigmoid'
# (sigmoid' itself is 0 in float64 beyond |x| ~ 745, and s (1 - s) beyond ~ 37).
# ---------------------------------------------------------------------------


def effective_student_logits(
    teacher_logits: Tensor, hard_labels: Tensor, soft_ratio: float, temperature: float
) -> Tensor:
    """The converged student logit per element (``teacher_logits``' shape and dtype)."""
    return torch.ops.kdfast.effective_student_logits.default(teacher_logits, hard_labels, soft_ratio, temperature)


@torch.library.register_fake("kdfast::effective_student_logits")
def _effective_student_logits_fake(teacher_logits, hard_labels, soft_ratio, temperature):
    return torch.empty_like(teacher_logits, memory_format=torch.contiguous_format)


def _effective_student_logits_setup_context(ctx, inputs, output):
    teacher_logits, _, soft_ratio, temperature = inputs
    ctx.save_for_backward(teacher_logits, output)
    ctx.soft_ratio, ctx.temperature = soft_ratio, temperature


def _log_sigmoid_slope(x: Tensor) -> Tensor:
    """log sigmoid'(x) = -softplus(x) - softplus(-x), exact at any finite x."""
    return -torch.nn.functional.softplus(x) - torch.nn.functional.softplus(-x)


def _effective_student_logits_autograd(ctx, grad):
    teacher_logits, z = ctx.saved_tensors
    rho, T = ctx.soft_ratio, ctx.temperature
    if rho == 1:
        return grad if ctx.needs_input_grad[0] else None, torch.zeros_like(grad) if ctx.needs_input_grad[1] else None, None, None
    # log g'(z); -inf at an infinite root (rho = 0 only leaves the second term)
    terms = [math.log(1 - rho) + _log_sigmoid_slope(z)]
    if rho > 0:
        terms.append(math.log(rho / T**2) + _log_sigmoid_slope(z / T))
    log_slope = torch.logaddexp(*terms) if len(terms) == 2 else terms[0]
    finite = torch.isfinite(log_slope)
    safe_log_slope = torch.where(finite, log_slope, 0)
    grad_teacher = grad_labels = None
    if ctx.needs_input_grad[0]:
        if rho > 0:
            ratio = torch.exp(math.log(rho / T**2) + _log_sigmoid_slope(teacher_logits / T) - safe_log_slope)
            grad_teacher = torch.where(finite, grad * ratio, 0)
        else:
            grad_teacher = torch.zeros_like(grad)
    if ctx.needs_input_grad[1]:
        grad_labels = torch.where(finite, grad * torch.exp(math.log(1 - rho) - safe_log_slope), 0)
    return grad_teacher, grad_labels, None, None


torch.library.register_autograd(
    "kdfast::effective_student_logits",
    _effective_student_logits_autograd,
    setup_context=_effective_student_logits_setup_context,
)
