"""Extreme Classification Repository (XMLRepo) BoW files: read (C++ parser) and write.

Format (shared/DESIGN.md section 4): a header line ``N D L``, then one line per point::

    l1,l2,...,lk f:v f:v ...

labels comma-separated, 0-based feature and label ids; a point without labels starts with
a blank. The parsing is the ``torch.ops.kdfast.read_xmlrepo`` op (``csrc/cpu/xmlrepo_reader.cpp``):
one pass, errors name the file, the line and the token, and a header that disagrees with the
content is an error. This module turns its CSR arrays into scipy matrices.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import scipy.sparse as sp
import torch

from .. import _C  # noqa: F401  (loading the extension registers torch.ops.kdfast.read_xmlrepo)

__all__ = ["read_xmlrepo", "write_xmlrepo"]

PathLike = Union[str, "os.PathLike[str]"]


def read_xmlrepo(path: PathLike) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Read an XMLRepo BoW file.

    Returns ``(X, Y)``: ``X`` a float32 ``csr_matrix [N, D]`` of the feature values as stored
    (no re-weighting; see :func:`kdfast.data.l2_normalize` / :func:`kdfast.data.tfidf`), and ``Y``
    a float32 ``csr_matrix [N, L]`` of ones at each point's labels. Both have sorted column
    indices without duplicates: a feature listed twice on a line has its values summed, a label
    listed twice counts once.

    Raises ``ValueError`` (from the C++ parser) naming the file, line and token for malformed
    input, ids outside ``[0, D)`` / ``[0, L)``, a point count other than the header's ``N``, or a
    file that cannot be opened.
    """
    path = os.fspath(path)
    x_indptr, x_indices, x_values, y_indptr, y_indices, header = torch.ops.kdfast.read_xmlrepo(path)
    n, d, num_labels = (int(v) for v in header.tolist())
    X = sp.csr_matrix((x_values.numpy(), x_indices.numpy(), x_indptr.numpy()), shape=(n, d))
    X.sum_duplicates()  # sorts the indices too; a no-op pass for well-formed files
    Y = sp.csr_matrix(
        (np.ones(y_indices.shape[0], dtype=np.float32), y_indices.numpy(), y_indptr.numpy()),
        shape=(n, num_labels),
    )
    Y.sum_duplicates()
    Y.data[:] = 1.0
    return X, Y


def _label_matrix(Y) -> sp.csr_matrix:
    Y = sp.csr_matrix(Y)
    Y.eliminate_zeros()
    Y.sum_duplicates()
    return Y


def write_xmlrepo(path: PathLike, X, Y, *, value_format: str = "%.9g") -> None:
    """Write ``X [N, D]`` (features) and ``Y [N, L]`` (nonzero = label) as an XMLRepo BoW file.

    The inverse of :func:`read_xmlrepo`: ``value_format`` ``"%.9g"`` round-trips float32 values
    exactly. Stored features are written as they are (explicit zeros included, in the matrix's
    index order); a point without labels gets the format's leading blank, and a point without
    labels or features is a line holding one blank.
    """
    X = sp.csr_matrix(X)
    Y = _label_matrix(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    n, d = X.shape
    num_labels = Y.shape[1]
    x_indptr, y_indptr = X.indptr, Y.indptr
    features = [f"{j}:{value_format % v}" for j, v in zip(X.indices.tolist(), X.data.astype(np.float64).tolist())]
    labels = [str(j) for j in Y.indices.tolist()]
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(f"{n} {d} {num_labels}\n")
        lines = []
        for i in range(n):
            head = ",".join(labels[y_indptr[i] : y_indptr[i + 1]])
            tail = " ".join(features[x_indptr[i] : x_indptr[i + 1]])
            lines.append(f"{head} {tail}\n" if tail or not head else head + "\n")
            if len(lines) >= 65536:
                f.writelines(lines)
                lines.clear()
        f.writelines(lines)
    os.replace(tmp, path)
