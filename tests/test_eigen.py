"""kdfast.eigen: data and patch eigenbases against numpy/scipy, the eigenprojection op against an
independent numpy reference, its gradient, and the closed-form gradient flow of seed 001 part 1
against many small Euler steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import torch

import kdfast
from kdfast.eigen import EigenBasis, data_eigenbasis, eigenprojection, patch_eigenbasis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

try:  # multi-threaded OpenBLAS spins against other processes on a busy machine; these solves are small
    from threadpoolctl import threadpool_limits
except ImportError:  # threadpoolctl comes with scikit-learn (an `experiments` extra)
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _one_blas_thread():
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(1):
            yield


def decaying_data(n: int, d: int, seed: int, decay: float = 0.85) -> np.ndarray:
    """Gaussian data with a geometrically decaying spectrum (well-separated eigenvalues)."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return rng.standard_normal((n, d)) * decay ** np.arange(d) @ rotation.T


def numpy_basis(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: numpy.linalg.eigh of X^T X, descending, with the documented sign convention
    (largest-magnitude entry of each eigenvector positive)."""
    values, vectors = np.linalg.eigh(X.T @ X)
    values, vectors = values[::-1], vectors[:, ::-1]
    pivot = vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])]
    return values, vectors * np.sign(pivot)


# --------------------------------------------------------------------------- data_eigenbasis


@pytest.mark.parametrize("convert", ["numpy", "torch64", "torch32", "scipy_csr", "torch_sparse"])
def test_dense_matches_numpy_eigh(convert):
    X = decaying_data(120, 30, seed=1)
    ref_values, ref_vectors = numpy_basis(X)
    given = {"numpy": X, "torch64": torch.from_numpy(X), "torch32": torch.from_numpy(X).float(),
             "scipy_csr": sp.csr_matrix(X), "torch_sparse": torch.from_numpy(X).to_sparse()}[convert]
    basis = data_eigenbasis(given)
    assert isinstance(basis, EigenBasis)
    assert basis.values.dtype == torch.float64 and basis.vectors.shape == (30, 30)
    tol = 1e-4 if convert == "torch32" else 1e-9  # float32 input rounds X itself
    np.testing.assert_allclose(basis.values.numpy(), ref_values, rtol=tol, atol=tol * ref_values[0])
    np.testing.assert_allclose(basis.vectors.numpy(), ref_vectors, atol=tol * 100)


def test_basis_is_an_orthonormal_eigenbasis_with_the_sign_convention():
    X = decaying_data(80, 25, seed=2)
    values, V = (t.numpy() for t in data_eigenbasis(X, 10))
    assert V.shape == (25, 10)
    assert np.all(np.diff(values) < 0)
    np.testing.assert_allclose(V.T @ V, np.eye(10), atol=1e-12)
    np.testing.assert_allclose(X.T @ (X @ V), V * values, atol=1e-9 * values[0])
    pivots = V[np.abs(V).argmax(0), np.arange(10)]
    assert np.all(pivots > 0)


def test_rank_deficient_data_has_zero_eigenvalues():
    X = decaying_data(5, 12, seed=3)  # n < d: 7 zero eigenvalues
    values = data_eigenbasis(X).values.numpy()
    assert np.all(values >= 0)
    assert np.all(values[5:] < 1e-10 * values[0]) and values[4] > 1e-6 * values[0]


def test_lanczos_on_sparse_data_matches_dense():
    rng = np.random.default_rng(4)
    X = sp.random(400, 150, density=0.05, random_state=5, format="csr")
    X = X @ sp.diags(0.9 ** np.arange(150) + 0.05 * rng.random(150))  # decaying column scales: a clear top
    dense = data_eigenbasis(X, 8, method="dense")
    lanczos = data_eigenbasis(X, 8, method="lanczos")
    np.testing.assert_allclose(lanczos.values.numpy(), dense.values.numpy(), rtol=1e-9)
    np.testing.assert_allclose(lanczos.vectors.numpy(), dense.vectors.numpy(), atol=1e-7)
    again = data_eigenbasis(X, 8, method="lanczos")
    assert torch.equal(again.vectors, lanczos.vectors)  # deterministic


def test_auto_uses_lanczos_above_the_dense_limit(monkeypatch):
    X = decaying_data(60, 40, seed=6)
    monkeypatch.setattr(kdfast.eigen, "DENSE_MAX_DIM", 30)
    auto = data_eigenbasis(X, 5)
    np.testing.assert_allclose(auto.values.numpy(), numpy_basis(X)[0][:5], rtol=1e-9)
    with pytest.raises(ValueError, match="rank is required"):
        data_eigenbasis(X)


def test_randomized_approximates_the_top_of_a_decaying_spectrum():
    X = decaying_data(300, 60, seed=7, decay=0.7)
    ref_values, ref_vectors = numpy_basis(X)
    approx = data_eigenbasis(X, 5, method="randomized")
    np.testing.assert_allclose(approx.values.numpy(), ref_values[:5], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(approx.vectors.numpy() * ref_vectors[:, :5], 0)), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"X": np.ones(5)}, ValueError, "X must be 2-D"),
        ({"X": np.ones((0, 3))}, ValueError, "X must be non-empty"),
        ({"X": np.array([[1.0, np.nan]])}, ValueError, "X has NaN"),
        ({"X": [[1.0, 2.0]]}, TypeError, "X must be a torch.Tensor"),
        ({"X": np.ones((4, 3)), "rank": 4}, ValueError, "rank must be in"),
        ({"X": np.ones((4, 3)), "rank": 1.5}, TypeError, "rank must be an int"),
        ({"X": np.ones((4, 3)), "method": "qr"}, ValueError, "method must be one of"),
        ({"X": np.ones((4, 3)), "method": "lanczos"}, ValueError, "rank is required"),
        ({"X": np.ones((4, 3)), "rank": 3, "method": "lanczos"}, ValueError, "rank must be < d"),
        ({"X": np.ones((4, 3)), "dtype": torch.int64}, TypeError, "dtype must be a floating"),
    ],
)
def test_data_eigenbasis_rejects_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        data_eigenbasis(**kwargs)


# --------------------------------------------------------------------------- patch_eigenbasis


def test_patch_vectors_are_flattened_like_conv_weights():
    """With the kernel as large as the image every patch is the whole image: one image gives a
    rank-1 Gram whose eigenvector, used as a conv kernel, reproduces the image's norm."""
    rng = np.random.default_rng(8)
    image = torch.from_numpy(rng.random((1, 2, 3, 4)))  # C = 2, non-square kernel catches h/w swaps
    basis = patch_eigenbasis(image, (3, 4), n_patches=50)
    v = basis.vectors[:, 0]
    np.testing.assert_allclose(float(basis.values[0]), 50 * float(image.pow(2).sum()), rtol=1e-12)
    assert float(basis.values[1]) < 1e-9 * float(basis.values[0])
    conv = torch.nn.functional.conv2d(image, v.reshape(1, 2, 3, 4))
    np.testing.assert_allclose(float(conv.squeeze()), float(image.norm()), rtol=1e-12)


def test_patch_basis_matches_the_basis_of_all_patches():
    """Many random patches estimate the Gram matrix of all patches (by torch unfold): the same top
    eigendirections, and eigenvalues in proportion to the number of patches."""
    gen = torch.Generator().manual_seed(9)
    # smoothed more along h than w, so the top eigenvalues are distinct (0.036 and 0.033 of the first)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(40, 1, 16, 16, generator=gen), (5, 2), stride=1)[..., :12, :12]
    images = torch.cat([smooth, 0.5 * smooth.flip(-1)], dim=1)  # 2 channels, correlated
    all_patches = torch.nn.functional.unfold(images.double(), 3, padding=1).transpose(1, 2).reshape(-1, 18)
    ref = data_eigenbasis(all_patches, 3)
    n = 30000
    est = patch_eigenbasis(images, 3, n, rank=3, padding=1, seed=1)
    np.testing.assert_allclose(est.values.numpy() / n, ref.values.numpy() / all_patches.shape[0], rtol=0.05)
    cos = np.abs(np.sum(est.vectors.numpy() * ref.vectors.numpy(), 0))
    assert np.all(cos > 0.99), cos


def test_patch_eigenbasis_accepts_3d_numpy_and_rejects_bad_arguments():
    images = np.random.default_rng(10).random((5, 6, 6))
    basis = patch_eigenbasis(images, 3, 200)
    assert basis.vectors.shape == (9, 9)
    with pytest.raises(ValueError, match="kernel_size"):
        patch_eigenbasis(images, 0, 10)
    with pytest.raises(ValueError, match="larger than"):
        patch_eigenbasis(images, 7, 10)
    with pytest.raises(ValueError, match="n_patches"):
        patch_eigenbasis(images, 3, 0)
    with pytest.raises(ValueError, match="padding"):
        patch_eigenbasis(images, 3, 10, padding=-1)
    with pytest.raises(ValueError, match="images must be"):
        patch_eigenbasis(images[0, 0], 3, 10)
    with pytest.raises(TypeError, match="images must be"):
        patch_eigenbasis([[1.0]], 1, 10)


# --------------------------------------------------------------------------- eigenprojection


def numpy_projection(weights: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Independent reference: float64 numpy, ||W_t v_i|| over the k rows."""
    return np.linalg.norm(np.einsum("tkd,dr->tkr", weights.astype(np.float64), basis.astype(np.float64)), axis=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 100])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_eigenprojection_matches_reference(dtype, T, kind):
    gen = torch.Generator().manual_seed(11)
    shape = (T, 6, 20) if kind == "dense" else (T, 6, 2, 3, 3)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    d = 20 if kind == "dense" else 18
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0][:, :7].to(dtype)
    out = eigenprojection(weights, basis)
    assert out.shape == (T, 7) and out.dtype == dtype
    expected = numpy_projection(weights.reshape(T, 6, d).numpy(), basis.numpy())
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(out.numpy(), expected, rtol=tol, atol=tol)
    # the lead's einsum reference agrees too
    ref = kdfast.reference.eigenprojection(weights.reshape(T, 6, d).double(), basis.double())
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), rtol=tol, atol=tol)


def test_single_matrix_and_eigenbasis_argument():
    X = decaying_data(50, 12, seed=12)
    basis = data_eigenbasis(X)
    W = torch.randn(4, 12, dtype=torch.float64)
    out = eigenprojection(W, basis)  # an EigenBasis, a [k, d] matrix -> [r]
    assert out.shape == (12,)
    np.testing.assert_allclose(out.numpy(), np.linalg.norm(W.numpy() @ basis.vectors.numpy(), axis=0), rtol=1e-12)
    # over a complete orthonormal basis the components keep all of W (Parseval)
    np.testing.assert_allclose(float(out.pow(2).sum()), float(W.pow(2).sum()), rtol=1e-12)
    conv = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    conv_basis = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    np.testing.assert_allclose(eigenprojection(conv, conv_basis).numpy(),
                               eigenprojection(conv.reshape(5, 12), conv_basis).numpy(), rtol=1e-14)


def test_eigenprojection_casts_the_basis_to_the_weights_dtype():
    W = torch.randn(3, 4, 10)
    basis64 = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    out = eigenprojection(W, basis64)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), numpy_projection(W.numpy(), basis64.numpy()), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eigenprojection_half_precision(dtype):
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(5, 4, 16, generator=gen).to(dtype)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    out = eigenprojection(W, basis)
    assert out.dtype == dtype
    # reference on the same rounded inputs; the output itself is rounded to 8 (bf16) / 11 (fp16) bits
    expected = numpy_projection(W.float().numpy(), basis.to(dtype).float().numpy())
    np.testing.assert_allclose(out.float().numpy(), expected, rtol=1e-2, atol=1e-2)


def test_eigenprojection_gradcheck():
    gen = torch.Generator().manual_seed(14)
    W = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0][:, :4]
    assert torch.autograd.gradcheck(lambda w: eigenprojection(w, basis), (W,))
    conv = torch.randn(2, 3, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: eigenprojection(w, basis[:4, :3]), (conv,))
    # d/dW sum_i ||W v_i|| = sum_i (W v_i) v_i^T / ||W v_i||: a closed form to compare with
    W1 = W.detach()[0].clone().requires_grad_(True)
    eigenprojection(W1, basis).sum().backward()
    Wv = W1.detach() @ basis
    np.testing.assert_allclose(W1.grad.numpy(), ((Wv / Wv.norm(dim=0)) @ basis.T).numpy(), rtol=1e-12, atol=1e-14)


def test_opcheck():
    gen = torch.Generator().manual_seed(15)
    for dtype in (torch.float64, torch.float32):
        W = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
        basis = torch.randn(5, 2, generator=gen, dtype=torch.float64).to(dtype)
        torch.library.opcheck(torch.ops.kdfast.eigenprojection.default, (W, basis))


@pytest.mark.parametrize(
    ("weights", "basis", "error", "match"),
    [
        (np.ones((2, 3)), torch.eye(3), TypeError, "weights must be a torch.Tensor"),
        (torch.ones(2, 3), np.eye(3), TypeError, "basis must be a torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.int64), torch.eye(3), TypeError, "weights must be a floating"),
        (torch.ones(2, 3), torch.eye(3, dtype=torch.int32), TypeError, "basis must be a floating"),
        (torch.ones(3), torch.eye(3), ValueError, "weights must be"),
        (torch.ones(1, 1, 1, 1, 1, 3), torch.eye(3), ValueError, "weights must be"),
        (torch.ones(2, 3), torch.ones(3), ValueError, "basis must be 2-D"),
        (torch.ones(2, 4), torch.eye(3), ValueError, "basis has 3 rows but the weights act on d = 4"),
        (torch.ones(2, 2, 2, 2), torch.eye(3), ValueError, "basis has 3 rows but the weights act on d = 8"),
        (torch.ones(2, 3, device="meta"), torch.eye(3), ValueError, "same device"),
    ],
)
def test_eigenprojection_rejects_bad_inputs(weights, basis, error, match):
    with pytest.raises(error, match=match):
        eigenprojection(weights, basis)


# --------------------------------------------------------------------------- seed 001 part 1 closed forms


def euler(X: np.ndarray, y: np.ndarray, t: float, h: float) -> np.ndarray:
    """Gradient flow on ||X w - y||^2 / 2 from w = 0 by explicit Euler steps of size h."""
    w = np.zeros(X.shape[1])
    for _ in range(round(t / h)):
        w = w - h * (X.T @ (X @ w - y))
    return w


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])  # over- and under-parameterized
def test_closed_form_gradient_flow_matches_euler_steps(shape):
    from disobey import gradient_flow_weights, student_flow_weights

    rng = np.random.default_rng(16)
    X = rng.standard_normal(shape) / np.sqrt(shape[0]) * np.linspace(1.5, 0.5, shape[1])
    y = rng.standard_normal(shape[0])
    T, t = 1.3, 0.8
    teacher = gradient_flow_weights(X, y[None], np.array([T]))[0]
    student = student_flow_weights(X, y, np.array([T]), np.array([t]))[0]
    errors = []
    for h in (2e-3, 1e-3):
        w_T = euler(X, y, T, h)
        w_s = euler(X, X @ w_T, t, h)
        errors.append(max(np.abs(w_T - teacher).max(), np.abs(w_s - student).max()))
    assert errors[1] < 2e-3 * np.abs(teacher).max()
    assert 1.6 < errors[0] / errors[1] < 2.4  # Euler's first-order error: halving h halves it
    # and the matrix-exponential form w(t) = X^T K^-1 (I - exp(-t K)) y of the paper, K = X X^T
    if shape[0] < shape[1]:
        K = X @ X.T
        w_expm = X.T @ np.linalg.solve(K, (np.eye(shape[0]) - scipy.linalg.expm(-T * K)) @ y)
        np.testing.assert_allclose(teacher, w_expm, atol=1e-12)


def test_closed_form_components_are_the_theorem_factors():
    """Along v_i the teacher has (1 - e^{-l_i t}) c_i and the student (1 - e^{-l_i t})(1 - e^{-l_i T}) c_i."""
    from disobey import components, gradient_flow_weights, student_flow_weights

    rng = np.random.default_rng(17)
    X = rng.standard_normal((8, 12)) * np.linspace(2, 0.3, 12)
    y = rng.standard_normal(8)
    basis = data_eigenbasis(X)
    lam = basis.values.numpy()[:8]
    c = np.abs(basis.vectors.numpy().T @ np.linalg.lstsq(X, y, rcond=None)[0])[:8]
    T, t = np.array([0.7]), np.array([0.4])
    teacher = components(gradient_flow_weights(X, y[None], t), basis)[0, :8]
    student = components(student_flow_weights(X, y, T, t), basis)[0, :8]
    np.testing.assert_allclose(teacher, -np.expm1(-lam * t) * c, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(student, -np.expm1(-lam * t) * -np.expm1(-lam * T) * c, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- the op: layouts, upstream gradients


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigenprojection_non_contiguous_inputs(dtype):
    """Transposed / strided weights and basis give the reference's result."""
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(5, 11, 13, 2, dtype=dtype, generator=g)[..., 0].transpose(1, 2)  # [5, 13, 11], strided
    basis = torch.randn(6, 11, dtype=dtype, generator=g).T  # [11, 6], transposed
    assert not weights.is_contiguous() and not basis.is_contiguous()
    got = kdfast.ops.eigenprojection(weights, basis)
    want = kdfast.reference.eigenprojection(weights.double(), basis.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_eigenprojection_gradient_with_upstream_weights():
    """A non-unit upstream gradient reaches weights and basis as the reference's autograd does."""
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(3, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    basis = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(3, 4, dtype=torch.float64, generator=g) * 3.0
    got = torch.autograd.grad(kdfast.ops.eigenprojection(weights, basis), (weights, basis), upstream)
    want = torch.autograd.grad(kdfast.reference.eigenprojection(weights, basis), (weights, basis), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eigenprojection_large_and_zero_weights():
    """Huge entries do not overflow in float32 where the norm itself fits; a zero matrix gives 0, gradient 0."""
    weights = torch.full((1, 4, 3), 1e18)
    basis = torch.eye(3)
    torch.testing.assert_close(kdfast.ops.eigenprojection(weights, basis), torch.full((1, 3), 2e18))
    zero = torch.zeros(2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = kdfast.ops.eigenprojection(zero, torch.eye(3, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(2, 3, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), zero)
    assert torch.equal(grad, torch.zeros_like(zero))
