"""kdfast.wide (seed 004): the effective-logit op against scipy's brentq, the analytic NTK against
the empirical NTK of finite networks, the prefix solves against direct numpy solves, data
inefficiency of random labels and of the zero function, Theorems 1 and 2, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kdfast.reference as kdfast_reference
from kdfast.wide import (
    NTKReLUNetwork,
    accumulative_angle_distribution,
    data_inefficiency,
    effective_student_logits,
    empirical_ntk,
    feature_angles,
    hard_label_correction,
    hard_label_projection,
    linearized_predictions,
    relu_ntk,
    transfer_risk,
    weight_change_norms,
)

F64 = torch.float64


# --------------------------------------------------------------------------- the op against kdfast.reference (brentq)


# past |z_t| ~ 745 the terms of g near a root agreeing with the label underflow float64 unless scaled
TEACHER_LOGITS = [-math.inf, -2000.0, -800.0, -50.0, -20.0, -7.5, -2.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 2.0, 7.5,
                  20.0, 50.0, 760.0, 2000.0, math.inf]
RHOS = [0.0, 1e-3, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999, 1.0]


@pytest.mark.parametrize("T", [0.5, 1.0, 5.0])
@pytest.mark.parametrize("rho", RHOS)
def test_effective_logits_match_brentq(rho, T):
    zt = torch.tensor(TEACHER_LOGITS, dtype=F64)
    for name, labels in (("correct", (zt > 0).to(F64)), ("wrong", (zt <= 0).to(F64)), ("soft", torch.full_like(zt, 0.3))):
        got = effective_student_logits(zt, labels, soft_ratio=rho, temperature=T)
        want = kdfast_reference.effective_student_logits(zt, labels, rho, T)
        assert got.dtype == F64 and got.shape == zt.shape
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf), (name, got, want)
        assert torch.equal(got[inf], want[inf]), name
        torch.testing.assert_close(got[~inf], want[~inf], rtol=1e-10, atol=1e-10, msg=f"{name} rho={rho} T={T}")


@pytest.mark.parametrize("rho", [1e-3, 0.3, 0.5, 0.999])
def test_effective_logits_closed_form_at_temperature_1(rho):
    """At T = 1 and y = 1 the root solves sigmoid(-z) = rho sigmoid(-z_t): z = log(1 - q) - log q with
    log q = log rho - softplus(z_t), exact at any teacher logit (z_t - log rho in the tail), and so is
    its derivative; the op and its gradient must follow it out to |z_t| = 2000."""
    zt = torch.tensor([-2000.0, -800.0, -30.0, 0.0, 30.0, 700.0, 760.0, 800.0, 2000.0], dtype=F64, requires_grad=True)
    log_q = math.log(rho) - torch.nn.functional.softplus(zt)
    want = torch.log1p(-log_q.exp()) - log_q
    got = effective_student_logits(zt, torch.ones_like(zt), soft_ratio=rho, temperature=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    (want_grad,) = torch.autograd.grad(want.sum(), zt)
    (got_grad,) = torch.autograd.grad(got.sum(), zt)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # and at an infinite teacher agreeing with the label, an infinite root with zero gradient
    inf = torch.tensor([math.inf, -math.inf], dtype=F64, requires_grad=True)
    z = effective_student_logits(inf, torch.tensor([1.0, 0.0], dtype=F64), soft_ratio=rho, temperature=1.0)
    assert z.tolist() == [math.inf, -math.inf]
    assert torch.autograd.grad(z.sum(), inf)[0].tolist() == [0.0, 0.0]


def test_effective_logits_shapes_dtypes_and_label_casts():
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(3, 5, generator=gen, dtype=F64) * 10
    bool_labels = zt > 0.5
    want = effective_student_logits(zt, bool_labels.to(F64), soft_ratio=0.4, temperature=2.0)
    for labels in (bool_labels, bool_labels.long(), bool_labels.int(), bool_labels.float()):
        torch.testing.assert_close(effective_student_logits(zt, labels, soft_ratio=0.4, temperature=2.0), want)
    got32 = effective_student_logits(zt.float(), bool_labels, soft_ratio=0.4, temperature=2)  # int temperature ok
    assert got32.dtype == torch.float32 and got32.shape == (3, 5)
    torch.testing.assert_close(got32.double(), want, rtol=1e-6, atol=1e-5)
    # the two limits
    torch.testing.assert_close(effective_student_logits(zt, bool_labels, soft_ratio=1.0, temperature=3.0), zt)
    hard = effective_student_logits(zt, bool_labels, soft_ratio=0.0, temperature=3.0)
    assert torch.equal(hard, torch.where(bool_labels, math.inf, -math.inf).to(F64))
    assert effective_student_logits(torch.empty(0, dtype=F64), torch.empty(0), soft_ratio=0.5, temperature=1.0).numel() == 0


@pytest.mark.parametrize("rho,T", [(0.05, 5.0), (0.5, 1.0), (0.9, 0.5), (0.999, 2.0)])
def test_effective_logits_gradcheck(rho, T):
    gen = torch.Generator().manual_seed(1)
    zt = (torch.randn(12, generator=gen, dtype=F64) * 4).requires_grad_()
    labels = (torch.rand(12, generator=gen, dtype=F64) < 0.5).to(F64)
    assert torch.autograd.gradcheck(lambda z: effective_student_logits(z, labels, soft_ratio=rho, temperature=T), (zt,))
    soft_labels = (0.1 + 0.8 * torch.rand(12, generator=gen, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, y: effective_student_logits(z, y, soft_ratio=rho, temperature=T), (zt, soft_labels))


def test_effective_logits_gradient_matches_brentq_difference():
    """dẑ/dz_t of the op against a central difference of the brentq root of kdfast.reference."""
    zt = torch.tensor([-6.0, -1.0, 0.4, 3.0], dtype=F64, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    effective_student_logits(zt, labels, soft_ratio=0.3, temperature=2.0).sum().backward()
    h = 1e-5
    root = kdfast_reference.effective_student_logits
    fd = (root(zt.detach() + h, labels, 0.3, 2.0) - root(zt.detach() - h, labels, 0.3, 2.0)) / (2 * h)
    torch.testing.assert_close(zt.grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_effective_logits_opcheck(dtype):
    gen = torch.Generator().manual_seed(2)
    zt = (torch.randn(4, 6, generator=gen, dtype=F64) * 5).to(dtype).requires_grad_()
    labels = (torch.rand(4, 6, generator=gen) < 0.5).to(dtype)
    torch.library.opcheck(torch.ops.kdfast.effective_student_logits.default, (zt, labels, 0.3, 2.0))
    torch.library.opcheck(torch.ops.kdfast.effective_student_logits.default, (zt, labels, 1.0, 0.5))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"soft_ratio": 1.5, "temperature": 1.0}, ValueError, "soft_ratio"),
        ({"soft_ratio": -0.1, "temperature": 1.0}, ValueError, "soft_ratio"),
        ({"soft_ratio": float("nan"), "temperature": 1.0}, ValueError, "soft_ratio"),
        ({"soft_ratio": True, "temperature": 1.0}, TypeError, "soft_ratio"),
        ({"soft_ratio": "0.5", "temperature": 1.0}, TypeError, "soft_ratio"),
        ({"soft_ratio": 0.5, "temperature": 0.0}, ValueError, "temperature"),
        ({"soft_ratio": 0.5, "temperature": -2.0}, ValueError, "temperature"),
        ({"soft_ratio": 0.5, "temperature": float("inf")}, ValueError, "temperature"),
    ],
)
def test_effective_logits_bad_numbers(kwargs, error, match):
    with pytest.raises(error, match=match):
        effective_student_logits(torch.zeros(3), torch.ones(3), **kwargs)


def test_effective_logits_bad_tensors():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="hard_labels.*shape"):
        effective_student_logits(z, torch.ones(4), soft_ratio=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="hard_labels.*\\[0, 1\\]"):
        effective_student_logits(z, torch.tensor([0.0, 1.0, 2.0]), soft_ratio=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="hard_labels"):
        effective_student_logits(z, torch.tensor([0.0, float("nan"), 1.0]), soft_ratio=0.5, temperature=1.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        effective_student_logits(torch.zeros(3, dtype=torch.long), torch.ones(3), soft_ratio=0.5, temperature=1.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        effective_student_logits([0.0, 1.0], torch.ones(2), soft_ratio=0.5, temperature=1.0)
    with pytest.raises(TypeError, match="hard_labels"):
        effective_student_logits(z, [1, 0, 1], soft_ratio=0.5, temperature=1.0)
    with pytest.raises(TypeError):  # keyword-only numbers
        effective_student_logits(z, torch.ones(3), 0.5, 1.0)


# --------------------------------------------------------------------------- the NTK


def test_analytic_ntk_matches_empirical_ntk_as_width_grows():
    """Relative Frobenius error of the empirical NTK of finite networks, averaged over 3 draws,
    shrinks with width (about 1/sqrt(width)) toward the closed form."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    analytic = relu_ntk(x, depth=2)
    errors = []
    for width in (32, 256, 2048):
        errs = []
        for seed in range(3):
            net = NTKReLUNetwork(3, width, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
            errs.append(float((empirical_ntk(net, x) - analytic).norm() / analytic.norm()))
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.06, errors
    assert errors[0] / errors[2] > 3, errors  # 64x the width: ~8x in expectation


def test_analytic_ntk_cross_kernel_and_nngp():
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(5, 2, generator=gen)
    x2 = torch.randn(3, 2, generator=gen)
    ntk, nngp = relu_ntk(torch.cat([x1, x2]), depth=3, return_nngp=True)
    cross, cross_nngp = relu_ntk(x1, x2, depth=3, return_nngp=True)
    assert cross.dtype == F64 and cross.shape == (5, 3)
    torch.testing.assert_close(cross, ntk[:5, 5:])
    torch.testing.assert_close(cross_nngp, nngp[:5, 5:])
    torch.testing.assert_close(ntk, ntk.T)
    assert float(torch.linalg.eigvalsh(ntk)[0]) > 0
    assert bool((ntk >= nngp).all())  # Θ = Σ + (non-negative terms)
    # depth 1 in closed form: Σ¹ = xᵀx'/d + 1; Σ² = √(Σ¹Σ¹)(sin θ + (π − θ) cos θ)/2π + 1; Θ = Σ² + Σ¹ (π − θ)/2π
    a, b = x1[0].double(), x2[0].double()
    s_ab, s_aa, s_bb = a @ b / 2 + 1, a @ a / 2 + 1, b @ b / 2 + 1
    theta = torch.arccos(s_ab / torch.sqrt(s_aa * s_bb))
    nngp1 = torch.sqrt(s_aa * s_bb) * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi) + 1
    ntk1 = nngp1 + s_ab * (math.pi - theta) / (2 * math.pi)
    got_ntk, got_nngp = relu_ntk(x1[:1], x2[:1], depth=1, return_nngp=True)
    torch.testing.assert_close(got_ntk[0, 0], ntk1)
    torch.testing.assert_close(got_nngp[0, 0], nngp1)


def test_nngp_matches_output_covariance_of_random_networks():
    """The NNGP kernel is the covariance of the initial outputs: a Monte Carlo over 400 networks."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, generator=gen)
    with torch.no_grad():
        outputs = torch.stack([NTKReLUNetwork(2, 128, 2, generator=gen)(x) for _ in range(400)]).double()
    empirical = outputs.T @ outputs / outputs.shape[0]
    _, nngp = relu_ntk(x, depth=2, return_nngp=True)
    assert float((empirical - nngp).abs().max() / nngp.abs().max()) < 0.15


# --------------------------------------------------------------------------- prefixes, I(n), Theorem 1


def _kernel_and_targets(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=F64) * 2 - 1
    return x, relu_ntk(x, depth=3), torch.randn(n, 2, generator=gen, dtype=F64)


def test_weight_change_norms_match_direct_solves():
    _x, kernel, dz = _kernel_and_targets(60, 6)
    norms = weight_change_norms(kernel, dz)
    assert norms.shape == (60, 2)
    K, Z = kernel.numpy(), dz.numpy()
    for n in (1, 7, 30, 60):
        direct = np.sqrt(np.einsum("ik,ik->k", Z[:n], np.linalg.solve(K[:n, :n], Z[:n])))
        np.testing.assert_allclose(norms[n - 1].numpy(), direct, rtol=1e-8)
    np.testing.assert_allclose(weight_change_norms(kernel, dz[:, 0]).numpy(), norms[:, 0].numpy())
    assert bool((torch.diff(norms, dim=0) >= 0).all())  # the min-norm solution only grows with n


def test_linearized_predictions_match_direct_solves():
    x, kernel, dz = _kernel_and_targets(50, 7)
    test = torch.rand(9, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    k_test = relu_ntk(test, x, depth=3)
    sizes = [1, 10, 50]
    got = linearized_predictions(kernel, k_test, dz, sizes)
    assert got.shape == (3, 9, 2)
    for i, n in enumerate(sizes):
        want = k_test[:, :n].numpy() @ np.linalg.solve(kernel[:n, :n].numpy(), dz[:n].numpy())
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-7, atol=1e-9)
    # trained on all points, the student reproduces its targets there
    torch.testing.assert_close(linearized_predictions(kernel, kernel, dz[:, 0], [50])[0], dz[:, 0])


def test_data_inefficiency_of_a_power_law():
    n = torch.arange(1, 201, dtype=F64)
    got = data_inefficiency(n**0.5)
    want = 0.5 * n[:-1] * torch.log1p(1 / n[:-1])
    torch.testing.assert_close(got, want)
    assert abs(float(got[-1]) - 0.5) < 2e-3
    assert torch.equal(data_inefficiency(torch.ones(2, 5)), torch.zeros(2, 4, dtype=F64))


def _inefficiency(delta_z_of, runs: int = 16, N: int = 400, seed: int = 9) -> np.ndarray:
    """I(n) from the mean of ‖Δŵ_n‖ over runs (fresh inputs each) and over the columns of Δz."""
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(runs):
        x = torch.rand(N, 2, generator=gen, dtype=F64) * 2 - 1
        kernel, nngp = relu_ntk(x, depth=3, return_nngp=True)
        norms.append(weight_change_norms(kernel, delta_z_of(nngp, gen)).mean(1))
    return data_inefficiency(torch.stack(norms).mean(0)).numpy()


def test_data_inefficiency_of_random_labels_is_near_the_papers_constant():
    """Δz ~ N(0, 1): ‖Δŵ_n‖ keeps growing as a power of n; the paper reads I(n) ≈ 0.8 for random
    signs (Fig. 3). 2-d inputs, 3 hidden layers (the experiment's set-up)."""
    I = _inefficiency(lambda nngp, gen: torch.randn(nngp.shape[0], 8, generator=gen, dtype=F64))
    assert 0.7 < I[40:].mean() < 0.9, I[40:].mean()
    assert abs(I[40:200].mean() - I[200:].mean()) < 0.1  # about constant: Δŵ never converges


def test_data_inefficiency_of_the_zero_function_is_near_zero():
    """Δz = −z_0, z_0 ~ GP(0, NNGP): the initial function is easy to cancel, I(n) near 0."""

    def minus_init(nngp, gen):
        factor = torch.linalg.cholesky(nngp + 1e-9 * torch.eye(nngp.shape[0], dtype=F64))
        return -(factor @ torch.randn(nngp.shape[0], 2, generator=gen, dtype=F64))

    I = _inefficiency(minus_init)
    assert I[40:].mean() < 0.12, I[40:].mean()
    assert I[200:].mean() < 0.1, I[200:].mean()


def test_transfer_risk_and_angles_against_numpy():
    gen = torch.Generator().manual_seed(10)
    zt, zs = torch.randn(2, 100, generator=gen, dtype=F64).unbind()
    np.testing.assert_allclose(float(transfer_risk(zt, zs)), np.mean(zt.numpy() * zs.numpy() < 0))
    assert transfer_risk(zt, torch.stack([zt, -zt])).tolist() == [0.0, 1.0]
    diag = 1 + torch.rand(100, generator=gen, dtype=F64)
    angles = feature_angles(zt, diag, 3.0)
    np.testing.assert_allclose(angles.numpy(), np.arccos(np.abs(zt.numpy()) / (3.0 * np.sqrt(diag.numpy()))))
    betas = torch.linspace(0, math.pi / 2, 50, dtype=F64)
    p = accumulative_angle_distribution(angles, betas)
    np.testing.assert_allclose(p.numpy(), [(angles.numpy() > b).mean() for b in betas.numpy()])
    assert bool((torch.diff(p) <= 0).all()) and float(p[0]) == 1.0


def test_theorem1_bound_holds_for_a_pool_oracle():
    """R_n ≤ p(π/2 − ᾱ_n) when the oracle is the min-norm weight change of the whole pool."""
    gen = torch.Generator().manual_seed(11)
    pool = torch.rand(300, 2, generator=gen, dtype=F64) * 2 - 1
    kernel = relu_ntk(pool, depth=3)
    teacher = torch.sin(3 * pool[:, 0]) + pool[:, 1] ** 2 - 0.3
    z = effective_student_logits(teacher, teacher > 0, soft_ratio=0.7, temperature=2.0)
    n_train = 150
    norms = weight_change_norms(kernel, z)
    sizes = [5, 20, 80, 150]
    zs = linearized_predictions(kernel[:n_train, :n_train], kernel[n_train:, :n_train], z[:n_train], sizes)
    risk = transfer_risk(teacher[n_train:], zs)
    angles = feature_angles(z[n_train:], kernel.diagonal()[n_train:], norms[-1])
    alpha = torch.arccos((norms[[n - 1 for n in sizes]] / norms[-1]).clamp(max=1))
    bound = accumulative_angle_distribution(angles, math.pi / 2 - alpha)
    assert bool((risk <= bound).all()), (risk, bound)
    assert float(risk[-1]) < float(risk[0])


# --------------------------------------------------------------------------- Theorem 2


def test_hard_label_correction_is_the_derivative_in_the_hard_ratio():
    zt = torch.tensor([-4.0, -0.5, 0.2, 3.0, 8.0], dtype=F64)
    y = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0], dtype=F64)
    T, eps = 3.0, 1e-7
    fd = (effective_student_logits(zt, y, soft_ratio=1 - eps, temperature=T) - zt) / eps
    torch.testing.assert_close(hard_label_correction(zt, y, temperature=T), fd, rtol=1e-4, atol=1e-6)
    assert bool((hard_label_correction(zt, y > 0.5, temperature=T).sign() == torch.sign(y - torch.sigmoid(zt))).all())


def test_hard_label_projection_is_the_cosine_derivative():
    """Eq. 12: ∂cos α(Δŵ, Δŵ_g)/∂(1 − ρ) at ρ = 1 equals ⟨δŵ_h, Δŵ_c⟩ / (‖Δŵ_g‖ ‖Δŵ_t‖), checked
    by a finite difference of the cosine computed with numpy solves."""
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(40, 2, generator=gen, dtype=F64) * 2 - 1
    kernel = relu_ntk(x, depth=2)
    zg = torch.sin(3 * x[:, 0]) - x[:, 1]
    zt = 2 * zg + torch.randn(40, generator=gen, dtype=F64)  # an imperfect teacher
    y = (zg > 0).to(F64)
    T = 2.0
    proj = hard_label_projection(kernel, zg, zt, hard_label_correction(zt, y, temperature=T))
    K = kernel.numpy()

    def cosine(rho: float) -> float:
        zs = effective_student_logits(zt, y, soft_ratio=rho, temperature=T).numpy()
        return zg.numpy() @ np.linalg.solve(K, zs) / np.sqrt(zg.numpy() @ np.linalg.solve(K, zg.numpy())
                                                              * (zs @ np.linalg.solve(K, zs)))

    eps = 1e-6
    fd = (cosine(1 - eps) - cosine(1.0)) / eps
    norms = weight_change_norms(kernel, torch.stack([zg, zt], 1))[-1]
    np.testing.assert_allclose(float(proj / (norms[0] * norms[1])), fd, rtol=1e-3)
    # several teachers at once: the columns of [n, k] give the same as one at a time
    teachers = torch.stack([zt, 0.5 * zt + zg, -zt], 1)
    corrections = hard_label_correction(teachers, y[:, None].expand(-1, 3), temperature=T)
    batched = hard_label_projection(kernel, zg, teachers, corrections)
    assert batched.shape == (3,)
    for j in range(3):
        torch.testing.assert_close(batched[j], hard_label_projection(kernel, zg, teachers[:, j], corrections[:, j]))
    torch.testing.assert_close(batched[0], proj)


# --------------------------------------------------------------------------- bad inputs


def test_kernel_functions_reject_bad_inputs():
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    kernel = relu_ntk(x, depth=2)
    with pytest.raises(ValueError, match="depth"):
        relu_ntk(x, depth=0)
    with pytest.raises(ValueError, match="x2"):
        relu_ntk(x, torch.rand(3, 5), depth=2)
    with pytest.raises(ValueError, match="x1"):
        relu_ntk(torch.rand(4), depth=2)
    with pytest.raises(TypeError, match="x1"):
        relu_ntk(torch.ones(4, 2, dtype=torch.long), depth=2)
    with pytest.raises(ValueError, match="kernel.*square"):
        weight_change_norms(kernel[:, :3], torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="delta_z"):
        weight_change_norms(kernel, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        weight_change_norms(relu_ntk(torch.cat([x, x[:1]]), depth=2), torch.ones(5, dtype=F64))  # duplicate point
    with pytest.raises(ValueError, match="sizes"):
        linearized_predictions(kernel, kernel, torch.ones(4, dtype=F64), [0, 2])
    with pytest.raises(ValueError, match="sizes"):
        linearized_predictions(kernel, kernel, torch.ones(4, dtype=F64), [5])
    with pytest.raises(ValueError, match="kernel_test_train"):
        linearized_predictions(kernel, kernel[:, :3], torch.ones(4, dtype=F64), [2])
    with pytest.raises(ValueError, match="mean_norms"):
        data_inefficiency(torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="mean_norms"):
        data_inefficiency(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="weight_norm"):
        feature_angles(torch.ones(3), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="delta_z_h"):
        hard_label_projection(kernel, torch.ones(4, dtype=F64), torch.ones(4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="delta_z_g"):
        hard_label_projection(kernel, torch.ones(4, 1, dtype=F64), torch.ones(4, dtype=F64), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="delta_z_t"):
        hard_label_projection(kernel, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="temperature"):
        hard_label_correction(torch.ones(3), torch.ones(3), temperature=0.0)
    with pytest.raises(ValueError, match="width"):
        NTKReLUNetwork(2, 0, 2)
    with pytest.raises(TypeError, match="model"):
        empirical_ntk(lambda v: v, x)


# --------------------------------------------------------------------------- the op: reference, layouts, gradients


def test_effective_logits_match_kdfast_reference_on_non_contiguous_input():
    """The op on transposed float32 inputs equals kdfast.reference (brentq) to float32 precision."""
    g = torch.Generator().manual_seed(5)
    zt = (torch.randn(7, 6, generator=g) * 20).T  # [6, 7], transposed
    y = (torch.rand(7, 6, generator=g) > 0.5).float().T
    assert not zt.is_contiguous()
    got = torch.ops.kdfast.effective_student_logits(zt, y, 0.3, 2.0)
    want = kdfast_reference.effective_student_logits(zt.double(), y.double(), 0.3, 2.0)
    assert got.dtype == torch.float32 and got.shape == zt.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rho", [0.2, 0.8])
def test_effective_logits_gradient_with_upstream_weights(rho):
    """dz/dz_t and dz/dy times a non-unit upstream gradient, against central differences of the op."""
    g = torch.Generator().manual_seed(6)
    zt = torch.randn(9, dtype=F64, generator=g) * 4
    y = torch.rand(9, dtype=F64, generator=g)
    upstream = torch.randn(9, dtype=F64, generator=g) * 2.5
    zt_, y_ = zt.clone().requires_grad_(), y.clone().requires_grad_()
    got_t, got_y = torch.autograd.grad(torch.ops.kdfast.effective_student_logits(zt_, y_, rho, 1.5), (zt_, y_), upstream)
    h = 1e-6
    op = torch.ops.kdfast.effective_student_logits
    fd_t = (op(zt + h, y, rho, 1.5) - op(zt - h, y, rho, 1.5)) / (2 * h) * upstream
    fd_y = (op(zt, y + h, rho, 1.5) - op(zt, y - h, rho, 1.5)) / (2 * h) * upstream
    torch.testing.assert_close(got_t, fd_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_y, fd_y, rtol=1e-5, atol=1e-7)
