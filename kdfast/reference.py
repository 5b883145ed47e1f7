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
    "effective_student_logits",
    "eigenprojection",
    "hard_loss",
    "log_negative_weights",
    "soft_loss",
    "teacher_topk",
]


def _weighted_dot(q: Tensor, x: Tensor) -> Tensor:
    """Row-wise ``sum_j q_j * x_j`` with ``0 * anything = 0`` (a NaN ``q_j``, as a softmax of a row
    of -inf or +inf logits gives, stays NaN, as in the kernels)."""
    return torch.where(q == 0, torch.zeros_like(x), q * x).sum(-1)


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
        # log(1 - sigmoid(z)) = -softplus(z) = -(max(z, 0) + log1p(exp(-|z|))), exact in both tails
        # (F.softplus returns z itself above its threshold of 20: up to e^-20 = 2e-9 short)
        z = negative_scale * (s - negative_shift)
        return -(z.clamp(min=0) + torch.log1p(torch.exp(-z.abs())))
    if negative_weighting == "one_minus_prob":
        # (1 - p rounded from a p near 1 loses digits, as the kernels' log-partitions do: a confident
        # teacher's top class gets a log w off by ~eps / (1 - p) relative)
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


def eigenprojection(weights: Tensor, basis: Tensor) -> Tensor:
    """Reference of :func:`kdfast.ops.eigenprojection`: ``||W_t v_i||`` for weights
    ``[T, k, d]`` and basis ``[d, r]``, by einsum then a norm over the k rows."""
    return torch.einsum("tkd,dr->tkr", weights, basis).norm(dim=1)


def effective_student_logits(
    teacher_logits: Tensor, hard_labels: Tensor, soft_ratio: float, temperature: float
) -> Tensor:
    """Reference of :func:`kdfast.ops.effective_student_logits`: one
    ``scipy.optimize.brentq`` per element on
    ``(rho/T)(sigmoid(z/T) - sigmoid(z_t/T)) + (1 - rho)(sigmoid(z) - y)``,
    bracketed by doubling; ``+-inf`` where the root is infinite. g is computed in
    ``decimal`` arithmetic (no underflow: where the label agrees with a large teacher logit
    every term near the root is about e^(-|z_t|/T)) and handed to brentq as a float
    after multiplying by e^(|z_t|/T) in that case."""
    import math
    from decimal import Decimal, localcontext

    from scipy.optimize import brentq

    rho, T = float(soft_ratio), float(temperature)

    def solve(zt: float, y: float) -> float:
        if math.isnan(zt) or math.isnan(y):
            return math.nan
        if rho == 1:
            return zt
        if rho == 0:
            return math.inf if y >= 1 else -math.inf if y <= 0 else math.log(y / (1 - y))
        if (y >= 1 and zt == math.inf) or (y <= 0 and zt == -math.inf):
            return zt  # g keeps one sign at every finite z
        agrees = (y >= 1 and zt > 0) or (y <= 0 and zt < 0)

        def g(z: float) -> float:
            with localcontext() as ctx:
                ctx.prec = 40

                def sig(x: float) -> Decimal:
                    return 1 / (1 + (-Decimal(x)).exp())

                def difference(a: float, b: float) -> Decimal:  # sigmoid(a) - sigmoid(b), exact near 1 too
                    return sig(-b) - sig(-a) if a > 0 and b > 0 else sig(a) - sig(b)

                label_term = (1 - Decimal(y)) - sig(-z) if z > 0 else sig(z) - Decimal(y)
                value = Decimal(rho) / Decimal(T) * difference(z / T, zt / T) + (1 - Decimal(rho)) * label_term
                scale = (Decimal(abs(zt)) / Decimal(T)).exp() if agrees else Decimal(1)
                return float(value * scale)

        lo, hi = -1.0, 1.0
        while g(hi) < 0:
            lo, hi = hi, 2 * hi
            if math.isinf(hi):
                return math.inf
        while g(lo) > 0:
            lo, hi = 2 * lo, lo
            if math.isinf(lo):
                return -math.inf
        return brentq(g, lo, hi, xtol=1e-14, rtol=8.9e-16, maxiter=500)

    flat_t = teacher_logits.detach().double().flatten().tolist()
    flat_y = hard_labels.detach().double().flatten().tolist()
    out = [solve(zt, y) for zt, y in zip(flat_t, flat_y)]
    return torch.tensor(out, dtype=torch.float64).reshape(teacher_logits.shape).to(teacher_logits.dtype)
