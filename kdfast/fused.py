"""The fused linear loss API: :func:`fused_linear_distillation_loss` and
:class:`FusedLinearDistillationLoss`.

The student's last linear layer and the whole loss in one op: the student logits
``h W^T + b`` are made a class tile at a time and folded into per-row running
statistics at once, so memory grows with the weights, never with ``B x V``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_real, check_tile_size
from .losses import _check_int_target, _check_loss_keywords, as_tensor
from .targets import MultiTarget, TopK

__all__ = ["FusedLinearDistillationLoss", "LinearTeacher", "default_filter_eps", "fused_linear_distillation_loss"]


class LinearTeacher(NamedTuple):
    """A teacher whose logits ``hidden @ weight.T + bias`` are computed tile by tile."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


Teacher = Tensor | TopK | LinearTeacher | tuple


def default_filter_eps(dtype: torch.dtype) -> float:
    """Gradient-filter threshold for ``exact=False``: a class tile is skipped in the
    backward when every entry of ``dL/dlogits`` (per unit upstream gradient) is below it.
    Half precision: 2^-12 (as Cut Cross-Entropy: below what bf16 gradients resolve);
    float32: 2^-24; float64: 0 (always exact)."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2.0**-12
    if dtype == torch.float32:
        return 2.0**-24
    return 0.0


def _check_bias(bias: Tensor, name: str, V: int, ref: Tensor) -> None:
    if bias.shape != (V,):
        raise ValueError(f"{name} must have shape [V] = [{V}], got {tuple(bias.shape)}")
    if bias.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {bias.dtype} but student_hidden has {ref.dtype}")
    if bias.device != ref.device:
        raise ValueError(f"{name} is on {bias.device} but student_hidden is on {ref.device}")


def _check_same(t: Tensor, name: str, ref: Tensor, *, dtype: bool = True) -> None:
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but student_hidden has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but student_hidden is on {ref.device}")


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    target: Tensor | MultiTarget | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_topk: TopK | None = None,
    hard_weight: float = 1.0,
    soft_weight: float = 0.0,
    double_weight: float = 0.0,
    temperature: float = 1.0,
    negative_weighting: str = "sigmoid",
    negative_scale: float = 1.0,
    negative_shift: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    exact: bool = False,
    filter_eps: float | None = None,
    tile_size: int | None = None,
) -> Tensor:
    r"""The loss of :func:`kdfast.distillation_loss` on ``student_hidden @ student_weight.T + student_bias``,
    without ever storing the ``[B, V]`` logits.

    Args:
        student_hidden: ``[B, d_s]`` float; receives a gradient.
        student_weight: ``[V, d_s]``, same dtype; receives a gradient (as does ``student_bias`` ``[V]``).
        target: int64 ``[B]`` hard labels (rows equal to ``ignore_index`` are skipped), or a
            :class:`kdfast.MultiTarget` for pick-all-labels: a row with positives ``Y`` counts as
            ``|Y|`` rows, one per positive, in one pass; rows without positives are skipped and
            ``reduction="mean"`` divides by the number of positives.
        teacher_logits: dense ``[B, V]`` teacher logits; or
        teacher_hidden, teacher_weight, teacher_bias: ``[B, d_t]``, ``[V, d_t]``, ``[V]``, the teacher's
            logits made tile by tile (any ``d_t``); or
        teacher_topk: a :class:`kdfast.TopK` stored teacher (top-k probabilities renormalized over the k
            classes; double-distillation weights from the stored logits inside the top-k, 1 outside;
            ``one_minus_prob`` weights need its ``lse`` at ``temperature`` 1).
            The teacher never receives a gradient. Give at most one form.
        exact: ``True`` turns gradient filtering off.
        filter_eps: the filter threshold when ``exact=False`` (default :func:`default_filter_eps`):
            a class tile is skipped in the backward when every ``|dL/dlogit|`` in it is below
            ``filter_eps`` times its row's upstream gradient; each skipped entry changes
            ``grad_hidden[i]`` by at most ``filter_eps * |g_i| * ||W_j||`` and ``grad_weight[j]`` by
            at most ``filter_eps * |g_i| * ||h_i||``. CUDA's fused kernels filter per block of 64
            rows as well, and skip those blocks' gradient GEMMs; its tiled path gives the same
            gradients as the CPU but still runs the skipped tiles' GEMMs.
        tile_size: classes per tile (default: from ``B`` and a memory budget for the [B, tile] buffers:
            4 MiB per thread on CPU, 96 MiB on CUDA). CUDA's fused kernels use tiles of 128 classes
            (a smaller ``tile_size`` sets their filter's class groups).

    The other keywords are those of :func:`kdfast.distillation_loss`. With a ``one_minus_prob``
    double term and a dense or on-the-fly teacher, the teacher's logits are made twice (its
    log-partition is needed before the weights).

    Precision: the logits and every sum are float32 (float64 for float64 inputs). bf16/fp16 inputs
    are read as they are; on the CPU, bf16 tile GEMMs run as MKL's bf16 x bf16 -> float32 GEMM where
    the CPU has AMX (:func:`kdfast.ops.cpu_bf16_gemm_status`; ``KDFAST_CPU_BF16_GEMM=0`` upcasts to
    float32 GEMMs instead), with the same logits and gradients within one bf16 rounding. On CUDA,
    bf16/fp16 inputs with ``d <= 128`` run fused kernels (tensor cores; no logits in global memory),
    as do float32 ones where torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``) with
    ``d <= 112``, or ``d <= 64`` with a teacher: their products are then tf32's (a larger ``d`` takes
    tiled cuBLAS GEMMs, in tf32 too); float32 stays exact (tiled cuBLAS GEMMs) by default.

    Bad index values (a target outside ``[0, V)`` that is not ``ignore_index``, an unsorted
    ``MultiTarget`` row, a ``TopK`` class out of range or given twice) raise a ``ValueError`` naming
    the entry on the CPU. On CUDA they are checked on the device, so that no call waits for the GPU:
    a bad one prints that message and stops with a device-side assertion, as PyTorch's CUDA losses
    do (``KDFAST_CUDA_HOST_CHECKS=1``: the ``ValueError`` instead, for one sync per call).

    Memory: on the CPU, a ``grad_weight`` of 2 MiB or more is put on transparent huge pages and,
    once freed, kept for the next backward of the same size, so a training loop does not fault
    fresh pages in every step (:func:`kdfast.ops.empty_cpu_cache` returns it;
    ``KDFAST_CPU_GRAD_CACHE=0`` turns this off).
    """
    student_hidden = as_tensor(student_hidden, "student_hidden")
    student_weight = as_tensor(student_weight, "student_weight")
    (hard_weight, soft_weight, double_weight, temperature, negative_scale, negative_shift, label_smoothing,
     ignore_index) = _check_loss_keywords(
        hard_weight, soft_weight, double_weight, temperature, negative_weighting, negative_scale,
        negative_shift, label_smoothing, reduction, ignore_index,
    )
    h, W = student_hidden, student_weight
    if not h.is_floating_point():
        raise TypeError(f"student_hidden must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"student_hidden must have shape [B, d], got {tuple(h.shape)}")
    if W.dim() != 2:
        raise ValueError(f"student_weight must have shape [V, d], got {tuple(W.shape)}")
    _check_same(W, "student_weight", h)
    if W.shape[1] != h.shape[1]:
        raise ValueError(f"student_weight has d = {W.shape[1]} but student_hidden has d = {h.shape[1]}")
    B, V = h.shape[0], W.shape[0]
    if V == 0:
        raise ValueError("student_weight must have at least one class (V = 0)")
    if student_bias is not None:
        student_bias = as_tensor(student_bias, "student_bias")
        _check_bias(student_bias, "student_bias", V, h)

    # targets
    int_target = indptr = indices = None
    if isinstance(target, MultiTarget):
        indptr, indices = target.indptr, target.indices
        for name, t in (("target.indptr", indptr), ("target.indices", indices)):
            if t.dtype != torch.int64:
                raise TypeError(f"{name} must be int64, got {t.dtype}")
            _check_same(t, name, h, dtype=False)
        if indptr.shape != (B + 1,):
            raise ValueError(f"target.indptr must have shape [B + 1] = [{B + 1}], got {tuple(indptr.shape)}")
        if indices.dim() != 1:
            raise ValueError(f"target.indices must be 1-D, got shape {tuple(indices.shape)}")
    elif target is not None:
        int_target = as_tensor(target, "target")
        _check_int_target(int_target, B, h.device, "student_hidden")
    elif hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} needs target (hard labels); pass target or set hard_weight=0")

    # the teacher, in one form
    forms = [
        name
        for name, given in (
            ("teacher_logits", teacher_logits is not None),
            ("teacher_hidden/teacher_weight", teacher_hidden is not None or teacher_weight is not None),
            ("teacher_topk", teacher_topk is not None),
        )
        if given
    ]
    if len(forms) > 1:
        raise ValueError(f"give the teacher in one form only, got {' and '.join(forms)}")
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias needs teacher_hidden and teacher_weight")
    needs_teacher = soft_weight > 0 or double_weight > 0
    if needs_teacher and not forms:
        raise ValueError(
            "soft_weight > 0 or double_weight > 0 needs a teacher: teacher_logits, "
            "teacher_hidden + teacher_weight, or teacher_topk"
        )
    topk_indices = topk_logits = topk_lse = None
    if not needs_teacher:
        teacher_logits = teacher_hidden = teacher_weight = teacher_bias = None  # not read
    elif teacher_logits is not None:
        teacher_logits = as_tensor(teacher_logits, "teacher_logits")
        _check_same(teacher_logits, "teacher_logits", h)
        if teacher_logits.shape != (B, V):
            raise ValueError(f"teacher_logits must have shape [B, V] = [{B}, {V}], got {tuple(teacher_logits.shape)}")
    elif teacher_topk is not None:
        if not isinstance(teacher_topk, TopK):
            raise TypeError(f"teacher_topk must be a kdfast.TopK, got {type(teacher_topk).__name__}")
        topk_indices, topk_logits, topk_lse = teacher_topk.indices, teacher_topk.logits, teacher_topk.lse
        if topk_indices.dtype != torch.int64:
            raise TypeError(f"teacher_topk.indices must be int64, got {topk_indices.dtype}")
        if topk_indices.dim() != 2 or topk_indices.shape[0] != B:
            raise ValueError(f"teacher_topk.indices must have shape [B, k] with B = {B}, got {tuple(topk_indices.shape)}")
        if not 1 <= topk_indices.shape[1] <= V:
            raise ValueError(f"teacher_topk has k = {topk_indices.shape[1]}, outside [1, V = {V}]")
        if topk_logits.shape != topk_indices.shape:
            raise ValueError(
                f"teacher_topk.logits must have shape {tuple(topk_indices.shape)}, got {tuple(topk_logits.shape)}"
            )
        if topk_lse.shape != (B,):
            raise ValueError(f"teacher_topk.lse must have shape [B] = [{B}], got {tuple(topk_lse.shape)}")
        for name, t in (("teacher_topk.indices", topk_indices), ("teacher_topk.logits", topk_logits),
                        ("teacher_topk.lse", topk_lse)):
            _check_same(t, name, h, dtype=False)
        if not (topk_logits.is_floating_point() and topk_lse.is_floating_point()):
            raise TypeError("teacher_topk.logits and teacher_topk.lse must be floating point")
        if double_weight > 0 and negative_weighting == "one_minus_prob" and teacher_topk.temperature != 1:
            # the weights are 1 - exp(s - lse): lse must be LSE(s), not LSE(s / T)
            raise ValueError(
                f"one_minus_prob weights need teacher_topk.lse at temperature 1, but teacher_topk.temperature = "
                f"{teacher_topk.temperature}: label with temperature=1, or use negative_weighting='sigmoid'"
            )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("an on-the-fly teacher needs both teacher_hidden and teacher_weight")
        teacher_hidden = as_tensor(teacher_hidden, "teacher_hidden")
        teacher_weight = as_tensor(teacher_weight, "teacher_weight")
        _check_same(teacher_hidden, "teacher_hidden", h)
        _check_same(teacher_weight, "teacher_weight", h)
        if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != B:
            raise ValueError(f"teacher_hidden must have shape [B, d_t] with B = {B}, got {tuple(teacher_hidden.shape)}")
        if teacher_weight.shape != (V, teacher_hidden.shape[1]):
            raise ValueError(
                f"teacher_weight must have shape [V, d_t] = [{V}, {teacher_hidden.shape[1]}], "
                f"got {tuple(teacher_weight.shape)}"
            )
        if teacher_bias is not None:
            teacher_bias = as_tensor(teacher_bias, "teacher_bias")
            _check_bias(teacher_bias, "teacher_bias", V, h)
        # the teacher never receives a gradient
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()

    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__} {exact!r}")
    eps = default_filter_eps(h.dtype) if filter_eps is None else check_real("filter_eps", filter_eps, finite=True)
    if not eps >= 0:
        raise ValueError(f"filter_eps must be >= 0, got {eps}")
    if exact:
        eps = 0.0
    tile = check_tile_size(tile_size)

    losses, _ = ops.fused_linear_loss_forward(
        h, W, student_bias, int_target, indptr, indices, teacher_logits, teacher_hidden, teacher_weight,
        teacher_bias, topk_indices, topk_logits, topk_lse, hard_weight, soft_weight, double_weight, temperature,
        negative_weighting, negative_scale, negative_shift, label_smoothing, ignore_index, tile, eps,
    )
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if indptr is not None:
        return total / (indptr[-1] - indptr[0])
    if int_target is not None:
        return total / (int_target != ignore_index).sum()
    return total / B


class FusedLinearDistillationLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_distillation_loss`; keywords fixed at construction.

    ``forward(student_weight, student_hidden, target=None, student_bias=None, teacher=None)``
    takes the weight first, as Liger-Kernel's fused linear losses do. ``teacher`` is dense
    logits (a tensor), a :class:`kdfast.TopK`, or a :class:`kdfast.LinearTeacher` /
    ``(hidden, weight[, bias])`` tuple.

    Example::

        head = torch.nn.Linear(64, 670_091)
        loss_fn = kdfast.FusedLinearDistillationLoss(hard_weight=0.0, double_weight=1.0)
        loss = loss_fn(head.weight, hidden, target, head.bias, teacher=kdfast.TopK(idx, logits, lse))
    """

    def __init__(self, **keywords: Any) -> None:
        super().__init__()
        bad = {"student_hidden", "student_weight", "target", "student_bias", "teacher_logits", "teacher_hidden",
               "teacher_weight", "teacher_bias", "teacher_topk"} & set(keywords)
        if bad:
            raise TypeError(f"{sorted(bad)} are forward() arguments, not keywords of the module")
        self.keywords = keywords

    def forward(
        self,
        student_weight: Tensor,
        student_hidden: Tensor,
        target: Tensor | MultiTarget | None = None,
        student_bias: Tensor | None = None,
        teacher: Teacher | None = None,
    ) -> Tensor:
        teacher_kw: dict[str, Any] = {}
        if isinstance(teacher, TopK):
            teacher_kw["teacher_topk"] = teacher
        elif isinstance(teacher, (tuple, list)):
            t = LinearTeacher(*teacher)
            teacher_kw.update(teacher_hidden=t.hidden, teacher_weight=t.weight, teacher_bias=t.bias)
        elif isinstance(teacher, Tensor) or hasattr(teacher, "__dlpack__"):
            teacher_kw["teacher_logits"] = teacher
        elif teacher is not None:
            raise TypeError(
                "teacher must be dense logits (a tensor), a kdfast.TopK, or a kdfast.LinearTeacher / "
                f"(hidden, weight[, bias]) tuple, got {type(teacher).__name__}"
            )
        return fused_linear_distillation_loss(
            student_hidden, student_weight, target, student_bias=student_bias, **teacher_kw, **self.keywords
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
