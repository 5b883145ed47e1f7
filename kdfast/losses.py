"""The loss API: :func:`distillation_loss` and its ``nn.Module``, :class:`DistillationLoss`.

One op computes every term of ``shared/DESIGN.md`` section 2 in one pass over
the classes of each row (online max/sum), and its backward recomputes the
softmaxes from eight saved numbers per row; no extra ``[B, V]`` tensor is made
besides the gradient itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_int, check_real

__all__ = ["DistillationLoss", "as_tensor", "distillation_loss"]

REDUCTIONS = ("mean", "sum", "none")
NEGATIVE_WEIGHTINGS = ("sigmoid", "one_minus_prob")


def as_tensor(x: Any, name: str) -> Tensor:
    """Return ``x`` as a torch tensor, taking arrays of other libraries (cupy, numpy, jax)
    through DLPack without a copy."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    raise TypeError(f"{name} must be a torch.Tensor or a DLPack-capable array, got {type(x).__name__}")


def _check_loss_keywords(
    hard_weight: float,
    soft_weight: float,
    double_weight: float,
    temperature: float,
    negative_weighting: str,
    negative_scale: float,
    negative_shift: float,
    label_smoothing: float,
    reduction: str,
    ignore_index: int,
) -> tuple[float, float, float, float, float, float, float, int]:
    """The loss keywords shared by every loss function; returns the numeric ones, as floats
    ``(hard_weight, soft_weight, double_weight, temperature, negative_scale, negative_shift,
    label_smoothing)`` and the int ``ignore_index``."""
    hard_weight = check_real("hard_weight", hard_weight, finite=True)
    soft_weight = check_real("soft_weight", soft_weight, finite=True)
    double_weight = check_real("double_weight", double_weight, finite=True)
    temperature = check_real("temperature", temperature, finite=True)
    negative_scale = check_real("negative_scale", negative_scale, finite=True)
    negative_shift = check_real("negative_shift", negative_shift, finite=True)
    label_smoothing = check_real("label_smoothing", label_smoothing, finite=True)
    for name, w in (("hard_weight", hard_weight), ("soft_weight", soft_weight), ("double_weight", double_weight)):
        if not w >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {w}")
    if hard_weight == 0 and soft_weight == 0 and double_weight == 0:
        raise ValueError("all of hard_weight, soft_weight and double_weight are 0: there is no loss to compute")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if negative_weighting not in NEGATIVE_WEIGHTINGS:
        raise ValueError(f"negative_weighting must be one of {NEGATIVE_WEIGHTINGS}, got {negative_weighting!r}")
    if double_weight > 0 and negative_weighting == "sigmoid" and not negative_scale > 0:
        # the paper's a > 0: the weight falls as the teacher's logit grows
        raise ValueError(f"negative_scale must be > 0, got {negative_scale}")
    ignore_index = check_int("ignore_index", ignore_index)
    return (hard_weight, soft_weight, double_weight, temperature, negative_scale, negative_shift, label_smoothing,
            ignore_index)


def _check_int_target(target: Tensor, B: int, device: torch.device, against: str) -> None:
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indices, got dtype {target.dtype}")
    if target.shape != (B,):
        raise ValueError(f"target must have shape [B] = [{B}], got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {against} is on {device}")


def _validate(
    student_logits: Tensor,
    target: Tensor | None,
    teacher_logits: Tensor | None,
    hard_weight: float,
    soft_weight: float,
    double_weight: float,
) -> None:
    """Everything that can be checked from shapes and dtypes alone (so it also runs
    under ``torch.compile``); target values are checked by the kernel."""
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got dtype {student_logits.dtype}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [B, V], got {tuple(student_logits.shape)}")
    B, V = student_logits.shape
    if V == 0:
        raise ValueError("student_logits must have at least one class (V = 0)")
    if target is not None:
        _check_int_target(target, B, student_logits.device, "student_logits")
    elif hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} needs target (hard labels); pass target or set hard_weight=0")
    if teacher_logits is not None:
        if teacher_logits.dtype != student_logits.dtype:
            raise TypeError(
                f"teacher_logits has dtype {teacher_logits.dtype} but student_logits has {student_logits.dtype}; "
                "convert one of them with .to()"
            )
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                f"got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.device != student_logits.device:
            raise ValueError(
                f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
            )
    else:
        for name, w in (("soft_weight", soft_weight), ("double_weight", double_weight)):
            if w > 0:
                raise ValueError(f"{name}={w} needs teacher_logits; pass teacher_logits or set {name}=0")


def _reduce(losses: Tensor, target: Tensor | None, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / losses.shape[0]
    # like F.cross_entropy: NaN when every row is ignored (0 / 0)
    return total / (target != ignore_index).sum()


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
    r"""Hard cross-entropy, soft distillation and double distillation on dense logits.

    Per row, with student logits ``f``, teacher logits ``s`` and hard label ``y``::

        loss = hard_weight   * CE(f, y)                                (label smoothing eps)
             + soft_weight   * T^2 * KL(softmax(s/T) || softmax(f/T))
             + double_weight * [LSE(f + log w) - <softmax(s), f>]      (seed 003, eq. 13)

    with negative weights ``w = 1 - sigmoid(a * (s - b))`` (``negative_weighting="sigmoid"``,
    ``a = negative_scale > 0``, ``b = negative_shift``) or ``w = 1 - softmax(s)``
    (``"one_minus_prob"``).

    Args:
        student_logits: ``[B, V]`` float16, bfloat16, float32 or float64; receives the gradient.
        target: ``[B]`` int64 class indices in ``[0, V)``; rows equal to ``ignore_index``
            contribute to no term. Needed when ``hard_weight > 0``; without it every row counts.
            Any other value raises a ``ValueError`` on the CPU; on CUDA it is checked on the
            device (a device-side assertion; ``KDFAST_CUDA_HOST_CHECKS=1``: the ``ValueError``,
            for one sync per call), as :func:`kdfast.fused_linear_distillation_loss` says.
        teacher_logits: ``[B, V]``, same dtype and device as the student; never receives a
            gradient. Needed when ``soft_weight > 0`` or ``double_weight > 0``.
        reduction: ``"mean"`` (over counted rows; NaN when none counts, like
            ``F.cross_entropy``), ``"sum"`` or ``"none"`` (a ``[B]`` tensor, 0 on ignored rows).

    Returns:
        The loss, in the dtype of ``student_logits`` (accumulated in float32, or float64
        for float64 inputs).

    NaN or infinity in the logits propagates to the loss (a ``-inf`` student logit on a
    class with positive weight gives ``+inf``); it never crashes. Arrays from other
    libraries are taken through DLPack.
    """
    student_logits = as_tensor(student_logits, "student_logits")
    target = None if target is None else as_tensor(target, "target")
    teacher_logits = None if teacher_logits is None else as_tensor(teacher_logits, "teacher_logits")
    (hard_weight, soft_weight, double_weight, temperature, negative_scale, negative_shift, label_smoothing,
     ignore_index) = _check_loss_keywords(
        hard_weight, soft_weight, double_weight, temperature, negative_weighting, negative_scale,
        negative_shift, label_smoothing, reduction, ignore_index,
    )
    _validate(student_logits, target, teacher_logits, hard_weight, soft_weight, double_weight)
    if teacher_logits is not None and soft_weight == 0 and double_weight == 0:
        teacher_logits = None  # not needed: skip reading it
    losses, _ = ops.distillation_loss_forward(
        student_logits, target, teacher_logits, hard_weight, soft_weight, double_weight,
        temperature, negative_weighting, negative_scale, negative_shift, label_smoothing,
        ignore_index,
    )
    return _reduce(losses, target, ignore_index, reduction)


class DistillationLoss(nn.Module):
    """``nn.Module`` form of :func:`distillation_loss`; the keywords are fixed at construction.

    Example::

        loss_fn = kdfast.DistillationLoss(hard_weight=0.5, soft_weight=0.5, temperature=2.0)
        loss = loss_fn(student_logits, target, teacher_logits)
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.hard_weight = hard_weight
        self.soft_weight = soft_weight
        self.double_weight = double_weight
        self.temperature = temperature
        self.negative_weighting = negative_weighting
        self.negative_scale = negative_scale
        self.negative_shift = negative_shift
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self, student_logits: Tensor, target: Tensor | None = None, teacher_logits: Tensor | None = None
    ) -> Tensor:
        return distillation_loss(
            student_logits, target, teacher_logits,
            hard_weight=self.hard_weight, soft_weight=self.soft_weight, double_weight=self.double_weight,
            temperature=self.temperature, negative_weighting=self.negative_weighting,
            negative_scale=self.negative_scale, negative_shift=self.negative_shift,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, double_weight={self.double_weight}, "
            f"temperature={self.temperature}, negative_weighting={self.negative_weighting!r}, "
            f"reduction={self.reduction!r}"
        )
