"""Plain-PyTorch reference maths: the oracle every kdfast test compares against.

Nothing here is fast or memory-lean: each function materializes the full
``[B, V]`` tensors it needs, in whatever dtype it is given (pass float64 for a
high-precision oracle). The formulas are those of ``shared/DESIGN.md`` section 2:

    L(f) = LSE(f + log w) - <q, f>,    dL/df = softmax(f + log w) - q

with one ``(q, w)`` pair per loss term:

* hard cross-entropy: ``q = (1 - eps) * onehot(y) + eps / V``, ``w = 1``;
* soft distillation (Hinton): ``T^2 * KL(softmax(s/T) || softmax(f/T))``;
* double distillation (seed 003, eq. 13): ``q = softmax(s)``,
  ``w = 1 - sigmoid(a * (s - b))`` or ``w = 1 - softmax(s)``.

Convention: a class whose positive weight ``q_j`` is exactly zero contributes
nothing to ``<q, f>`` even where ``f_j`` is infinite (``0 * inf = 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "distillation_loss",
    "double_loss",
    "hard_loss",
    "log_negative_weights",
    "soft_loss",
    "teacher_topk",
]


def _weighted_dot(q: Tensor, x: Tensor) -> Tensor:
    """Row-wise ``sum_j q_j * x_j`` with ``0 * anything = 0``."""
    return torch.where(q > 0, q * x, torch.zeros_like(x)).sum(-1)


def hard_loss(student_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-row cross-entropy with label smoothing; the target must be in range."""
    f = student_logits
    V = f.shape[-1]
    lse = torch.logsumexp(f, dim=-1)
    f_y = f.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = lse - (1.0 - label_smoothing) * f_y
    if label_smoothing > 0:
        loss = loss - (label_smoothing / V) * f.sum(-1)
    return loss


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row ``T^2 * KL(softmax(s/T) || softmax(f/T))``."""
    T = temperature
    log_p_student = torch.log_softmax(student_logits / T, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits / T, dim=-1)
    p_teacher = log_p_teacher.exp()
    kl = _weighted_dot(p_teacher, log_p_teacher - log_p_student)
    return T * T * kl


def log_negative_weights(
    teacher_logits: Tensor,
    negative_weighting: str = "sigmoid",
    negative_scale: float = 1.0,
    negative_shift: float = 0.0,
) -> Tensor:
    """``log w`` of double distillation: ``log(1 - sigmoid(a (s - b)))`` or ``log(1 - p_t)``."""
    s = teacher_logits
    if negative_weighting == "sigmoid":
        # log(1 - sigmoid(z)) = log(sigmoid(-z)) = -softplus(z), exact in the tails
        return -torch.nn.functional.softplus(negative_scale * (s - negative_shift))
    if negative_weighting == "one_minus_prob":
        return torch.log1p(-torch.softmax(s, dim=-1))
    raise ValueError(f"unknown negative_weighting {negative_weighting!r}")


def double_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    negative_weighting: str = "sigmoid",
    negative_scale: float = 1.0,
    negative_shift: float = 0.0,
) -> Tensor:
    """Per-row double distillation ``LSE(f + log w) - <softmax(s), f>``."""
    log_w = log_negative_weights(teacher_logits, negative_weighting, negative_scale, negative_shift)
    p_teacher = torch.softmax(teacher_logits, dim=-1)
    return torch.logsumexp(student_logits + log_w, dim=-1) - _weighted_dot(p_teacher, student_logits)


def distillation_loss(
    student_logits: Tensor,
    target: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    *,
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
) -> Tensor:
    """Reference of :func:`kdfast.distillation_loss`: same arguments, same result.

    Rows whose target equals ``ignore_index`` contribute zero (``"none"``) and are
    not counted by ``"mean"``; without ``target`` every row counts.
    """
    f = student_logits
    B = f.shape[0]
    if target is not None:
        counted = target != ignore_index
        safe_target = torch.where(counted, target, torch.zeros_like(target))
    else:
        counted = torch.ones(B, dtype=torch.bool, device=f.device)
        safe_target = None
    loss = torch.zeros(B, dtype=f.dtype, device=f.device)
    if hard_weight > 0:
        loss = loss + hard_weight * hard_loss(f, safe_target, label_smoothing)
    if soft_weight > 0:
        loss = loss + soft_weight * soft_loss(f, teacher_logits, temperature)
    if double_weight > 0:
        loss = loss + double_weight * double_loss(
            f, teacher_logits, negative_weighting, negative_scale, negative_shift
        )
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counted.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def teacher_topk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, k: int = 32, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`kdfast.teacher_topk` on the dense logits:
    ``(indices, logits, lse, entropy, covered)``; ties go to the lower class index."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    V = logits.shape[-1]
    # a stable sort by descending logit keeps equal logits in class order
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    top = logits.gather(-1, order)
    scaled = logits / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    log_p = scaled - lse.unsqueeze(-1)
    p = log_p.exp()
    entropy = -_weighted_dot(p, log_p)
    covered = p.gather(-1, order).sum(-1)
    assert order.shape[-1] == min(k, V)
    return order, top, lse, entropy, covered
