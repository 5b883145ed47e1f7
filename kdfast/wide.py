"""Knowledge distillation in wide neural networks (seed 004, Ji & Zhu 2020).

A wide network trained to convergence behaves as its linearization at initialization,
``f(x; w) = f(x; w_0) + Δwᵀ φ(x)`` with random features ``φ(x) = ∂f(x; w_0)/∂w``, whose Gram
matrix tends to the neural tangent kernel (NTK) ``Θ``. This module holds the pieces the paper's
analysis is built from:

- :func:`effective_student_logits` — the logit a converged student reaches on each sample under
  the distillation loss (eq. 3), a kdfast op;
- :func:`relu_ntk` — the NTK (and NNGP kernel) of a fully connected ReLU network in NTK
  parameterization (eq. 1) in closed form; :class:`NTKReLUNetwork` and :func:`empirical_ntk` —
  the finite network and its empirical kernel ``φ(x)ᵀφ(x')`` (``torch.func``), to check it;
- :func:`weight_change_norms`, :func:`data_inefficiency` — ``‖Δŵ_n‖ = sqrt(Δz_nᵀ Θ_n⁻¹ Δz_n)``
  and ``I(n)`` (Definition 1) for every prefix of a sample at once;
- :func:`linearized_predictions`, :func:`transfer_risk`, :func:`feature_angles`,
  :func:`accumulative_angle_distribution` — the converged student away from its training points,
  ``P[z_t z_s < 0]`` and the angle distribution ``p(β)`` of Theorem 1 (eqs. 6–8);
- :func:`hard_label_correction`, :func:`hard_label_projection` — ``δz_h`` and
  ``⟨δŵ_h, Δŵ_c⟩`` of Theorem 2 (eq. 12).

Kernel maths is done in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor, nn

__all__ = [
    "NTKReLUNetwork",
    "accumulative_angle_distribution",
    "data_inefficiency",
    "effective_student_logits",
    "empirical_ntk",
    "feature_angles",
    "hard_label_correction",
    "hard_label_projection",
    "linearized_predictions",
    "relu_ntk",
    "transfer_risk",
    "weight_change_norms",
]


# --------------------------------------------------------------------------- argument checks


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_tensor(name: str, value: object) -> Tensor:
    value = _check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def _check_temperature(temperature: object) -> float:
    temperature = _check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def _check_labels(hard_labels: object, like: Tensor) -> Tensor:
    """Hard labels as a tensor of ``like``'s dtype, device and shape, values in [0, 1]."""
    hard_labels = _check_tensor("hard_labels", hard_labels)
    if hard_labels.shape != like.shape:
        raise ValueError(
            f"hard_labels must have teacher_logits' shape {tuple(like.shape)}, got {tuple(hard_labels.shape)}"
        )
    if hard_labels.is_complex():
        raise TypeError(f"hard_labels must be real (bool, integer or float), got {hard_labels.dtype}")
    hard_labels = hard_labels.to(dtype=like.dtype, device=like.device)
    bad = (hard_labels < 0) | (hard_labels > 1) | torch.isnan(hard_labels)
    if bool(bad.any()):
        raise ValueError(f"hard_labels must lie in [0, 1], got {hard_labels[bad].flatten()[0].item()}")
    return hard_labels


def _check_kernel(name: str, kernel: object) -> Tensor:
    kernel = _check_float_tensor(name, kernel)
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(kernel.shape)}")
    return kernel


# Smallest squared Cholesky pivot, relative to the largest diagonal entry, that we accept: a
# duplicate input leaves a pivot at rounding level (~1e-16); 2000 uniform points in 2-d give ~5e-5.
_MIN_RELATIVE_PIVOT = 1e-12


def _cholesky(name: str, kernel: Tensor) -> Tensor:
    """Lower Cholesky factor (float64) of a (numerically) positive definite kernel matrix."""
    kernel = kernel.double()
    factor, info = torch.linalg.cholesky_ex(kernel)
    if int(info) != 0 or float((factor.diagonal() ** 2).min()) <= _MIN_RELATIVE_PIVOT * float(kernel.diagonal().max()):
        raise ValueError(
            f"{name} is not numerically positive definite; duplicate (or nearly duplicate) inputs make the NTK "
            "Gram matrix singular"
        )
    return factor


# --------------------------------------------------------------------------- eq. (3)


def effective_student_logits(
    teacher_logits: Tensor, hard_labels: Tensor, *, soft_ratio: float, temperature: float
) -> Tensor:
    r"""The converged student logit of every sample under the distillation loss (eq. 3).

    A wide student trained to convergence on
    ``ℓ = ρ H(σ(z_t/T), σ(z/T)) + (1 − ρ) H(y, σ(z))`` (binary cross-entropy ``H``) reaches, on
    each training sample, the root ``ẑ`` of

    .. math::  \frac{ρ}{T}\big(σ(ẑ/T) − σ(z_t/T)\big) + (1 − ρ)\big(σ(ẑ) − y\big) = 0,

    which is unique since the left side increases in ``ẑ``. ``ρ = 1`` gives ``ẑ = z_t``;
    ``ρ = 0`` gives ``logit(y)`` (``±inf`` for ``y ∈ {0, 1}``). Solved elementwise in float64 by
    the ``torch.ops.kdfast.effective_student_logits`` op; differentiable in ``teacher_logits``
    (and ``hard_labels``) by the implicit function theorem.

    Args:
        teacher_logits: teacher logits ``z_t``, any shape, floating point.
        hard_labels: ground-truth labels ``y`` of the same shape; bool, integer or float, values
            in [0, 1] (cast to ``teacher_logits``' dtype).
        soft_ratio: ``ρ`` in [0, 1], the weight of the teacher's soft labels.
        temperature: ``T > 0``.

    Returns:
        ``ẑ`` in ``teacher_logits``' shape and dtype.
    """
    from . import ops

    teacher_logits = _check_float_tensor("teacher_logits", teacher_logits)
    hard_labels = _check_labels(hard_labels, teacher_logits)
    soft_ratio = _check_real("soft_ratio", soft_ratio)
    if not 0.0 <= soft_ratio <= 1.0:
        raise ValueError(f"soft_ratio must lie in [0, 1], got {soft_ratio}")
    temperature = _check_temperature(temperature)
    return ops.effective_student_logits(teacher_logits, hard_labels, soft_ratio, temperature)


# --------------------------------------------------------------------------- the NTK, analytic and empirical


def relu_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    weight_std: float = 1.0,
    bias_std: float = 1.0,
    return_nngp: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The NTK of a fully connected ReLU network in NTK parameterization, in closed form.

    The network (eq. 1) with ``depth = L`` hidden layers of width ``m → ∞``:
    ``h¹ = σ_W W⁰x/√d + σ_b b⁰``, ``h^{l+1} = σ_W W^l g(h^l)/√m + σ_b b^l``,
    ``f = σ_W W^L g(h^L)/√m + σ_b b^L``, all weights ``N(0, 1)``, ``g = ReLU``. With
    ``Σ¹(x, x') = σ_W² xᵀx'/d + σ_b²`` and, for ``l = 1 … L``, the arc-cosine recursion

    .. math::
        Σ^{l+1} = \frac{σ_W^2}{2π} \sqrt{Σ^l_{xx} Σ^l_{x'x'}}\,(\sin θ + (π − θ)\cos θ) + σ_b^2,\quad
        \dot Σ^{l+1} = \frac{σ_W^2}{2π}(π − θ),\quad
        θ = \arccos \frac{Σ^l_{xx'}}{\sqrt{Σ^l_{xx} Σ^l_{x'x'}}},

    the NTK is ``Θ^{L+1}`` of ``Θ¹ = Σ¹``, ``Θ^{l+1} = Σ^{l+1} + Σ̇^{l+1} Θ^l`` (Jacot et al. 2018),
    and ``Σ^{L+1}`` is the NNGP kernel: the covariance of the output at initialization.

    Args:
        x1: inputs ``[n1, d]``.
        x2: inputs ``[n2, d]``; ``None`` for ``x1`` itself (the Gram matrix).
        depth: number of hidden layers ``L ≥ 1``.
        weight_std, bias_std: ``σ_W`` and ``σ_b`` (the paper uses 1 and 1).
        return_nngp: also return the NNGP kernel.

    Returns:
        ``Θ(x1, x2)`` as ``[n1, n2]`` float64, and ``Σ^{L+1}(x1, x2)`` when ``return_nngp``.
    """
    x1 = _check_float_tensor("x1", x1)
    if x1.dim() != 2:
        raise ValueError(f"x1 must be [n, d], got shape {tuple(x1.shape)}")
    x2 = x1 if x2 is None else _check_float_tensor("x2", x2)
    if x2.dim() != 2 or x2.shape[1] != x1.shape[1]:
        raise ValueError(f"x2 must be [n, {x1.shape[1]}] like x1, got shape {tuple(x2.shape)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    sw2 = _check_real("weight_std", weight_std) ** 2
    sb2 = _check_real("bias_std", bias_std) ** 2
    a, b = x1.double(), x2.double()
    d = a.shape[1]
    cross = sw2 * (a @ b.T) / d + sb2
    diag1 = sw2 * (a * a).sum(1) / d + sb2
    diag2 = sw2 * (b * b).sum(1) / d + sb2
    ntk = cross
    for _ in range(depth):
        norms = torch.sqrt(diag1[:, None] * diag2[None, :])
        cos = (cross / norms).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        cross = sw2 / (2 * math.pi) * norms * (torch.sin(theta) + (math.pi - theta) * cos) + sb2
        derivative = sw2 / (2 * math.pi) * (math.pi - theta)
        ntk = cross + derivative * ntk
        diag1 = sw2 * diag1 / 2 + sb2  # θ = 0 on the diagonal
        diag2 = sw2 * diag2 / 2 + sb2
    return (ntk, cross) if return_nngp else ntk


class NTKReLUNetwork(nn.Module):
    """A finite fully connected ReLU network in NTK parameterization (eq. 1).

    ``depth`` hidden layers of ``width`` units and one output logit; every weight and bias is
    drawn from ``N(0, 1)`` and the layers scale by ``σ_W/√fan_in`` and ``σ_b``. As ``width → ∞``
    its empirical NTK tends to :func:`relu_ntk`.
    """

    def __init__(self, input_dim: int, width: int, depth: int, *, weight_std: float = 1.0,
                 bias_std: float = 1.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value, least in (("input_dim", input_dim, 1), ("width", width, 1), ("depth", depth, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.weight_std = _check_real("weight_std", weight_std)
        self.bias_std = _check_real("bias_std", bias_std)
        dims = [input_dim] + [width] * depth + [1]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(dims[i + 1], dims[i], generator=generator, dtype=dtype))
            for i in range(len(dims) - 1)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.randn(dims[i + 1], generator=generator, dtype=dtype)) for i in range(len(dims) - 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[n]`` of inputs ``[n, input_dim]``."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i > 0:
                h = torch.relu(h)
            h = self.weight_std * h @ w.T / math.sqrt(w.shape[1]) + self.bias_std * b
        return h.squeeze(-1)


def empirical_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None) -> Tensor:
    """The empirical NTK ``φ(x1)ᵀ φ(x2)``, ``φ(x) = ∂f(x; w)/∂w``, of a scalar-output model.

    The per-sample Jacobians w.r.t. every parameter come from ``torch.func.jacrev`` under
    ``vmap`` (memory ``(n1 + n2) × #parameters``).

    Args:
        model: maps inputs ``[n, d]`` to logits ``[n]``.
        x1, x2: inputs; ``x2 = None`` for the Gram matrix of ``x1``.

    Returns:
        ``[n1, n2]`` in the parameters' dtype.
    """
    from torch.func import functional_call, jacrev, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x1 = _check_float_tensor("x1", x1)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logit(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(())

    def jacobian(x: Tensor) -> Tensor:
        jac = vmap(jacrev(logit), in_dims=(None, 0))(params, x)
        return torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)

    j1 = jacobian(x1)
    j2 = j1 if x2 is None else jacobian(_check_float_tensor("x2", x2))
    return j1 @ j2.T


# --------------------------------------------------------------------------- converged linearized students


def weight_change_norms(kernel: Tensor, delta_z: Tensor) -> Tensor:
    r"""``‖Δŵ_n‖ = sqrt(Δz_nᵀ Θ_n⁻¹ Δz_n)`` for every prefix ``n = 1 … N`` of a sample.

    The converged linearized student trained on ``x_1 … x_n`` has the minimum-norm weight change
    ``Δŵ_n = φ(X_n) Θ_n⁻¹ Δz_n`` (eq. 4), ``Δz = z_target − z_0``, so
    ``‖Δŵ_n‖² = Δz_nᵀ Θ_n⁻¹ Δz_n``. With the Cholesky factor ``Θ_N = L Lᵀ``, the leading block
    ``L_n`` factors ``Θ_n``, hence with ``u = L⁻¹ Δz`` every prefix at once:
    ``‖Δŵ_n‖² = Σ_{i ≤ n} u_i²`` (one ``O(N³)`` factorization instead of ``N``).

    Args:
        kernel: ``Θ(X, X)`` ``[N, N]``, positive definite.
        delta_z: ``[N]`` or ``[N, k]`` (``k`` target vectors sharing the inputs).

    Returns:
        float64 ``[N]`` or ``[N, k]``: row ``n − 1`` holds ``‖Δŵ_n‖``.
    """
    kernel = _check_kernel("kernel", kernel)
    delta_z = _check_float_tensor("delta_z", delta_z)
    if delta_z.dim() not in (1, 2) or delta_z.shape[0] != kernel.shape[0]:
        raise ValueError(f"delta_z must be [{kernel.shape[0]}] or [{kernel.shape[0]}, k], got {tuple(delta_z.shape)}")
    factor = _cholesky("kernel", kernel)
    rhs = delta_z.double().reshape(kernel.shape[0], -1)
    u = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.sqrt(torch.cumsum(u * u, dim=0)).reshape(delta_z.shape)


def data_inefficiency(mean_norms: Tensor) -> Tensor:
    r"""Data inefficiency ``I(n) = n [ln E‖Δŵ_{n+1}‖ − ln E‖Δŵ_n‖]`` (Definition 1, eq. 10).

    A discrete ``∂ ln ‖Δŵ‖ / ∂ ln n``: near 0 when the weight change has converged (the task is
    learnt from few samples), a positive constant ``c`` when it keeps growing as ``n^c``.

    Args:
        mean_norms: ``E‖Δŵ_n‖`` for ``n = 1 … N`` along the last dimension (e.g. the mean over
            runs of :func:`weight_change_norms`), positive.

    Returns:
        ``I(n)`` for ``n = 1 … N − 1`` along the last dimension (float64).
    """
    mean_norms = _check_float_tensor("mean_norms", mean_norms).double()
    if mean_norms.dim() == 0 or mean_norms.shape[-1] < 2:
        raise ValueError(f"mean_norms needs at least 2 sample sizes along its last dimension, got {tuple(mean_norms.shape)}")
    if bool((mean_norms <= 0).any()):
        raise ValueError("mean_norms must be positive")
    n = torch.arange(1, mean_norms.shape[-1], dtype=torch.float64)
    return n * torch.diff(torch.log(mean_norms), dim=-1)


def linearized_predictions(
    kernel_train: Tensor, kernel_test_train: Tensor, delta_z: Tensor, sizes: Sequence[int]
) -> Tensor:
    r"""Outputs at test points of the converged linearized student trained on each prefix.

    Trained on ``X_n = x_1 … x_n`` to targets ``z_n = z_0 + Δz_n``, the linearized network moves
    every output by ``Δz(x) = φ(x)ᵀ Δŵ_n = Θ(x, X_n) Θ_n⁻¹ Δz_n``. With ``Θ_N = L Lᵀ`` and
    ``B = Θ(X_test, X) L⁻ᵀ`` (upper-triangular ``L⁻ᵀ``, so ``B[:, :n] = Θ(X_test, X_n) L_n⁻ᵀ``),
    ``Δz(X_test) = B[:, :n] u[:n]`` with ``u = L⁻¹Δz``, for every ``n`` from one factorization.

    Args:
        kernel_train: ``Θ(X, X)`` ``[N, N]``.
        kernel_test_train: ``Θ(X_test, X)`` ``[M, N]``.
        delta_z: ``[N]`` or ``[N, k]`` target changes at the training points.
        sizes: the prefix lengths ``n`` (each in ``1 … N``).

    Returns:
        float64 ``[len(sizes), M]`` (or ``[len(sizes), M, k]``): the output changes ``Δz(X_test)``
        (add the student's initial outputs ``z_0(X_test)`` for its logits).
    """
    kernel_train = _check_kernel("kernel_train", kernel_train)
    kernel_test_train = _check_float_tensor("kernel_test_train", kernel_test_train)
    N = kernel_train.shape[0]
    if kernel_test_train.dim() != 2 or kernel_test_train.shape[1] != N:
        raise ValueError(f"kernel_test_train must be [M, {N}], got {tuple(kernel_test_train.shape)}")
    delta_z = _check_float_tensor("delta_z", delta_z)
    if delta_z.dim() not in (1, 2) or delta_z.shape[0] != N:
        raise ValueError(f"delta_z must be [{N}] or [{N}, k], got {tuple(delta_z.shape)}")
    sizes = list(sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= N for n in sizes):
        raise ValueError(f"sizes must be integers in [1, {N}], got {sizes}")
    factor = _cholesky("kernel_train", kernel_train)
    b = torch.linalg.solve_triangular(factor, kernel_test_train.double().T, upper=False).T  # [M, N]
    u = torch.linalg.solve_triangular(factor, delta_z.double().reshape(N, -1), upper=False)  # [N, k]
    out = torch.stack([b[:, :n] @ u[:n] for n in sizes])  # [S, M, k]
    return out.squeeze(-1) if delta_z.dim() == 1 else out


def transfer_risk(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Transfer risk ``P[z_t · z_s < 0]``: the fraction of points where student and teacher disagree.

    Args:
        teacher_logits: ``[..., M]``.
        student_logits: ``[..., M]`` (broadcast against ``teacher_logits``).

    Returns:
        The fraction over the last dimension (float64).
    """
    teacher_logits = _check_float_tensor("teacher_logits", teacher_logits)
    student_logits = _check_float_tensor("student_logits", student_logits)
    return ((teacher_logits.double() * student_logits.double()) < 0).double().mean(-1)


def feature_angles(logits: Tensor, kernel_diag: Tensor, weight_norm: float | Tensor) -> Tensor:
    r"""Acute angles ``ᾱ(φ(x), Δw)`` between random features and a weight change (eq. 8).

    For a weight change ``Δw`` with outputs ``z(x) = Δwᵀφ(x)``,
    ``cos ᾱ = |z(x)| / (‖Δw‖ ‖φ(x)‖)`` and ``‖φ(x)‖² = Θ(x, x)``.

    Args:
        logits: ``z(x)`` at the points.
        kernel_diag: ``Θ(x, x)`` at the same points.
        weight_norm: ``‖Δw‖`` (> 0).

    Returns:
        Angles in ``[0, π/2]`` (float64).
    """
    logits = _check_float_tensor("logits", logits)
    kernel_diag = _check_float_tensor("kernel_diag", kernel_diag)
    if bool((kernel_diag <= 0).any()):
        raise ValueError("kernel_diag must be positive")
    weight_norm = torch.as_tensor(weight_norm, dtype=torch.float64)
    if bool((weight_norm <= 0).any()):
        raise ValueError("weight_norm must be positive")
    cos = logits.double().abs() / (weight_norm * kernel_diag.double().sqrt())
    return torch.arccos(cos.clamp(max=1.0))


def accumulative_angle_distribution(angles: Tensor, betas: Tensor) -> Tensor:
    """``p(β) = P[ᾱ(φ(x), Δw) > β]`` (eq. 6), the empirical fraction of ``angles`` above each ``β``.

    Theorem 1 bounds the transfer risk by ``p(π/2 − ᾱ_n)``, ``ᾱ_n`` the angle between the
    student's and the oracle's weight change.

    Args:
        angles: ``[M]`` sample of angles (:func:`feature_angles`).
        betas: the ``β`` at which to evaluate.

    Returns:
        float64 in ``betas``' shape.
    """
    angles = _check_float_tensor("angles", angles).double().flatten()
    betas = torch.as_tensor(betas, dtype=torch.float64)
    return (angles[:, None] > betas.flatten()[None, :]).double().mean(0).reshape(betas.shape)


# --------------------------------------------------------------------------- Theorem 2


def hard_label_correction(teacher_logits: Tensor, hard_labels: Tensor, *, temperature: float) -> Tensor:
    r"""Correction logits ``δz_h = ∂ẑ/∂(1 − ρ)`` at ``ρ = 1`` (Theorem 2: ``ẑ ≈ z_t + (1 − ρ) δz_h``).

    Differentiating eq. 3 at ``ρ = 1``, where ``ẑ = z_t``:
    ``δz_h = T² (y − σ(z_t)) / σ'(z_t/T) = T² (y − σ(z_t)) (2 + 2 cosh(z_t/T))``.

    Args:
        teacher_logits: ``z_t``.
        hard_labels: ``y`` in [0, 1] of the same shape (bool, integer or float).
        temperature: ``T > 0``.

    Returns:
        ``δz_h`` in float64.
    """
    teacher_logits = _check_float_tensor("teacher_logits", teacher_logits)
    hard_labels = _check_labels(hard_labels, teacher_logits)
    temperature = _check_temperature(temperature)
    z = teacher_logits.double()
    return temperature**2 * (hard_labels.double() - torch.sigmoid(z)) * (2 + 2 * torch.cosh(z / temperature))


def hard_label_projection(kernel: Tensor, delta_z_g: Tensor, delta_z_t: Tensor, delta_z_h: Tensor) -> Tensor:
    r"""``⟨δŵ_h, Δŵ_c⟩`` of Theorem 2: does adding hard labels turn the student toward the oracle?

    With ``⟨a, b⟩_Θ = aᵀ Θ_n⁻¹ b`` over the ``n`` training points,

    .. math::  ⟨δŵ_h, Δŵ_c⟩ = ⟨Δz_g, δz_h⟩_Θ − \frac{⟨Δz_g, Δz_t⟩_Θ}{⟨Δz_t, Δz_t⟩_Θ} ⟨Δz_t, δz_h⟩_Θ,

    the projection of the hard labels' weight change ``δŵ_h = φ Θ_n⁻¹ δz_h`` on the part
    ``Δŵ_c`` of the ground truth's weight change orthogonal to the teacher's. Dividing by
    ``‖Δw_g‖ sqrt(⟨Δz_t, Δz_t⟩_Θ)`` gives ``∂ cos α(Δŵ, Δw_g) / ∂(1 − ρ)`` at ``ρ = 1`` (eq. 12);
    its sign is the sign of this projection.

    Args:
        kernel: ``Θ_n`` ``[n, n]``.
        delta_z_g: ``[n]`` ground-truth logit changes ``z_g − z_0``.
        delta_z_t: ``[n]`` teacher logit changes ``z_t − z_0``, or ``[n, k]`` for ``k`` teachers at once.
        delta_z_h: the correction logits (:func:`hard_label_correction`) in ``delta_z_t``'s shape.

    Returns:
        float64: a scalar, or ``[k]`` for ``[n, k]`` teachers.
    """
    kernel = _check_kernel("kernel", kernel)
    n = kernel.shape[0]
    delta_z_g = _check_float_tensor("delta_z_g", delta_z_g)
    if delta_z_g.shape != (n,):
        raise ValueError(f"delta_z_g must be [{n}], got {tuple(delta_z_g.shape)}")
    delta_z_t = _check_float_tensor("delta_z_t", delta_z_t)
    if delta_z_t.dim() not in (1, 2) or delta_z_t.shape[0] != n:
        raise ValueError(f"delta_z_t must be [{n}] or [{n}, k], got {tuple(delta_z_t.shape)}")
    delta_z_h = _check_float_tensor("delta_z_h", delta_z_h)
    if delta_z_h.shape != delta_z_t.shape:
        raise ValueError(f"delta_z_h must have delta_z_t's shape {tuple(delta_z_t.shape)}, got {tuple(delta_z_h.shape)}")
    factor = _cholesky("kernel", kernel)
    k = 1 if delta_z_t.dim() == 1 else delta_z_t.shape[1]
    rhs = torch.cat([delta_z_g.double()[:, None], delta_z_t.double().reshape(n, k), delta_z_h.double().reshape(n, k)], 1)
    u = torch.linalg.solve_triangular(factor, rhs, upper=False)  # ⟨a, b⟩_Θ = (L⁻¹a)·(L⁻¹b)
    g, t, h = u[:, :1], u[:, 1 : 1 + k], u[:, 1 + k :]
    tt = (t * t).sum(0)
    if bool((tt == 0).any()):
        raise ValueError("delta_z_t must not be zero (the teacher's weight change defines the projection)")
    out = (g * h).sum(0) - (g * t).sum(0) / tt * (t * h).sum(0)
    return out[0] if delta_z_t.dim() == 1 else out
