"""Target and teacher containers taken by the fused losses.

* :class:`MultiTarget` — the positives of each row in CSR form, for pick-all-labels:
  a row with positives ``Y`` counts as ``|Y|`` rows ``(x, y)``, computed in one pass.
* :class:`TopK` — a stored teacher: per row its ``k`` largest logits, their class
  indices, and the log-partition over all classes (``shared/DESIGN.md`` section 2,
  "Sparse teacher").

Both are ``NamedTuple``s, so they pass through ``torch.compile`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["MultiTarget", "TopK"]


class MultiTarget(NamedTuple):
    """Positives per row in CSR form: row ``i`` has ``indices[indptr[i]:indptr[i+1]]``.

    ``indptr`` is int64 ``[B + 1]`` starting at 0; ``indices`` int64, sorted ascending within
    each row, each in ``[0, V)``. Rows with no positives contribute nothing.
    """

    indptr: Tensor
    indices: Tensor

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], device: torch.device | str | None = None) -> MultiTarget:
        """From one list of class indices per row (sorted here)."""
        lengths = [len(r) for r in rows]
        indptr = torch.zeros(len(rows) + 1, dtype=torch.int64)
        indptr[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        flat = [c for r in rows for c in sorted(r)]
        indices = torch.tensor(flat, dtype=torch.int64)
        return cls(indptr.to(device), indices.to(device))

    @classmethod
    def from_scipy(cls, matrix, device: torch.device | str | None = None) -> MultiTarget:
        """From a ``scipy.sparse`` label matrix ``[B, V]`` (nonzeros are positives)."""
        csr = matrix.tocsr()
        csr.sort_indices()
        indptr = torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64))
        indices = torch.from_numpy(np.asarray(csr.indices, dtype=np.int64))
        return cls(indptr.to(device), indices.to(device))

    @property
    def num_rows(self) -> int:
        return self.indptr.shape[0] - 1

    def num_positives(self) -> Tensor:
        """Total number of positives (a 0-d tensor): the divisor of ``reduction="mean"``."""
        return self.indptr[-1] - self.indptr[0]

    def to_lists(self) -> list[list[int]]:
        p = self.indptr.tolist()
        idx = self.indices.tolist()
        return [idx[p[i] : p[i + 1]] for i in range(len(p) - 1)]


class TopK(NamedTuple):
    """A stored teacher: ``indices`` int64 ``[B, k]`` and ``logits`` ``[B, k]`` of its k
    largest logits, ``lse`` ``[B]`` the log-partition over all classes. ``entropy`` and
    ``covered`` (probability mass inside the top-k) are optional per-row extras written
    by teacher labeling.

    ``temperature`` is the temperature ``lse``, ``entropy`` and ``covered`` were computed
    at: ``lse = LSE(logits / temperature)`` (:func:`kdfast.teacher_topk` and a label store
    set it; ``logits`` are always raw).

    The fused losses use the top-k probabilities renormalized over the k stored classes
    as positives, and double-distillation weights from the stored logits inside the
    top-k and 1 outside. ``one_minus_prob`` weights use ``exp(logit - lse)``, so they need
    ``temperature == 1``; the fused loss rejects any other.
    """

    indices: Tensor
    logits: Tensor
    lse: Tensor
    entropy: Tensor | None = None
    covered: Tensor | None = None
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def to(self, device: torch.device | str) -> TopK:
        """The same teacher with every tensor on ``device``."""
        moved = {f: None if t is None else t.to(device) for f, t in zip(TOPK_TENSOR_FIELDS, self)}
        return TopK(**moved, temperature=self.temperature)


TOPK_TENSOR_FIELDS = ("indices", "logits", "lse", "entropy", "covered")  # TopK's tensor fields, in order
