r"""Data eigenbases and the eigenprojection of weights (seed 001, section 4 and App. D.3).

The maths
=========

**Data eigendirections.** For data ``X`` (``n`` rows of ``d`` features) the (uncentered)
Gram matrix of the features has the eigendecomposition::

    X^T X = sum_i lambda_i v_i v_i^T,     lambda_1 >= lambda_2 >= ... >= lambda_d >= 0,

with orthonormal ``v_i`` in ``R^d``: the right singular vectors of ``X``, with
``lambda_i = sigma_i^2``. :func:`data_eigenbasis` returns the top ``r`` pairs.

**Components of a weight matrix.** A weight matrix ``W`` (``k x d``) acts on the data as
``x -> W x``. Its component along the data direction ``v_i`` is the vector ``W v_i`` in
``R^k``, scalarized as ``||W v_i||_2`` (App. D.3). For a single output (``k = 1``,
``W = w^T``) this is ``|<w, v_i>|``, the component of Theorem 4.1. Over a complete basis
the components keep all of ``W``: ``sum_i ||W v_i||^2 = ||W||_F^2``.
:func:`eigenprojection` computes them for a whole trajectory ``W_1 .. W_T`` at once
(``[T, r]``), with the fused kdfast op (one pass: batched product and norm reduction).

**Convolutions.** A conv kernel ``[k, c, h, w]`` acts on image patches of shape
``[c, h, w]``; flattened to ``[k, c*h*w]`` it is a weight matrix on the flattened patches.
:func:`patch_eigenbasis` samples random patches of the images (flattened in the same
``(c, h, w)`` order as ``weight.reshape(k, -1)``) and returns their eigenbasis.

**Why it matters (Theorem 4.1).** Linear regression ``min ||X w - y||^2 / 2`` by gradient
flow from ``w(0) = 0`` gives, with ``X = sum_i sigma_i u_i v_i^T``::

    <w(t), v_i> = (1 - exp(-lambda_i t)) <u_i, y> / sigma_i,

so the weights converge along each direction at the rate ``lambda_i``: fastest along the
top directions. A student trained the same way on the outputs of a teacher stopped at
time ``T`` has ``<w_s(t), v_i> = (1 - exp(-lambda_i t)) (1 - exp(-lambda_i T)) <u_i, y> /
sigma_i``. At instants where the two have converged equally along a top direction, the
student's component along any lower direction is strictly smaller: distillation
exaggerates the bias towards the top eigendirections.

Sign convention
===============
Eigenvectors are defined up to sign. Every basis returned here is flipped so that the
entry of largest absolute value of each eigenvector is positive (the first such entry on
ties), whichever solver computed it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from . import ops

__all__ = ["DENSE_MAX_DIM", "EigenBasis", "data_eigenbasis", "eigenprojection", "patch_eigenbasis"]

# Up to this many features, method="auto" forms the d x d Gram matrix and solves it exactly.
DENSE_MAX_DIM = 4096
METHODS = ("auto", "dense", "lanczos", "randomized")


class EigenBasis(NamedTuple):
    """Eigenpairs of ``X^T X``: ``values [r]`` (descending, >= 0) and ``vectors [d, r]``
    (orthonormal columns, ``vectors[:, i]`` belongs to ``values[i]``)."""

    values: Tensor
    vectors: Tensor


# --------------------------------------------------------------------------- inputs


def _as_matrix(X: Any, name: str) -> np.ndarray | sp.csr_matrix:
    """``X`` as a float64 numpy array or scipy CSR matrix (2-D, non-empty, finite)."""
    if sp.issparse(X):
        M = sp.csr_matrix(X, dtype=np.float64)
        values = M.data
    elif isinstance(X, Tensor):
        if X.is_complex() or X.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        if X.layout != torch.strided:
            coo = X.detach().cpu()
            coo = (coo if coo.layout == torch.sparse_coo else coo.to_sparse_coo()).coalesce()
            rows, cols = coo.indices().numpy()
            M = sp.csr_matrix((coo.values().double().numpy(), (rows, cols)), shape=tuple(X.shape))
            values = M.data
        else:
            M = X.detach().cpu().to(torch.float64).numpy()
            values = M
    elif isinstance(X, np.ndarray):
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        M = np.asarray(X, dtype=np.float64)
        values = M
    else:
        raise TypeError(f"{name} must be a torch.Tensor, numpy array or scipy sparse matrix, "
                        f"got {type(X).__name__}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(M.shape)}")
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(M.shape)}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return M


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude is positive."""
    rows = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[rows, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def _check_rank(rank: int | None, d: int) -> int:
    if rank is None:
        return d
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int or None, got {type(rank).__name__}")
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, d] = [1, {d}], got {rank}")
    return int(rank)


# --------------------------------------------------------------------------- solvers


def _dense_eigh(X: np.ndarray | sp.csr_matrix, rank: int) -> tuple[np.ndarray, np.ndarray]:
    gram = X.T @ X
    gram = gram.toarray() if sp.issparse(gram) else gram
    values, vectors = np.linalg.eigh(gram)  # ascending
    return values[::-1][:rank], vectors[:, ::-1][:, :rank]


def _lanczos(X: np.ndarray | sp.csr_matrix, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    d = X.shape[1]
    if rank >= d:
        raise ValueError(f"rank must be < d = {d} for method='lanczos' (got {rank}); use method='dense' for all "
                         "eigenpairs")
    gram = spla.LinearOperator((d, d), matvec=lambda v: X.T @ (X @ v), dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(d)  # a fixed start vector: deterministic results
    values, vectors = spla.eigsh(gram, k=rank, which="LA", v0=v0, tol=0)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def _randomized(X: np.ndarray | sp.csr_matrix, rank: int, seed: int, n_oversamples: int = 10,
                n_power_iter: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Randomized subspace iteration (Halko, Martinsson and Tropp 2011, alg. 4.4) on ``X``."""
    d = X.shape[1]
    width = min(d, rank + n_oversamples)
    Q = np.random.default_rng(seed).standard_normal((d, width))
    Q, _ = np.linalg.qr(Q)
    for _ in range(n_power_iter):  # re-orthonormalize every product: keeps the small directions
        Q, _ = np.linalg.qr(np.asarray(X @ Q))
        Q, _ = np.linalg.qr(np.asarray(X.T @ Q))
    B = np.asarray(X @ Q)  # [n, width]: X restricted to the found subspace
    _, s, vt = np.linalg.svd(B, full_matrices=False)
    return (s**2)[:rank], (Q @ vt.T)[:, :rank]


# --------------------------------------------------------------------------- public API


def data_eigenbasis(
    X: Any,
    rank: int | None = None,
    *,
    method: str = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> EigenBasis:
    """Top eigenpairs of the Gram matrix ``X^T X`` of data ``X`` (``n`` rows, ``d`` features).

    Args:
        X: ``[n, d]`` data: a dense torch tensor, a torch sparse tensor, a numpy array or a
            scipy sparse matrix. Not centered (the Gram matrix, as in seed 001).
        rank: how many eigenpairs (the top ``rank``); ``None`` for all ``d`` (dense only).
        method: ``"dense"``: ``numpy.linalg.eigh`` of the ``d x d`` Gram matrix (formed
            sparsely for sparse ``X``), exact; ``"lanczos"``: ``scipy.sparse.linalg.eigsh``
            on ``v -> X^T (X v)``, never forming the Gram matrix, needs ``rank < d``;
            ``"randomized"``: randomized subspace iteration, approximate, for a fast look at
            the top of a large spectrum; ``"auto"``: dense for ``d <= DENSE_MAX_DIM``
            (4096), otherwise Lanczos (and then ``rank`` is required).
        seed: seed of the Lanczos start vector and of the randomized sketch, so that every
            call gives the same result.
        dtype: floating dtype of the returned tensors (the solve is always in float64).

    Returns:
        :class:`EigenBasis` ``(values [r], vectors [d, r])`` on the CPU, values descending
        and clipped at 0, each eigenvector's largest-magnitude entry positive.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    M = _as_matrix(X, "X")
    d = M.shape[1]
    if method == "auto":
        method = "dense" if d <= DENSE_MAX_DIM else "lanczos"
        if method == "lanczos" and rank is None:
            raise ValueError(f"rank is required for X with d = {d} > {DENSE_MAX_DIM} features (method='auto' "
                             "then uses Lanczos); pass rank, or method='dense' to form the d x d Gram matrix")
    if rank is None and method != "dense":
        raise ValueError(f"rank is required for method={method!r}")
    rank = _check_rank(rank, d)
    if method == "dense":
        values, vectors = _dense_eigh(M, rank)
    elif method == "lanczos":
        values, vectors = _lanczos(M, rank, seed)
    else:
        values, vectors = _randomized(M, rank, seed)
    vectors = _fix_signs(np.ascontiguousarray(vectors))
    values = np.clip(values, 0.0, None)  # X^T X is PSD: negatives are rounding
    return EigenBasis(torch.from_numpy(np.ascontiguousarray(values)).to(dtype),
                      torch.from_numpy(vectors).to(dtype))


def patch_eigenbasis(
    images: Any,
    kernel_size: int | tuple[int, int],
    n_patches: int,
    *,
    rank: int | None = None,
    padding: int = 0,
    method: str = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> EigenBasis:
    """Eigenbasis of random image patches: the data a conv kernel of that size acts on.

    Draws ``n_patches`` patches of shape ``[c, kh, kw]`` (uniformly over images and
    positions of the zero-padded images), flattens each in the ``(c, h, w)`` order of
    ``conv.weight.reshape(k, -1)``, and returns :func:`data_eigenbasis` of the ``[n_patches,
    c*kh*kw]`` matrix. Pair it with :func:`eigenprojection` of the conv weights ``[k, c, kh, kw]``.

    Args:
        images: ``[N, C, H, W]`` or ``[N, H, W]`` (one channel), a torch tensor or numpy array.
        kernel_size: ``kh`` (square) or ``(kh, kw)``.
        n_patches: how many patches to sample (with replacement).
        rank, method, dtype: as in :func:`data_eigenbasis`.
        padding: zeros added on each side of every image first (the conv's padding).
        seed: seed of the patch positions (and of the solver).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"images must hold real numbers, got dtype {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W] with N > 0, got shape {tuple(images.shape)}")
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"kernel_size must be a positive int or a pair of them, got {kernel_size!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if isinstance(n_patches, bool) or not isinstance(n_patches, int) or n_patches < 1:
        raise ValueError(f"n_patches must be an int >= 1, got {n_patches!r}")
    images = images.detach().cpu().to(torch.float64)
    if padding:
        images = torch.nn.functional.pad(images, (padding,) * 4)
    N, C, H, W = images.shape
    kh, kw = ks
    if kh > H or kw > W:
        raise ValueError(f"kernel_size {ks} is larger than the (padded) images {H} x {W}")
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(0, N, (n_patches,), generator=gen)
    top = torch.randint(0, H - kh + 1, (n_patches,), generator=gen)
    left = torch.randint(0, W - kw + 1, (n_patches,), generator=gen)
    rows = top[:, None, None] + torch.arange(kh)[None, :, None]   # [P, kh, 1]
    cols = left[:, None, None] + torch.arange(kw)[None, None, :]  # [P, 1, kw]
    patches = images[n[:, None, None, None], torch.arange(C)[None, :, None, None],
                     rows[:, None], cols[:, None]]                # [P, C, kh, kw]
    return data_eigenbasis(patches.reshape(n_patches, -1), rank, method=method, seed=seed, dtype=dtype)


def eigenprojection(weights: Tensor, basis: Tensor | EigenBasis) -> Tensor:
    """Components ``||W v_i||_2`` of weight matrices along the directions ``v_i`` of a basis.

    Args:
        weights: one weight matrix or a trajectory of them (``T`` checkpoints), floating:
            ``[k, d]`` or ``[T, k, d]`` dense; ``[k, c, h, w]`` or ``[T, k, c, h, w]`` conv
            kernels, flattened to ``d = c*h*w`` (match a :func:`patch_eigenbasis`).
        basis: ``[d, r]`` directions as columns (e.g. ``data_eigenbasis(X).vectors``), or an
            :class:`EigenBasis`; same device as ``weights``, cast to its dtype.

    Returns:
        ``[T, r]`` (``[r]`` for a single matrix) in the dtype of ``weights``:
        ``out[t, i] = ||weights[t] @ basis[:, i]||``, accumulated in float64 for float64
        weights, float32 otherwise. Differentiable with respect to ``weights``.
    """
    if isinstance(basis, EigenBasis):
        basis = basis.vectors
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not isinstance(basis, Tensor):
        raise TypeError(f"basis must be a torch.Tensor or EigenBasis, got {type(basis).__name__}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating tensor, got dtype {weights.dtype}")
    if not basis.dtype.is_floating_point:
        raise TypeError(f"basis must be a floating tensor, got dtype {basis.dtype}")
    if basis.dim() != 2:
        raise ValueError(f"basis must be 2-D [d, r], got shape {tuple(basis.shape)}")
    if weights.device != basis.device:
        raise ValueError(f"weights (on {weights.device}) and basis (on {basis.device}) must be on the same device")
    single = weights.dim() in (2, 4)
    if weights.dim() == 2:
        trajectory = weights.unsqueeze(0)
    elif weights.dim() == 3:
        trajectory = weights
    elif weights.dim() == 4:
        trajectory = weights.flatten(1).unsqueeze(0)
    elif weights.dim() == 5:
        trajectory = weights.flatten(2)
    else:
        raise ValueError("weights must be [k, d], [T, k, d], [k, c, h, w] or [T, k, c, h, w], got shape "
                         f"{tuple(weights.shape)}")
    d = trajectory.shape[-1]
    if basis.shape[0] != d:
        raise ValueError(f"basis has {basis.shape[0]} rows but the weights act on d = {d} features "
                         f"(weights shape {tuple(weights.shape)}, basis shape {tuple(basis.shape)})")
    out = ops.eigenprojection(trajectory, basis.to(trajectory.dtype))
    return out[0] if single else out
