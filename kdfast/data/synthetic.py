"""A synthetic extreme multi-label data set with the statistics of Amazon-670K / AmazonCat-13K.

The real files cannot be downloaded from our machines (shared/DESIGN.md section 4), so the
experiments generate a stand-in with the same shape and the same kind of structure:

* **labels**: a Zipf prior ``p_l ∝ rank_l^(-zipf_exponent)`` over the labels (ranks a random
  permutation of the ids). The labels are split at random into ``num_clusters`` clusters of
  co-occurring labels. A point has ``k ~ Poisson(labels_per_point)`` labels, zero-truncated
  (``k >= 1``, the rate solved so that the mean is ``labels_per_point``); its candidate labels are
  drawn from one primary cluster (the cluster of a label drawn from the prior) with probability
  ``cluster_fraction`` each, from the whole prior otherwise, and the first ``k`` distinct ones
  are kept. The cluster is drawn in proportion to its prior mass and labels within it by the
  prior, so each label's marginal frequency stays close to the Zipf prior.
* **features**: each cluster has ``words_per_cluster`` topic words (uniform over the vocabulary)
  and each label ``words_per_label`` characteristic words, each one of its cluster's topic words
  with probability ``label_word_overlap`` (labels of a cluster share vocabulary and are confusable),
  uniform over the vocabulary otherwise; within a set, word weights ∝ 1/rank. The background is
  a Zipf distribution over the vocabulary (exponent ``word_zipf_exponent``). A point's text is a
  token stream: each token comes from one of its labels' words (the label chosen uniformly among
  the point's labels), from the topic words of the cluster of one of its labels, or from the
  background. The topical share of a point varies, ``Beta`` with mean
  ``label_word_share + cluster_word_share`` and concentration ``topicality_concentration``
  (some points say little about their labels), split between label and cluster words in the ratio
  of the two shares. The document is the shortest prefix of the stream with ``n`` distinct words,
  ``n ~ NegativeBinomial(mean features_per_point, CV ~0.45)`` (>= 1); its term counts are the tf.
  The defaults make the task about as hard as the real one: a nearest-centroid classifier gets
  P@1 ~0.4 on the full Amazon-670K shape (published systems: 0.40-0.45 on the real data).
* **weighting**: tf-idf with the idf fitted on the training points, rows L2-normalized
  (:func:`kdfast.data.tfidf`), as the real sets' features are tf-idf.

Everything is vectorized numpy, drawn in chunks of rows from seeds derived from ``seed`` (so the
output depends on the seed and the parameters only, not on the number of threads), and cached
as ``.npz`` under ``cache_dir``, keyed by every parameter and :data:`GENERATOR_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from .features import tfidf

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "SCALES",
    "Preset",
    "XMCData",
    "dataset_stats",
    "scaled_preset",
    "synthetic_xmc",
    "zipf_slope",
]

# Bump whenever the generated data for given parameters changes (invalidates the caches).
GENERATOR_VERSION = 1
_CHUNK_ROWS = 32768  # rows per independently seeded chunk (part of the output's definition)
_TEST_RATIO = 153_025 / 490_449  # Amazon-670K's test / train points


# --------------------------------------------------------------------------- statistics


def dataset_stats(X: sp.csr_matrix | None, Y: sp.csr_matrix) -> dict[str, float]:
    """Label and feature statistics of one split (``X`` may be ``None``), as in DESIGN section 4."""
    Y = sp.csr_matrix(Y)
    n, num_labels = Y.shape
    per_point = np.diff(Y.indptr)
    freq = np.bincount(Y.indices, minlength=num_labels)
    stats = {
        "points": float(n),
        "labels": float(num_labels),
        "labels_per_point": float(per_point.mean()) if n else float("nan"),
        "points_without_labels": float((per_point == 0).sum()),
        "points_per_label": float(freq.mean()) if num_labels else float("nan"),
        "labels_unused": float((freq == 0).sum()),
        "labels_under_5_points": float((freq < 5).sum()),
        "top_label_points": float(freq.max()) if num_labels else 0.0,
        "pairs": float(Y.nnz),
    }
    if X is not None:
        X = sp.csr_matrix(X)
        stats["features"] = float(X.shape[1])
        stats["features_per_point"] = float(np.diff(X.indptr).mean()) if n else float("nan")
    return stats


def zipf_slope(Y: sp.csr_matrix, *, head: float = 0.01, tail: float = 0.5) -> float:
    """Log-log slope of the label frequencies sorted descending, fitted over ranks in
    ``[head * L, tail * L]`` (labels with a nonzero count); about ``-zipf_exponent``."""
    freq = np.sort(np.bincount(sp.csr_matrix(Y).indices, minlength=Y.shape[1]))[::-1]
    freq = freq[freq > 0]
    lo, hi = max(1, int(head * freq.size)), max(2, int(tail * freq.size))
    ranks = np.arange(lo, hi) + 1.0
    return float(np.polyfit(np.log(ranks), np.log(freq[lo:hi]), 1)[0])


# --------------------------------------------------------------------------- the data


@dataclass
class XMCData:
    """A generated data set; unpacks as ``X_train, Y_train, X_test, Y_test = data``."""

    X_train: sp.csr_matrix
    Y_train: sp.csr_matrix
    X_test: sp.csr_matrix
    Y_test: sp.csr_matrix
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    cache_path: str | None = None
    from_cache: bool = False

    def __iter__(self):
        return iter((self.X_train, self.Y_train, self.X_test, self.Y_test))


# --------------------------------------------------------------------------- sampling helpers


def _zero_truncated_poisson_rate(mean: float) -> float:
    """The rate ``lam`` with ``lam / (1 - exp(-lam)) == mean`` (mean of Poisson(lam) given >= 1)."""
    if mean <= 1.0:
        return 0.0
    lo, hi = 0.0, mean
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid / -math.expm1(-mid) < mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _zero_truncated_poisson(rng: np.random.Generator, lam: float, size: int) -> np.ndarray:
    if lam <= 0.0:
        return np.ones(size, dtype=np.int64)
    k = rng.poisson(lam, size)
    while True:
        zero = np.flatnonzero(k == 0)
        if not zero.size:
            return k
        k[zero] = rng.poisson(lam, zero.size)


def _first_distinct(per_row: np.ndarray, value: np.ndarray, width: int, limit: np.ndarray):
    """For a row-major stream of draws (``per_row[r]`` values for row ``r``): keep each row's draws
    up to (and including) the first occurrence of its ``limit[r]``-th distinct value.

    Returns ``(keys, counts)``: the distinct ``row * width + value`` kept, sorted, and how many
    kept draws each has.
    """
    n = per_row.size
    row = np.repeat(np.arange(n, dtype=np.int64), per_row)
    key = row * np.int64(width) + value
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first_sorted = np.empty(key.size, dtype=bool)
    first_sorted[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first_sorted[1:])
    first = np.empty_like(first_sorted)
    first[order] = first_sorted
    # distinct values seen in the row strictly before each draw
    seen = np.cumsum(first, dtype=np.int64)
    seen -= first
    row_begin = np.cumsum(per_row) - per_row
    seen -= np.repeat(seen[np.minimum(row_begin, max(key.size - 1, 0))], per_row)
    keep = seen < np.repeat(limit, per_row)
    kept_sorted = sorted_key[keep[order]]
    if not kept_sorted.size:
        return kept_sorted, np.zeros(0, dtype=np.int64)
    boundary = np.flatnonzero(np.r_[True, kept_sorted[1:] != kept_sorted[:-1], True])
    return kept_sorted[boundary[:-1]], np.diff(boundary)


@dataclass
class _Structure:
    """The label / word model shared by all points of one (seed, parameters)."""

    num_features: int
    num_labels: int
    label_cluster: np.ndarray  # [L] cluster of each label
    by_cluster: np.ndarray  # labels sorted by cluster
    cum_prior: np.ndarray  # cumulative prior along by_cluster (float64, ends at 1)
    prior_sampler: _InverseCdf
    cluster_lo: np.ndarray  # [C] cum_prior before the cluster's first label
    cluster_hi: np.ndarray  # [C] cum_prior at the cluster's last label
    cluster_first: np.ndarray  # [C] index into by_cluster of the first label
    cluster_last: np.ndarray  # [C] index of the last label (first - 1 when empty)
    label_words: np.ndarray  # [L, words_per_label]
    cluster_words: np.ndarray  # [C, words_per_cluster]
    set_cum_label: np.ndarray  # within-set word weights (cumulative)
    set_cum_cluster: np.ndarray
    background_cum: _InverseCdf  # [D] cumulative Zipf over the ranks of background_words
    background_words: np.ndarray


def _zipf_cum(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cum = np.cumsum(w)
    return cum / cum[-1]


class _InverseCdf:
    """``searchsorted(cum, v, side="right")`` (clipped to the last index) in O(1) per value: a
    guide table of the first index past each of ``4 n`` equal steps, then a short exact scan."""

    def __init__(self, cum: np.ndarray):
        self.cum = cum
        self.steps = 4 * cum.size
        self.guide = np.searchsorted(cum, np.arange(self.steps) / self.steps, side="right").astype(np.int64)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        last = self.cum.size - 1
        i = self.guide[np.minimum((v * self.steps).astype(np.int64), self.steps - 1)]
        np.minimum(i, last, out=i)
        todo = np.flatnonzero(self.cum[i] <= v)
        while todo.size:
            i[todo] += 1
            todo = todo[(i[todo] < last) & (self.cum[i[todo]] <= v[todo])]
        return i


def _draw(cum, u: np.ndarray) -> np.ndarray:
    if isinstance(cum, _InverseCdf):
        return cum(u)
    return np.minimum(np.searchsorted(cum, u, side="right"), cum.size - 1)


def _build_structure(p: dict[str, Any], rng: np.random.Generator) -> _Structure:
    L, D, C = p["num_labels"], p["num_features"], p["num_clusters"]
    rank = rng.permutation(L)
    prior = (rank + 1.0) ** -p["zipf_exponent"]
    prior /= prior.sum()
    label_cluster = rng.integers(0, C, L)
    by_cluster = np.argsort(label_cluster, kind="stable")
    cum_prior = np.cumsum(prior[by_cluster])
    cum_prior /= cum_prior[-1]
    sorted_cluster = label_cluster[by_cluster]
    first = np.searchsorted(sorted_cluster, np.arange(C), side="left")
    end = np.searchsorted(sorted_cluster, np.arange(C), side="right")
    cum0 = np.r_[0.0, cum_prior]
    cluster_words = rng.integers(0, D, (C, p["words_per_cluster"]), dtype=np.int64)
    # each characteristic word of a label: one of its cluster's topic words with probability
    # label_word_overlap (labels of a cluster share vocabulary), else uniform over the vocabulary
    label_words = rng.integers(0, D, (L, p["words_per_label"]), dtype=np.int64)
    shared = rng.random(label_words.shape) < p["label_word_overlap"]
    rows, cols = np.nonzero(shared)
    label_words[rows, cols] = cluster_words[label_cluster[rows], rng.integers(0, p["words_per_cluster"], rows.size)]
    label_words, cluster_words = label_words.astype(np.int32), cluster_words.astype(np.int32)
    words = np.arange(1, D + 1)
    return _Structure(
        num_features=D,
        num_labels=L,
        label_cluster=label_cluster,
        by_cluster=by_cluster,
        cum_prior=cum_prior,
        prior_sampler=_InverseCdf(cum_prior),
        cluster_lo=cum0[first],
        cluster_hi=cum0[end],
        cluster_first=first,
        cluster_last=end - 1,
        label_words=label_words,
        cluster_words=cluster_words,
        set_cum_label=_zipf_cum(p["words_per_label"], 1.0),
        set_cum_cluster=_zipf_cum(p["words_per_cluster"], 1.0),
        background_cum=_InverseCdf(_zipf_cum(D, p["word_zipf_exponent"])),
        background_words=rng.permutation(words - 1),
    )


def _generate_rows(s: _Structure, p: dict[str, Any], n: int, rng: np.random.Generator):
    """``n`` points: (label indptr, label indices, feature indptr, feature indices, counts)."""
    L, D = s.num_labels, s.num_features
    # ---- labels: zero-truncated Poisson count, candidates from a primary cluster or the prior.
    # Per row 3k + 6 mixed candidates, then 2k + 6 from the prior alone (these matter only when
    # the mixed ones hold fewer than k distinct labels, e.g. in a cluster dominated by a head label).
    k = np.minimum(_zero_truncated_poisson(rng, p["_label_rate"], n), L)
    primary = s.label_cluster[s.by_cluster[s.prior_sampler(rng.random(n))]]
    mixed, per_row = 3 * k + 6, 5 * k + 12
    slot = np.arange(int(per_row.sum())) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    in_cluster = (slot < np.repeat(mixed, per_row)) & (rng.random(slot.size) < p["cluster_fraction"])
    pos = s.prior_sampler(rng.random(slot.size))
    c = np.repeat(primary, per_row)[in_cluster]
    lo, hi = s.cluster_lo[c], s.cluster_hi[c]
    inner = s.prior_sampler(lo + rng.random(c.size) * (hi - lo))
    pos[in_cluster] = np.clip(inner, s.cluster_first[c], s.cluster_last[c])
    keys, _ = _first_distinct(per_row, s.by_cluster[pos], L, k)
    y_label = keys % L
    y_count = np.bincount(keys // L, minlength=n)
    y_indptr = np.r_[0, np.cumsum(y_count)]

    # ---- features: a token stream per point, cut at its n-th distinct word
    nb_r = 1.0 / 0.45**2  # negative binomial shape: coefficient of variation ~0.45
    target = np.clip(rng.poisson(rng.gamma(nb_r, p["features_per_point"] / nb_r, n)), 1, D)
    # a stream of 1.6 n + 8 mixed tokens, then n + 8 background ones (which matter only when the
    # mixed part holds fewer than n distinct words: points that are almost all topical words)
    mixed = (1.6 * target).astype(np.int64) + 8
    per_row = mixed + target + 8
    total = int(per_row.sum())
    # source of each token: 0 a label's words, 1 a label's cluster's words, 2 the background;
    # the share of sources 0 and 1 varies by point: Beta with mean label + cluster share
    topical_mean = p["label_word_share"] + p["cluster_word_share"]
    kappa = p["topicality_concentration"]
    if 0.0 < topical_mean < 1.0 and kappa > 0:
        share = rng.beta(kappa * topical_mean, kappa * (1.0 - topical_mean), n)
    else:
        share = np.full(n, topical_mean)
    share = np.repeat(share, per_row)
    u = rng.random(total)
    src = np.full(total, 2, dtype=np.int8)
    src[u < share] = 1
    src[u < share * (p["label_word_share"] / topical_mean if topical_mean > 0 else 0.0)] = 0
    slot = np.arange(total) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    src[(slot >= np.repeat(mixed, per_row)) | np.repeat(y_count == 0, per_row)] = 2
    word = np.empty(total, dtype=np.int64)
    bg = src == 2
    word[bg] = s.background_words[_draw(s.background_cum, rng.random(int(bg.sum())))]
    topical = ~bg
    rows = np.repeat(np.arange(n), per_row)[topical]
    # one of the point's labels, uniformly
    pick = y_label[y_indptr[rows] + (rng.random(rows.size) * y_count[rows]).astype(np.int64)]
    is_label = src[topical] == 0
    idx = np.flatnonzero(topical)
    j = _draw(s.set_cum_label, rng.random(int(is_label.sum())))
    word[idx[is_label]] = s.label_words[pick[is_label], j]
    j = _draw(s.set_cum_cluster, rng.random(int((~is_label).sum())))
    word[idx[~is_label]] = s.cluster_words[s.label_cluster[pick[~is_label]], j]
    keys, counts = _first_distinct(per_row, word, D, target)
    x_word = keys % D
    x_indptr = np.r_[0, np.cumsum(np.bincount(keys // D, minlength=n))]
    return y_indptr, y_label, x_indptr, x_word, counts


def _split(s: _Structure, p: dict[str, Any], n: int, split_id: int, threads: int):
    chunks = [(start, min(n, start + _CHUNK_ROWS)) for start in range(0, n, _CHUNK_ROWS)]

    def work(i: int):
        seq = np.random.SeedSequence([p["seed"], GENERATOR_VERSION, split_id, i])
        return _generate_rows(s, p, chunks[i][1] - chunks[i][0], np.random.default_rng(seq))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        parts = list(pool.map(work, range(len(chunks))))

    def stack(indptr_at: int, values_at: int):
        indptr, offset = [np.zeros(1, dtype=np.int64)], 0
        for part in parts:
            indptr.append(part[indptr_at][1:] + offset)
            offset += int(part[indptr_at][-1])
        values = [part[values_at] for part in parts]
        return np.concatenate(indptr), values

    y_indptr, y_vals = stack(0, 1)
    x_indptr, x_vals = stack(2, 3)
    y_idx = np.concatenate(y_vals) if y_vals else np.zeros(0, np.int64)
    x_idx = np.concatenate(x_vals) if x_vals else np.zeros(0, np.int64)
    counts = np.concatenate([part[4] for part in parts]) if parts else np.zeros(0, np.int64)
    Y = sp.csr_matrix((np.ones(y_idx.size, np.float32), y_idx, y_indptr), shape=(n, s.num_labels))
    X = sp.csr_matrix((counts.astype(np.float32), x_idx, x_indptr), shape=(n, s.num_features))
    return X, Y


# --------------------------------------------------------------------------- the generator


def _params(
    num_points, num_features, num_labels, num_test_points, labels_per_point, features_per_point,
    zipf_exponent, word_zipf_exponent, num_clusters, cluster_fraction, words_per_label,
    words_per_cluster, label_word_share, cluster_word_share, label_word_overlap, topicality_concentration, seed,
) -> dict[str, Any]:
    p = {
        "num_points": int(num_points),
        "num_test_points": round(num_points * _TEST_RATIO) if num_test_points is None else int(num_test_points),
        "num_features": int(num_features),
        "num_labels": int(num_labels),
        "labels_per_point": float(labels_per_point),
        "features_per_point": float(features_per_point),
        "zipf_exponent": float(zipf_exponent),
        "word_zipf_exponent": float(word_zipf_exponent),
        "num_clusters": int(max(1, num_labels // 25) if num_clusters is None else num_clusters),
        "cluster_fraction": float(cluster_fraction),
        "words_per_label": int(words_per_label),
        "words_per_cluster": int(words_per_cluster),
        "label_word_share": float(label_word_share),
        "cluster_word_share": float(cluster_word_share),
        "label_word_overlap": float(label_word_overlap),
        "topicality_concentration": float(topicality_concentration),
        "seed": int(seed),
    }
    if p["num_points"] < 1 or p["num_test_points"] < 0:
        raise ValueError("num_points must be >= 1 and num_test_points >= 0")
    if p["num_features"] < 1 or p["num_labels"] < 1 or p["num_clusters"] < 1:
        raise ValueError("num_features, num_labels and num_clusters must be >= 1")
    if p["labels_per_point"] < 1 or p["features_per_point"] < 1:
        raise ValueError("labels_per_point and features_per_point must be >= 1")
    if p["words_per_label"] < 1 or p["words_per_cluster"] < 1:
        raise ValueError("words_per_label and words_per_cluster must be >= 1")
    shares = (p["cluster_fraction"], p["label_word_share"], p["cluster_word_share"], p["label_word_overlap"])
    if not all(0.0 <= v <= 1.0 for v in shares) or p["label_word_share"] + p["cluster_word_share"] > 1.0:
        raise ValueError(
            "cluster_fraction, label_word_overlap and the word shares must lie in [0, 1], the shares summing to <= 1"
        )
    if p["topicality_concentration"] < 0:
        raise ValueError("topicality_concentration must be >= 0 (0: the same topical share for every point)")
    return p


def _describe(p, Xtr, Ytr, Xte, Yte, name: str | None, note: str, seconds: float, source: str) -> str:
    tr, te = dataset_stats(Xtr, Ytr), dataset_stats(Xte, Yte)
    L = p["num_labels"]
    lines = [
        (f"synthetic {'data' if name is None else name + '-like data'} (kdfast.data.synthetic_xmc v{GENERATOR_VERSION}, "
        f"seed {p['seed']}; {source} in {seconds:.1f} s)"),
        (f"  shape: {p['num_points']:,} train / {p['num_test_points']:,} test points, "
        f"{p['num_features']:,} features, {L:,} labels"),
    ]
    if note:
        lines.append(f"  {note}")
    lines += [
        (f"  train: {tr['labels_per_point']:.2f} labels/point (target {p['labels_per_point']}), "
        f"{tr['features_per_point']:.1f} nonzero features/point (target {p['features_per_point']}), "
        f"{tr['points_per_label']:.2f} points/label, {int(tr['pairs']):,} (x, y) pairs"),
        (f"  labels: Zipf prior exponent {p['zipf_exponent']} in {p['num_clusters']:,} co-occurrence clusters; "
        f"{tr['labels_under_5_points'] / L:.0%} have < 5 train points, {tr['labels_unused'] / L:.0%} none; "
        f"the most frequent is on {int(tr['top_label_points']):,} train points"),
        (f"  test: {te['labels_per_point']:.2f} labels/point, {te['features_per_point']:.1f} features/point; "
        "features: label/cluster-specific words + Zipf background, tf-idf (idf from train) + L2 rows"),
    ]
    return "\n".join(lines)


def _cache_file(cache_dir: str, p: dict[str, Any]) -> str:
    blob = json.dumps({"version": GENERATOR_VERSION, "chunk": _CHUNK_ROWS, **p}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return os.path.join(os.fspath(cache_dir), f"synthetic_xmc-v{GENERATOR_VERSION}-{digest}.npz")


def _save(path: str, mats: dict[str, sp.csr_matrix]) -> None:
    arrays = {}
    for name, M in mats.items():
        arrays[f"{name}_data"], arrays[f"{name}_indices"] = M.data, M.indices
        arrays[f"{name}_indptr"], arrays[f"{name}_shape"] = M.indptr, np.asarray(M.shape, dtype=np.int64)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: str, names) -> dict[str, sp.csr_matrix]:
    with np.load(path, allow_pickle=False) as z:
        return {
            n: sp.csr_matrix((z[f"{n}_data"], z[f"{n}_indices"], z[f"{n}_indptr"]), shape=tuple(z[f"{n}_shape"]))
            for n in names
        }


def synthetic_xmc(
    num_points: int,
    num_features: int,
    num_labels: int,
    *,
    num_test_points: int | None = None,
    labels_per_point: float = 5.45,
    features_per_point: float = 75.0,
    zipf_exponent: float = 0.6,
    word_zipf_exponent: float = 1.0,
    num_clusters: int | None = None,
    cluster_fraction: float = 0.8,
    words_per_label: int = 12,
    words_per_cluster: int = 40,
    label_word_share: float = 0.2,
    cluster_word_share: float = 0.15,
    label_word_overlap: float = 0.5,
    topicality_concentration: float = 2.0,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    name: str | None = None,
    note: str = "",
) -> XMCData:
    """Generate (or load from ``cache_dir``) a synthetic extreme multi-label data set.

    ``num_points`` training points and ``num_test_points`` test points (default: Amazon-670K's
    test/train ratio, 0.312) from the same distribution; see the module docstring for the model.
    ``num_clusters`` defaults to ``num_labels // 25``. Returns an :class:`XMCData` (unpacks as
    ``X_train, Y_train, X_test, Y_test``: float32 CSR, features tf-idf + L2, labels ones) whose
    ``description`` says what was generated and its measured statistics. The output depends only
    on the parameters and ``seed`` (not on ``threads``, the worker threads, default all cores);
    ``name`` / ``note`` only label the description.
    """
    p = _params(
        num_points, num_features, num_labels, num_test_points, labels_per_point, features_per_point,
        zipf_exponent, word_zipf_exponent, num_clusters, cluster_fraction, words_per_label,
        words_per_cluster, label_word_share, cluster_word_share, label_word_overlap, topicality_concentration, seed,
    )
    names = ("X_train", "Y_train", "X_test", "Y_test")
    start = time.perf_counter()
    path = _cache_file(cache_dir, p) if cache_dir is not None else None
    if path is not None and os.path.exists(path):
        mats = _load(path, names)
        source = f"loaded from the cache {path}"
        from_cache = True
    else:
        q = dict(p, _label_rate=_zero_truncated_poisson_rate(p["labels_per_point"]))
        structure = _build_structure(q, np.random.default_rng(np.random.SeedSequence([p["seed"], GENERATOR_VERSION])))
        threads = (os.cpu_count() or 1) if threads is None else threads
        X_train, Y_train = _split(structure, q, p["num_points"], 1, threads)
        X_test, Y_test = _split(structure, q, p["num_test_points"], 2, threads)
        X_train, X_test = tfidf(X_train, X_test)
        mats = {"X_train": X_train, "Y_train": Y_train, "X_test": X_test, "Y_test": Y_test}
        from_cache = False
        source = "generated"
        if path is not None:
            _save(path, mats)
            source = f"generated, cached at {path}"
    seconds = time.perf_counter() - start
    description = _describe(p, *(mats[n] for n in names), name, note, seconds, source)
    return XMCData(*(mats[n] for n in names), description=description, params=p, cache_path=path, from_cache=from_cache)


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A data set's shape and statistics (DESIGN section 4), possibly scaled down.

    ``generate(seed=..., cache_dir=...)`` makes the synthetic stand-in; ``propensity_a`` /
    ``propensity_b`` are the PSP constants of :func:`kdfast.metrics.inverse_propensity`.
    """

    name: str
    num_train: int
    num_test: int
    num_features: int
    num_labels: int
    labels_per_point: float
    features_per_point: float
    zipf_exponent: float
    propensity_a: float
    propensity_b: float
    scale: str = "full"
    note: str = ""

    def describe(self) -> str:
        return (
            f"{self.name} at scale '{self.scale}': {self.num_train:,} train / {self.num_test:,} test points, "
            f"{self.num_features:,} features, {self.num_labels:,} labels"
            + (f" ({self.note})" if self.note else "")
        )

    def generate(self, *, seed: int = 0, cache_dir=None, **overrides) -> XMCData:
        kwargs = {
            "num_test_points": self.num_test,
            "labels_per_point": self.labels_per_point,
            "features_per_point": self.features_per_point,
            "zipf_exponent": self.zipf_exponent,
            "seed": seed,
            "cache_dir": cache_dir,
            "name": f"{self.name} ({self.scale})",
            "note": self.note,
        }
        kwargs.update(overrides)
        return synthetic_xmc(self.num_train, self.num_features, self.num_labels, **kwargs)


PRESETS: dict[str, Preset] = {
    "amazon670k": Preset(
        name="amazon670k", num_train=490_449, num_test=153_025, num_features=135_909, num_labels=670_091,
        labels_per_point=5.45, features_per_point=75.7, zipf_exponent=0.6, propensity_a=0.6, propensity_b=2.6,
    ),
    "amazoncat13k": Preset(
        name="amazoncat13k", num_train=1_186_239, num_test=306_782, num_features=203_882, num_labels=13_330,
        labels_per_point=5.04, features_per_point=71.2, zipf_exponent=1.0, propensity_a=0.55, propensity_b=1.5,
    ),
}

# (train, test, features, labels) per scale below "full"; None keeps the real value.
_SCALES: dict[str, dict[str, tuple[int, int, int, int | None]]] = {
    "amazon670k": {"tiny": (2_000, 600, 5_000, 2_500), "cpu": (50_000, 15_000, 50_000, 30_000)},
    "amazoncat13k": {"tiny": (2_000, 600, 5_000, 1_000), "cpu": (50_000, 15_000, 50_000, None)},
}
SCALES = ("tiny", "cpu", "full")


def scaled_preset(name: str, scale: str) -> Preset:
    """``PRESETS[name]`` at ``scale``: ``"full"`` (the real shape), ``"cpu"`` (the whole 4-model
    experiment in minutes on 2 cores: ~50k train points, label space reduced) or ``"tiny"`` (CI
    smoke: 2k train points). The returned preset's ``note`` says what was reduced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {SCALES}")
    real = PRESETS[name]
    if scale == "full":
        return replace(real, note="the real data set's shape")
    train, test, features, labels = _SCALES[name][scale]
    labels = real.num_labels if labels is None else labels
    parts = [
        (f"scaled down from the real {real.num_train:,} / {real.num_test:,} points "
        f"and {real.num_features:,} features"),
        f"label space reduced {real.num_labels:,} -> {labels:,} ({real.num_labels / labels:.0f}x)"
        if labels != real.num_labels else f"full label space of {labels:,}",
        (f"expected train points per label {train * real.labels_per_point / labels:.1f} "
        f"(real {real.num_train * real.labels_per_point / real.num_labels:.2f})"),
    ]
    return replace(real, num_train=train, num_test=test, num_features=features, num_labels=labels,
                   scale=scale, note="; ".join(parts))

