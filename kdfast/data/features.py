"""Feature weighting of sparse bag-of-words matrices: tf-idf fitted on the training set, L2 rows.

The XMLRepo BoW files of Amazon-670K and AmazonCat-13K already hold tf-idf values: for them
only :func:`l2_normalize` is needed. Raw term counts (the synthetic generator's) go through
:func:`tfidf`, which fits the idf on the training matrix only and applies it to every matrix given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["TfIdf", "idf_weights", "l2_normalize", "tfidf"]


def _csr32(X, copy: bool) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32, copy=copy)
    X.sum_duplicates()
    return X


def _row_ids(X: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))


def l2_normalize(X, *, copy: bool = True) -> sp.csr_matrix:
    """Rows scaled to unit L2 norm (norms accumulated in float64); rows with no nonzero stay zero.

    Returns a float32 ``csr_matrix`` (a new one unless ``copy=False`` and ``X`` already is one).
    """
    X = _csr32(X, copy)
    sq = np.bincount(_row_ids(X), weights=np.square(X.data, dtype=np.float64), minlength=X.shape[0])
    norms = np.sqrt(sq)
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    X.data *= np.repeat(scale, np.diff(X.indptr)).astype(np.float32)
    return X


def idf_weights(X_train) -> np.ndarray:
    """Smoothed inverse document frequencies ``ln((1 + N) / (1 + df_j)) + 1`` (float32 ``[D]``).

    ``df_j`` is the number of rows of ``X_train`` with a nonzero in column ``j`` (scikit-learn's
    ``TfidfTransformer(smooth_idf=True)``): finite for features absent from the training set.
    """
    X = sp.csr_matrix(X_train)
    X.sum_duplicates()
    n, d = X.shape
    df = np.bincount(X.indices[X.data != 0], minlength=d)
    return (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)


@dataclass(frozen=True)
class TfIdf:
    """A tf-idf weighting fitted on a training matrix: ``TfIdf.fit(X_train).transform(X)``."""

    idf: np.ndarray
    sublinear_tf: bool = False

    @classmethod
    def fit(cls, X_train, *, sublinear_tf: bool = False) -> TfIdf:
        return cls(idf_weights(X_train), sublinear_tf)

    def transform(self, X, *, normalize: bool = True) -> sp.csr_matrix:
        """``tf * idf`` (``tf`` the stored value, ``1 + ln(tf)`` with ``sublinear_tf``), then L2 rows."""
        X = _csr32(X, copy=True)
        if X.shape[1] != self.idf.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features but the idf was fitted on {self.idf.shape[0]}")
        if self.sublinear_tf:
            positive = X.data > 0
            X.data[positive] = 1.0 + np.log(X.data[positive])
        X.data *= self.idf[X.indices]
        return l2_normalize(X, copy=False) if normalize else X


def tfidf(X_train, *X_others, sublinear_tf: bool = False, normalize: bool = True) -> tuple[sp.csr_matrix, ...]:
    """tf-idf with the idf fitted on ``X_train`` only, applied to ``X_train`` and each of ``X_others``.

    Returns a tuple ``(X_train', *X_others')`` of float32 ``csr_matrix`` with L2-normalized rows
    (unless ``normalize=False``); rows with no features stay zero. E.g.
    ``X_train, X_test = tfidf(X_train, X_test)``.
    """
    weighting = TfIdf.fit(X_train, sublinear_tf=sublinear_tf)
    return tuple(weighting.transform(X, normalize=normalize) for X in (X_train, *X_others))
