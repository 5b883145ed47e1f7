"""Ranking metrics of extreme multi-label classification, as the XMLRepo tools define them.

All take the predicted labels of each test row in rank order, ``topk_indices [N, >= k]``
(int, numpy or torch, any device; a negative entry means "no prediction" and is never
relevant), and the true labels ``Y`` (``scipy.sparse`` ``[N, L]``; a nonzero is a label). They
follow pyxclib's ``xclib.evaluation.xc_metrics`` and the Matlab tools of the Extreme
Classification Repository:

* ``P@k = mean_i (1/k) * #{relevant among the top k of row i}``;
* ``nDCG@k = mean_i DCG@k_i / IDCG@min(k, |y_i|)``, ``DCG@k_i = sum_{r <= k, relevant} 1/log2(r + 1)``
  (ranks ``r`` from 1);
* ``PSP@k = sum_i sum_{r <= k, relevant} w_{l_r} / sum_i (the largest min(k, |y_i|) weights w_l
  among row i's true labels)`` with the inverse propensities ``w`` of :func:`inverse_propensity`.

Rows without labels (they occur in the real test sets): for P@k and nDCG@k they count as rows
scoring 0 and stay in the mean's denominator ``N`` (pyxclib and the Matlab tools average over
all rows; nDCG's ideal DCG of an empty row is never 0 there, so its ratio is 0); for PSP@k,
which both tools compute as a ratio of the two column means (not a mean of per-row ratios), an
empty row adds 0 to numerator and denominator, i.e. it drops out. With no rows (or, for PSP,
no labels at all) the metrics are ``nan``.

The predictions of a row must be distinct labels (a repeated label would be counted twice by the
tools' formulas: here it is an error).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "evaluate",
    "inverse_propensity",
    "ndcg_at_k",
    "precision_at_k",
    "psprecision_at_k",
]


def _topk_array(topk_indices, k: int) -> np.ndarray:
    if hasattr(topk_indices, "detach"):  # torch.Tensor, on any device
        topk_indices = topk_indices.detach().cpu().numpy()
    top = np.asarray(topk_indices)
    if top.ndim != 2:
        raise ValueError(f"topk_indices must be 2-D [N, >= k], got shape {top.shape}")
    if not np.issubdtype(top.dtype, np.integer):
        raise TypeError(f"topk_indices must hold integers, got dtype {top.dtype}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if top.shape[1] < k:
        raise ValueError(f"topk_indices has {top.shape[1]} columns, fewer than k = {k}")
    return top[:, :k].astype(np.int64)


def _label_matrix(Y) -> sp.csr_matrix:
    if not sp.issparse(Y):
        raise TypeError(f"Y must be a scipy.sparse matrix [N, L], got {type(Y).__name__}")
    Y = sp.csr_matrix(Y, copy=True)
    Y.eliminate_zeros()
    Y.sum_duplicates()  # also sorts the column indices
    Y.data[:] = 1
    return Y


def _relevance(top: np.ndarray, Y: sp.csr_matrix) -> np.ndarray:
    """Boolean ``[N, k]``: is ``top[i, r]`` one of row i's labels (vectorized membership test)."""
    n, num_labels = Y.shape
    if top.shape[0] != n:
        raise ValueError(f"topk_indices has {top.shape[0]} rows but Y has {n}")
    if top.size and top.max() >= num_labels:
        raise ValueError(f"topk_indices holds label {int(top.max())} outside [0, L = {num_labels})")
    ordered = np.sort(top, axis=1)
    if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
        row = int(np.nonzero(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1))[0][0])
        raise ValueError(f"topk_indices repeats a label in row {row}: {top[row].tolist()}")
    # CSR with sorted indices -> keys row * L + label are globally sorted
    keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(Y.indptr)) * num_labels + Y.indices
    query = np.arange(n, dtype=np.int64)[:, None] * num_labels + top
    pos = np.searchsorted(keys, query)
    found = keys[np.minimum(pos, max(keys.size - 1, 0))] == query if keys.size else np.zeros(top.shape, bool)
    return found & (top >= 0)


def precision_at_k(topk_indices, Y, k: int) -> float:
    """P@k: the mean over all rows of the fraction of the top k that are true labels."""
    top = _topk_array(topk_indices, k)
    rel = _relevance(top, _label_matrix(Y))
    return float(rel.sum(axis=1).mean() / k) if rel.shape[0] else float("nan")


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # 1/log2(r + 1) for ranks r = 1..k


def ndcg_at_k(topk_indices, Y, k: int) -> float:
    """nDCG@k: DCG@k over the ideal DCG of ``min(k, |y|)`` relevant labels, mean over all rows."""
    top = _topk_array(topk_indices, k)
    Y = _label_matrix(Y)
    rel = _relevance(top, Y)
    if not rel.shape[0]:
        return float("nan")
    disc = _discounts(k)
    dcg = rel @ disc
    ideal_count = np.minimum(np.diff(Y.indptr), k)
    idcg = np.concatenate([[0.0], np.cumsum(disc)])[ideal_count]
    scores = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    return float(scores.mean())


def inverse_propensity(Y_train, A: float, B: float) -> np.ndarray:
    """Inverse propensities ``w_l = 1 + C (N_l + B)^(-A)``, ``C = (ln N - 1)(B + 1)^A`` (float64 ``[L]``).

    ``N`` is the number of training points (rows of ``Y_train``), ``N_l`` the number of them
    labeled ``l`` (Jain et al. 2016; A, B = 0.6, 2.6 for Amazon-670K, 0.55, 1.5 for AmazonCat-13K).
    """
    Y = _label_matrix(Y_train)
    n, num_labels = Y.shape
    counts = np.bincount(Y.indices, minlength=num_labels).astype(np.float64)
    C = (np.log(n) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * np.power(counts + B, -A)


def _best_weighted_sum(Y: sp.csr_matrix, inv_propensity: np.ndarray, k: int) -> float:
    """Sum over rows of the k largest inverse propensities among each row's true labels."""
    n = Y.shape[0]
    rows = np.repeat(np.arange(n), np.diff(Y.indptr))
    w = inv_propensity[Y.indices]
    order = np.lexsort((-w, rows))  # by row, then weight descending
    rank = np.arange(order.size) - Y.indptr[rows[order]]
    return float(w[order][rank < k].sum())


def _check_propensity(inv_propensity, num_labels: int) -> np.ndarray:
    w = np.asarray(inv_propensity, dtype=np.float64)
    if w.shape != (num_labels,):
        raise ValueError(f"inv_propensity must have shape [L] = ({num_labels},), got {w.shape}")
    return w


def psprecision_at_k(topk_indices, Y, inv_propensity, k: int) -> float:
    """PSP@k: propensity-weighted hits in the top k over the best achievable weighted sum.

    Both sums run over all rows before dividing (the XMLRepo tools' definition): rows without
    labels drop out. ``inv_propensity`` is :func:`inverse_propensity` of the training labels.
    """
    top = _topk_array(topk_indices, k)
    Y = _label_matrix(Y)
    w = _check_propensity(inv_propensity, Y.shape[1])
    rel = _relevance(top, Y)
    gained = float(np.where(rel, w[np.maximum(top, 0)], 0.0).sum())
    best = _best_weighted_sum(Y, w, k)
    return gained / best if best > 0 else float("nan")


def evaluate(topk_indices, Y, inv_propensity=None, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """``{"P@k", "nDCG@k"[, "PSP@k"]}`` for each ``k`` in ``ks`` (PSP only with ``inv_propensity``)."""
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must hold positive ints, got {k!r} in {tuple(ks)!r}")
    ks = tuple(int(k) for k in ks)
    if not ks:
        return {}
    top = _topk_array(topk_indices, max(ks))
    Y = _label_matrix(Y)
    w = None if inv_propensity is None else _check_propensity(inv_propensity, Y.shape[1])
    rel = _relevance(top, Y)  # one membership pass for every k
    n = rel.shape[0]
    sizes = np.diff(Y.indptr)
    disc = _discounts(max(ks))
    cum_disc = np.concatenate([[0.0], np.cumsum(disc)])
    weighted = None if w is None else np.where(rel, w[np.maximum(top, 0)], 0.0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = float(rel[:, :k].sum(axis=1).mean() / k) if n else float("nan")
    for k in ks:
        dcg = rel[:, :k] @ disc[:k]
        idcg = cum_disc[np.minimum(sizes, k)]
        out[f"nDCG@{k}"] = float(np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0).mean()) if n else float("nan")
    if w is not None:
        for k in ks:
            best = _best_weighted_sum(Y, w, k)
            out[f"PSP@{k}"] = float(weighted[:, :k].sum()) / best if best > 0 else float("nan")
    return out
