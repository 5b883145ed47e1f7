"""Shared maths of ``double_descent.py`` (seed 000) and ``statistical_perspective.py`` (seed 003).

- random ReLU features ``phi(x) = max(<x, v_k>, 0)`` with ``v_k ~ N(0, I / sigma^2)`` (seed 000 §1.1);
- ridge regression (sum of squared errors + ``lam * ||a||^2``) solved in closed form in the
  primal (``m x m`` system) or the dual (``n x n`` kernel system), whichever is smaller;
- L2-regularized logistic regression by Newton's method, likewise in the primal or the dual
  (the teacher of seed 000 Fig. 2);
- batched logistic regression trained with kdfast's loss (hard or soft labels, many
  independent problems at once), the students of both papers;
- the temperature transform ``phi_alpha`` (seed 000 Fig. 2) and the accuracy-preserving
  distortion ``Psi_alpha`` (seed 003 App. B.2);
- ROC AUC, mean entropy, and a reader of the IDX files MNIST and Fashion-MNIST ship as.
"""

from __future__ import annotations

import gzip
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy.special import expit, logit

__all__ = [
    "calibration_distortion",
    "expected_calibration_error",
    "fit_logistic_kdfast",
    "logistic_dual",
    "logistic_newton",
    "logistic_primal",
    "mean_entropy",
    "read_idx",
    "relu_directions",
    "relu_features",
    "ridge_dual",
    "ridge_primal",
    "ridge_solve",
    "ridge_sweep",
    "roc_auc",
    "temperature_transform",
]


# --------------------------------------------------------------------------- random ReLU features


def relu_directions(dim: int, m: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``m`` random directions ``v_k ~ N(0, I / sigma^2)`` in ``R^dim``, as the columns of a
    ``[dim, m]`` array (float64). The first ``m'`` columns of a draw are a draw for ``m' < m``,
    so one draw serves a whole sweep over ``m``."""
    if dim < 1 or m < 1:
        raise ValueError(f"dim and m must be >= 1, got dim={dim}, m={m}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return rng.standard_normal((dim, m)) / sigma


def relu_features(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``max(x @ directions, 0)``: the ``[n, m]`` random ReLU features of the rows of ``x``."""
    x = np.asarray(x)
    if x.ndim != 2 or directions.ndim != 2 or x.shape[1] != directions.shape[0]:
        raise ValueError(f"x must be [n, dim] and directions [dim, m], got {x.shape} and {directions.shape}")
    return np.maximum(x @ directions, 0.0)


# --------------------------------------------------------------------------- ridge regression


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``a x = b`` for a symmetric positive definite ``a`` (Cholesky; the ridge term keeps
    it definite, but near the interpolation threshold it is badly conditioned, which is the
    point of the experiment, so scipy's conditioning warning is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        try:
            return scipy.linalg.solve(a, b, assume_a="pos")
        except np.linalg.LinAlgError:  # lost definiteness to rounding: fall back to least squares
            return np.linalg.lstsq(a, b, rcond=None)[0]


def _check_ridge(features: np.ndarray, targets: np.ndarray, lam: float) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be [n, m], got shape {features.shape}")
    if targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must have {features.shape[0]} rows like features, got shape {targets.shape}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")


def ridge_primal(features: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
    """Coefficients ``a = (F^T F + lam I)^-1 F^T y`` minimizing ``||F a - y||^2 + lam ||a||^2``
    (an ``m x m`` system; ``targets`` is ``[n]`` or ``[n, k]``)."""
    _check_ridge(features, targets, lam)
    gram = features.T @ features
    gram[np.diag_indices_from(gram)] += lam
    return _solve_spd(gram, features.T @ targets)


def ridge_dual(kernel: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
    """Dual coefficients ``c = (K + lam I)^-1 y`` of the same problem, with ``K = F F^T``
    (an ``n x n`` system); the coefficients are ``a = F^T c`` and predictions ``K(x, X) c``."""
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be a square [n, n] array, got shape {kernel.shape}")
    _check_ridge(kernel, targets, lam)
    k = kernel.copy()
    k[np.diag_indices_from(k)] += lam
    return _solve_spd(k, targets)


def ridge_solve(features: np.ndarray, targets: np.ndarray, lam: float, form: str = "auto") -> np.ndarray:
    """Ridge coefficients ``a`` (``[m]`` or ``[m, k]``) in ``form`` ``"primal"``, ``"dual"``, or
    ``"auto"``: the primal when ``m <= n``, the dual otherwise (the smaller system)."""
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")
    n, m = features.shape
    if form == "primal" or (form == "auto" and m <= n):
        return ridge_primal(features, targets, lam)
    return features.T @ ridge_dual(features @ features.T, targets, lam)


def ridge_sweep(
    train_features: np.ndarray,
    targets: np.ndarray,
    eval_features: list[np.ndarray],
    lam: float,
    ms: list[int],
    progress=None,
) -> list[list[np.ndarray]]:
    """Ridge fits on the first ``m`` feature columns for every ``m`` of an increasing list.

    Each fit is solved in the smaller form (primal ``m x m`` when ``m <= n``, dual ``n x n``
    otherwise); the Gram matrix of the primal fits is formed once for the largest primal ``m``
    and the kernels of the dual fits are grown block by block, so a sweep costs about one
    fit at the largest ``m``. Returns ``preds[i][j]``: the predictions of the ``ms[i]`` fit on
    ``eval_features[j]`` (each ``[n_j, m_max]``), ``[n_j]`` or ``[n_j, k]`` like ``targets``.
    ``progress`` wraps the loop over ``ms`` (e.g. a tqdm factory), if given.
    """
    ms = [int(m) for m in ms]
    if any(b <= a for a, b in itertools.pairwise(ms)) or ms[0] < 1 or ms[-1] > train_features.shape[1]:
        raise ValueError(f"ms must increase within [1, {train_features.shape[1]}], got {ms}")
    n = train_features.shape[0]
    # column-major, so that the blocks of columns the kernels grow by are contiguous
    train_features = np.asfortranarray(train_features)
    eval_features = [np.asfortranarray(e) for e in eval_features]
    primal_ms = [m for m in ms if m <= n]
    gram = train_features[:, : primal_ms[-1]].T @ train_features[:, : primal_ms[-1]] if primal_ms else None
    rhs = train_features[:, : primal_ms[-1]].T @ targets if primal_ms else None
    kernel = np.zeros((n, n))
    eval_kernels = [np.zeros((e.shape[0], n)) for e in eval_features]
    done = 0  # feature columns already in the kernels
    preds = []
    for m in progress(ms) if progress else ms:
        if m <= n:
            g = gram[:m, :m].copy()
            g[np.diag_indices_from(g)] += lam
            coef = _solve_spd(g, rhs[:m])
            preds.append([e[:, :m] @ coef for e in eval_features])
            continue
        block = train_features[:, done:m]
        kernel += block @ block.T
        for ek, e in zip(eval_kernels, eval_features):
            ek += e[:, done:m] @ block.T
        done = m
        dual = ridge_dual(kernel, targets, lam)
        preds.append([ek @ dual for ek in eval_kernels])
    return preds


# --------------------------------------------------------------------------- logistic regression (Newton)


def _logistic_objective(f: np.ndarray, q: np.ndarray, penalty: float) -> float:
    # sum of cross-entropies softplus(f) - q f, plus the L2 penalty
    return float(np.sum(np.logaddexp(0.0, f) - q * f) + penalty)


def _check_logistic(rows: int, q: np.ndarray, lam: float) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (rows,):
        raise ValueError(f"q must be a [n] = [{rows}] array of probabilities, got shape {q.shape}")
    if np.any(q < 0) or np.any(q > 1):
        raise ValueError("q must hold probabilities in [0, 1]")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    return q


def logistic_primal(features: np.ndarray, q: np.ndarray, lam: float, max_iter: int = 200,
                    tol: float = 1e-9) -> np.ndarray:
    """Coefficients ``a`` minimizing ``sum_i CE(q_i, sigmoid(F_i a)) + lam ||a||^2`` by damped
    Newton steps on the ``m x m`` Hessian ``F^T W F + 2 lam I``; ``q`` are labels in [0, 1]
    (hard 0/1 or soft)."""
    q = _check_logistic(features.shape[0], q, lam)
    a = np.zeros(features.shape[1])
    f = np.zeros(features.shape[0])
    objective = _logistic_objective(f, q, 0.0)
    for _ in range(max_iter):
        p = expit(f)
        grad = features.T @ (p - q) + 2 * lam * a
        if np.max(np.abs(grad)) < tol:
            break
        hess = (features.T * (p * (1 - p))) @ features
        hess[np.diag_indices_from(hess)] += 2 * lam
        step = -_solve_spd(hess, grad)
        f_step = features @ step
        t = 1.0
        while True:  # backtracking (Armijo) line search
            candidate = _logistic_objective(f + t * f_step, q, lam * np.sum((a + t * step) ** 2))
            if candidate <= objective + 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t /= 2
        a, f, objective = a + t * step, f + t * f_step, candidate
    return a


def logistic_dual(kernel: np.ndarray, q: np.ndarray, lam: float, max_iter: int = 200,
                  tol: float = 1e-9) -> np.ndarray:
    """Dual coefficients ``c`` (``a = F^T c``, predictions ``K(x, X) c``) of the same problem,
    by Newton steps on ``n`` unknowns: with ``f = K c`` the gradient is ``K g``, ``g = p - q + 2 lam c``,
    and the Newton step solves ``(W K + 2 lam I) d = -g`` (the Hessian is ``K (W K + 2 lam I)``)."""
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be a square [n, n] array, got shape {kernel.shape}")
    n = kernel.shape[0]
    q = _check_logistic(n, q, lam)
    c = np.zeros(n)
    f = np.zeros(n)
    objective = _logistic_objective(f, q, 0.0)
    for _ in range(max_iter):
        p = expit(f)
        g = p - q + 2 * lam * c
        if np.max(np.abs(g)) < tol:
            break
        system = (p * (1 - p))[:, None] * kernel
        system[np.diag_indices_from(system)] += 2 * lam
        step = -np.linalg.solve(system, g)
        f_step = kernel @ step
        slope = float(g @ f_step)  # directional derivative: (K g) . step
        t = 1.0
        while True:
            c_new = c + t * step
            f_new = f + t * f_step
            candidate = _logistic_objective(f_new, q, lam * float(c_new @ f_new))
            if candidate <= objective + 1e-4 * t * slope or t < 1e-10:
                break
            t /= 2
        c, f, objective = c_new, f_new, candidate
    return c


def logistic_newton(features: np.ndarray, q: np.ndarray, lam: float, form: str = "auto") -> np.ndarray:
    """Logistic-regression coefficients ``a`` (no intercept) in the primal when ``m <= n``, in the
    dual otherwise (``form="auto"``), or as ``form`` says."""
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")
    n, m = features.shape
    if form == "primal" or (form == "auto" and m <= n):
        return logistic_primal(features, q, lam)
    return features.T @ logistic_dual(features @ features.T, q, lam)


# --------------------------------------------------------------------------- students trained with kdfast


def fit_logistic_kdfast(
    x,
    *,
    soft=None,
    hard=None,
    l2: float,
    intercept: bool = True,
    max_iter: int = 500,
    tol: float = 1e-7,
    init=None,
    dtype=None,
):
    """Fit ``T`` independent logistic regressions at once with kdfast's loss.

    Each problem ``t`` minimizes ``mean_i CE(target_ti, sigmoid(x_ti . w_t + b_t)) + l2/2 ||w_t||^2``
    (the bias is not penalized). The logits ``[0, z]`` of every row of every problem go through one
    :func:`kdfast.distillation_loss` call: ``soft`` targets (probabilities ``[T, n]``) as teacher
    logits ``[0, logit(q)]`` with ``soft_weight=1`` (a KL, whose gradient is the cross-entropy's),
    ``hard`` targets (``[T, n]`` in {0, 1}) with ``hard_weight=1``. The problems share nothing,
    so minimizing their sum with L-BFGS solves each.

    Args:
        x: ``[T, n, d]`` (or ``[n, d]`` for one problem) float tensor or array.
        soft / hard: exactly one of them.
        l2: the penalty ``l2 / 2 * ||w||^2`` per problem, > 0.
        init: optional starting weights ``[T, d]`` (``[d]``) (warm start).
        dtype: the torch dtype to compute in (default float64).
    Returns:
        ``(w [T, d], b [T])`` tensors of ``dtype`` (``[d]`` and a scalar for 2-d ``x``).
    """
    import torch

    import kdfast

    if (soft is None) == (hard is None):
        raise ValueError("pass exactly one of soft (probabilities) and hard (0/1 labels)")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    dtype = torch.float64 if dtype is None else dtype
    x = torch.as_tensor(x, dtype=dtype)
    single = x.dim() == 2
    if single:
        x = x[None]
    if x.dim() != 3:
        raise ValueError(f"x must be [T, n, d] or [n, d], got shape {tuple(x.shape)}")
    T, n, d = x.shape
    target = soft if soft is not None else hard
    target = torch.as_tensor(target, dtype=dtype).reshape(T, n)
    if soft is not None:
        if torch.any(target < 0) or torch.any(target > 1):
            raise ValueError("soft must hold probabilities in [0, 1]")
        eps = 1e-12 if dtype == torch.float64 else 1e-6
        q = target.clamp(eps, 1 - eps).reshape(-1)
        teacher_logits = torch.stack([torch.zeros_like(q), torch.logit(q)], dim=1)
        keywords = {"hard_weight": 0.0, "soft_weight": 1.0}
        labels = None
    else:
        if not torch.all((target == 0) | (target == 1)):
            raise ValueError("hard must hold labels in {0, 1}")
        teacher_logits = None
        keywords = {"hard_weight": 1.0}
        labels = target.reshape(-1).long()
    w = torch.zeros(T, d, dtype=dtype)
    if init is not None:
        w.copy_(torch.as_tensor(init, dtype=dtype).reshape(T, d))
    w.requires_grad_(True)
    b = torch.zeros(T, dtype=dtype, requires_grad=True)
    params = [w, b] if intercept else [w]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")
    zero = torch.zeros(T * n, dtype=dtype)

    def closure():
        opt.zero_grad()
        z = torch.bmm(x, w[:, :, None])[:, :, 0] + (b[:, None] if intercept else 0.0)
        logits = torch.stack([zero, z.reshape(-1)], dim=1)
        loss = kdfast.distillation_loss(logits, labels, teacher_logits, reduction="sum", **keywords) / n
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return (w[0], b[0]) if single else (w, b)


# --------------------------------------------------------------------------- probability transforms


def temperature_transform(p: np.ndarray, alpha: float) -> np.ndarray:
    """Seed 000's ``phi_alpha(z) = z^a / (z^a + (1 - z)^a)`` of binary probabilities, computed as
    ``sigmoid(alpha * logit(z))``: the identity at ``alpha = 1``, the hard threshold ``1(z > 1/2)``
    at ``alpha = inf`` (with 1/2 at exactly 1/2, the limit of every finite alpha)."""
    p = np.asarray(p, dtype=np.float64)
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError("p must hold probabilities in [0, 1]")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if math.isinf(alpha):
        return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    with np.errstate(divide="ignore"):
        return expit(alpha * logit(p))


def calibration_distortion(u: np.ndarray, alpha: float) -> np.ndarray:
    """Seed 003 App. B.2's ``Psi_alpha``: ``(2u)^alpha / 2`` below 1/2, ``1/2 + (2u - 1)^(1/alpha) / 2``
    above. It keeps every decision (``Psi(u) > 1/2`` iff ``u > 1/2``) and is the identity at
    ``alpha = 1``; larger alpha pushes the probabilities away from their calibrated values.
    (The paper prints ``1/2 + (2u - 1)^(1/alpha)`` without the second 1/2, which leaves [0, 1]
    and is not the identity at alpha = 1; the factor is restored here.)"""
    u = np.asarray(u, dtype=np.float64)
    if np.any(u < 0) or np.any(u > 1):
        raise ValueError("u must hold probabilities in [0, 1]")
    if not alpha >= 1:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    low = 0.5 * (2 * np.minimum(u, 0.5)) ** alpha
    high = 0.5 + 0.5 * (2 * np.maximum(u, 0.5) - 1) ** (1 / alpha)
    return np.where(u <= 0.5, low, high)


# --------------------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray | float:
    """Area under the ROC curve (Mann-Whitney, ties count one half) of each row of ``scores``
    (``[n]`` or ``[T, n]``) against 0/1 ``labels`` (``[n]``, shared, or ``[T, n]``)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.broadcast_to(np.asarray(labels), scores.shape).astype(bool)
    ranks = rankdata(scores, axis=-1)
    pos = labels.sum(-1)
    neg = labels.shape[-1] - pos
    if np.any(pos == 0) or np.any(neg == 0):
        raise ValueError("labels must hold both classes in every row")
    auc = ((ranks * labels).sum(-1) - pos * (pos + 1) / 2) / (pos * neg)
    return float(auc) if np.ndim(auc) == 0 else auc


def mean_entropy(probs: np.ndarray) -> float:
    """Mean entropy (nats) of the rows of ``[n, k]`` class probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)
    return float(h.mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error: the mean over equal-width confidence bins of
    ``|accuracy - mean confidence|``, weighted by the share of rows in the bin."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [n, k] and labels [n], got {probs.shape} and {labels.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # bin i holds (i/bins, (i+1)/bins]
    which = np.where(confidence * bins == which, which - 1, which).clip(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            ece += rows.mean() * abs(correct[rows].mean() - confidence[rows].mean())
    return float(ece)


# --------------------------------------------------------------------------- data files


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST ``*-ubyte``, optionally ``.gz``) into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return body.reshape(shape).astype(dtype.newbyteorder("="))


def find_file(directory: Path, names: list[str]) -> Path:
    """The first of ``names`` (each also tried with ``.gz``) present in ``directory``."""
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"none of {names} (or .gz) in {directory}")


def load_idx_pair(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28] uint8, labels [n])`` of the MNIST-layout IDX files in ``directory``;
    ``split`` is ``"train"`` or ``"test"`` (file names ``train-images-idx3-ubyte`` or
    ``train-images.idx3-ubyte``, optionally gzipped)."""
    directory = Path(directory)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(find_file(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
    labels = read_idx(find_file(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels
