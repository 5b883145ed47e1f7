"""Tests of ``kdfast.metrics``: P@k, nDCG@k, PSP@k and the inverse propensities.

Three oracles: an example worked by hand (numbers in the comments), brute-force per-row loops
over random data written straight from the XMLRepo tools' definitions, and the propensity
formula itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from kdfast import metrics

# --------------------------------------------------------------------------- a hand-worked example
#
# L = 6 labels, 3 test rows:
#   row 0: true {0, 2, 3}, predicted [2, 1, 0, 5, 3]  -> relevant at ranks 1, 3, 5
#   row 1: true {1},       predicted [4, 1, 0, 5, 2]  -> relevant at rank 2
#   row 2: true {} (no labels), predicted [0, 1, 2, 3, 4]
# inverse propensities w = [1, 2, 3, 4, 5, 6] (w_l = l + 1)

Y_HAND = sp.csr_matrix(
    (np.ones(4, np.float32), np.array([0, 2, 3, 1]), np.array([0, 3, 4, 4])), shape=(3, 6)
)
TOP_HAND = np.array([[2, 1, 0, 5, 3], [4, 1, 0, 5, 2], [0, 1, 2, 3, 4]])
W_HAND = np.arange(1.0, 7.0)

L2 = math.log2
EXPECTED_HAND = {
    # P@k: mean over all 3 rows (the empty row scores 0 and stays in the mean)
    "P@1": (1 + 0 + 0) / 3,  # 1/3
    "P@3": (2 / 3 + 1 / 3 + 0) / 3,  # 1/3
    "P@5": (3 / 5 + 1 / 5 + 0) / 3,  # 0.26667
    # nDCG@k: DCG with 1/log2(rank + 1), over IDCG of min(k, |y|) hits
    "nDCG@1": (1 / 1 + 0 + 0) / 3,  # 1/3
    # row 0: DCG@3 = 1 + 1/log2(4) = 1.5, IDCG@3 = 1 + 1/log2(3) + 1/2 = 2.13093 -> 0.70392
    # row 1: DCG@3 = 1/log2(3) = 0.63093, IDCG@1 = 1 -> 0.63093;  mean 0.44495
    "nDCG@3": ((1 + 1 / L2(4)) / (1 + 1 / L2(3) + 1 / L2(4)) + 1 / L2(3)) / 3,
    # row 0: DCG@5 = 1.5 + 1/log2(6) = 1.88685, IDCG@3 = 2.13093 -> 0.88546;  mean 0.50546
    "nDCG@5": ((1 + 1 / L2(4) + 1 / L2(6)) / (1 + 1 / L2(3) + 1 / L2(4)) + 1 / L2(3)) / 3,
    # PSP@k = sum of w over hits / sum over rows of the best top-k weights among true labels.
    # k=1: hits: row 0 label 2 (w 3); best: row 0 max{1, 3, 4} = 4, row 1 {2} = 2 -> 3 / 6
    "PSP@1": 3 / 6,
    # k=3: hits: row 0 labels 2, 0 (3 + 1), row 1 label 1 (2) = 6; best: (4 + 3 + 1) + 2 = 10
    "PSP@3": 6 / 10,
    # k=5: hits: row 0 labels 2, 0, 3 (3 + 1 + 4), row 1 label 1 (2) = 10; best 10
    "PSP@5": 10 / 10,
}
assert abs(EXPECTED_HAND["nDCG@3"] - 0.4449493) < 1e-6 and abs(EXPECTED_HAND["nDCG@5"] - 0.5054632) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hand_worked_example(k):
    assert metrics.precision_at_k(TOP_HAND, Y_HAND, k) == pytest.approx(EXPECTED_HAND[f"P@{k}"], abs=1e-12)
    assert metrics.ndcg_at_k(TOP_HAND, Y_HAND, k) == pytest.approx(EXPECTED_HAND[f"nDCG@{k}"], abs=1e-12)
    assert metrics.psprecision_at_k(TOP_HAND, Y_HAND, W_HAND, k) == pytest.approx(EXPECTED_HAND[f"PSP@{k}"], abs=1e-12)


def test_evaluate_matches_hand_example_and_single_metrics():
    got = metrics.evaluate(TOP_HAND, Y_HAND, W_HAND)
    assert set(got) == set(EXPECTED_HAND)
    for key, value in EXPECTED_HAND.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert set(metrics.evaluate(TOP_HAND, Y_HAND, ks=(2,))) == {"P@2", "nDCG@2"}
    assert metrics.evaluate(TOP_HAND, Y_HAND, ks=(2,))["P@2"] == pytest.approx((1 / 2 + 1 / 2) / 3)


def test_empty_rows_count_for_precision_but_drop_out_of_psp():
    # dropping the empty row 2: P@k and nDCG@k are means over 2 rows instead of 3, PSP unchanged
    top, Y = TOP_HAND[:2], Y_HAND[:2]
    for k in (1, 3, 5):
        assert metrics.precision_at_k(top, Y, k) == pytest.approx(EXPECTED_HAND[f"P@{k}"] * 3 / 2)
        assert metrics.ndcg_at_k(top, Y, k) == pytest.approx(EXPECTED_HAND[f"nDCG@{k}"] * 3 / 2)
        assert metrics.psprecision_at_k(top, Y, W_HAND, k) == pytest.approx(EXPECTED_HAND[f"PSP@{k}"])
    # only empty rows: P and nDCG are 0, PSP undefined
    empty = sp.csr_matrix((2, 6), dtype=np.float32)
    assert metrics.precision_at_k(TOP_HAND[:2], empty, 3) == 0.0
    assert metrics.ndcg_at_k(TOP_HAND[:2], empty, 3) == 0.0
    assert math.isnan(metrics.psprecision_at_k(TOP_HAND[:2], empty, W_HAND, 3))


# --------------------------------------------------------------------------- brute force on random data


def _random_case(seed: int, n: int = 300, num_labels: int = 40, width: int = 7):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        size = rng.choice([0, 1, 2, 3, 6, 12], p=[0.1, 0.3, 0.2, 0.2, 0.1, 0.1])
        rows.append(sorted(rng.choice(num_labels, size, replace=False).tolist()))
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    Y = sp.csr_matrix((np.ones(indptr[-1], np.float32), np.concatenate([np.array(r, int) for r in rows] + [[]]).astype(int), indptr),
                      shape=(n, num_labels))
    # predictions biased towards the true labels, distinct within a row
    scores = rng.random((n, num_labels)) + 0.6 * Y.toarray()
    top = np.argsort(-scores, axis=1)[:, :width]
    w = 1.0 + 3.0 * rng.random(num_labels)
    return top, Y, rows, w


def _brute(top, rows, w, k):
    p, ndcg, gained, best = [], [], 0.0, 0.0
    for pred, true in zip(top, rows):
        true = set(true)
        hits = [int(label) in true for label in pred[:k]]
        p.append(sum(hits) / k)
        dcg = sum(1.0 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(true))))
        ndcg.append(dcg / idcg if idcg > 0 else 0.0)
        gained += sum(w[label] for label, h in zip(pred[:k], hits) if h)
        best += sum(sorted((w[label] for label in true), reverse=True)[:k])
    return float(np.mean(p)), float(np.mean(ndcg)), gained / best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_against_brute_force(seed, k):
    top, Y, rows, w = _random_case(seed)
    p, ndcg, psp = _brute(top, rows, w, k)
    assert metrics.precision_at_k(top, Y, k) == pytest.approx(p, abs=1e-12)
    assert metrics.ndcg_at_k(top, Y, k) == pytest.approx(ndcg, abs=1e-12)
    assert metrics.psprecision_at_k(top, Y, w, k) == pytest.approx(psp, abs=1e-12)
    got = metrics.evaluate(top, Y, w, ks=(k,))
    assert got == pytest.approx({f"P@{k}": p, f"nDCG@{k}": ndcg, f"PSP@{k}": psp}, abs=1e-12)


def test_inputs_torch_and_dtypes():
    top, Y, rows, w = _random_case(3)
    expected = metrics.evaluate(top, Y, w)
    for variant in (torch.from_numpy(top), torch.from_numpy(top).to(torch.int32), top.astype(np.int32)):
        assert metrics.evaluate(variant, Y, w) == pytest.approx(expected, abs=1e-12)
    assert metrics.evaluate(top, Y.tocsc(), torch.from_numpy(w).tolist()) == pytest.approx(expected, abs=1e-12)
    # Y values other than 1 (and explicit zeros, and duplicates) are binarized
    Y2 = Y.copy()
    Y2.data[:] = 7.0
    assert metrics.evaluate(top, Y2, w) == pytest.approx(expected, abs=1e-12)
    # every row's entries stored twice, plus an explicit zero at a predicted non-label of row 0
    non_label = next(int(c) for c in top[0] if c not in rows[0])
    dup_rows = [r + r + ([non_label] if i == 0 else []) for i, r in enumerate(rows)]
    indptr = np.r_[0, np.cumsum([len(r) for r in dup_rows])]
    data = np.ones(indptr[-1])
    data[len(dup_rows[0]) - 1] = 0.0
    Y3 = sp.csr_matrix((data, np.concatenate([np.array(r, int) for r in dup_rows]), indptr), shape=Y.shape)
    assert not Y3.has_canonical_format and 0.0 in Y3.data
    assert metrics.evaluate(top, Y3, w) == pytest.approx(expected, abs=1e-12)


def test_perfect_ranking_scores_one():
    _top, Y, rows, w = _random_case(4, width=12)
    # each row's true labels by weight, then the rest: PSP@k = 1 for every k
    ideal = np.array([sorted(r, key=lambda label: -w[label]) + [c for c in np.argsort(-w) if c not in r][: 12 - len(r)]
                      for r in rows])
    for k in (1, 3, 5):
        assert metrics.psprecision_at_k(ideal, Y, w, k) == pytest.approx(1.0)
        has = np.array([len(r) > 0 for r in rows])
        assert metrics.ndcg_at_k(ideal, Y, k) == pytest.approx(has.mean())
        expected_p = np.mean([min(len(r), k) / k for r in rows])
        assert metrics.precision_at_k(ideal, Y, k) == pytest.approx(expected_p)


def test_negative_indices_are_no_prediction():
    top = TOP_HAND.copy()
    top[0, 0] = -1  # row 0 loses its rank-1 hit (label 2)
    assert metrics.precision_at_k(top, Y_HAND, 1) == 0.0
    assert metrics.precision_at_k(top, Y_HAND, 3) == pytest.approx((1 / 3 + 1 / 3) / 3)
    assert metrics.psprecision_at_k(top, Y_HAND, W_HAND, 3) == pytest.approx((1 + 2) / 10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="fewer than k = 6"):
        metrics.precision_at_k(TOP_HAND, Y_HAND, 6)
    with pytest.raises(ValueError, match="k must be a positive int"):
        metrics.precision_at_k(TOP_HAND, Y_HAND, 0)
    with pytest.raises(ValueError, match="3 rows but Y has 2"):
        metrics.precision_at_k(TOP_HAND, Y_HAND[:2], 1)
    with pytest.raises(ValueError, match="outside"):
        metrics.precision_at_k(TOP_HAND + 2, Y_HAND, 5)
    with pytest.raises(ValueError, match="repeats a label in row 1"):
        metrics.precision_at_k(np.array([[0, 1], [3, 3], [0, 2]]), Y_HAND, 2)
    with pytest.raises(ValueError, match="2-D"):
        metrics.precision_at_k(TOP_HAND[0], Y_HAND, 1)
    with pytest.raises(TypeError, match="integers"):
        metrics.precision_at_k(TOP_HAND.astype(float), Y_HAND, 1)
    with pytest.raises(TypeError, match="scipy.sparse"):
        metrics.precision_at_k(TOP_HAND, Y_HAND.toarray(), 1)
    with pytest.raises(ValueError, match=r"shape \[L\]"):
        metrics.psprecision_at_k(TOP_HAND, Y_HAND, W_HAND[:5], 1)
    for ks in [(-1, 3), (0,), (1.5, 3), (True,)]:  # every k is checked, not only the largest
        with pytest.raises(ValueError, match="ks must hold positive ints"):
            metrics.evaluate(TOP_HAND, Y_HAND, ks=ks)
    # a repeated "no prediction" (-1) is allowed
    assert metrics.precision_at_k(np.array([[-1, -1], [1, -1], [-1, -1]]), Y_HAND, 2) == pytest.approx(0.5 / 3)


# --------------------------------------------------------------------------- inverse propensities


def test_inverse_propensity_formula():
    # 10 training points; label counts N_l = [0, 1, 4, 10] (duplicates within a row count once)
    counts = [0, 1, 4, 10]
    rows, cols = [], []
    for label, c in enumerate(counts):
        rows += list(range(c))
        cols += [label] * c
    rows.append(0)
    cols.append(2)  # a duplicate entry of (0, 2)
    Y = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(10, 4))
    for A, B in ((0.6, 2.6), (0.55, 1.5)):
        w = metrics.inverse_propensity(Y, A, B)
        C = (math.log(10) - 1) * (B + 1) ** A
        assert w.shape == (4,) and w.dtype == np.float64
        np.testing.assert_allclose(w, [1 + C * (c + B) ** -A for c in counts], rtol=1e-14)
    # by hand for A = 0.6, B = 2.6, N_l = 0: C = (ln 10 - 1) * 3.6^0.6 = 1.302585 * 2.156659 = 2.809232,
    # w = 1 + 2.809232 * 2.6^-0.6 = 1 + 2.809232 * 0.563658 = 2.583447
    assert metrics.inverse_propensity(Y, 0.6, 2.6)[0] == pytest.approx(2.583447, abs=2e-6)
    # rarer labels weigh more
    assert np.all(np.diff(metrics.inverse_propensity(Y, 0.6, 2.6)) < 0)
