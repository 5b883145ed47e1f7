"""experiments/paper_math.py against independent references (numpy, scipy, scikit-learn)."""

from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import paper_math as pm


def random_features(n: int, m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    return pm.relu_features(x, pm.relu_directions(6, m, sigma=0.7, rng=rng))


# --------------------------------------------------------------------------- random ReLU features


def test_relu_directions_scale_and_nesting():
    rng = np.random.default_rng(1)
    v = pm.relu_directions(50, 4000, sigma=5.0, rng=rng)
    assert v.shape == (50, 4000)
    assert abs(v.std() - 0.2) < 0.005  # N(0, I / sigma^2): standard deviation 1 / sigma
    x = np.random.default_rng(2).standard_normal((7, 50))
    feats = pm.relu_features(x, v)
    np.testing.assert_array_equal(feats, np.maximum(x @ v, 0))
    np.testing.assert_allclose(pm.relu_features(x, v[:, :10]), feats[:, :10], rtol=1e-12)  # nested in m
    with pytest.raises(ValueError, match="sigma"):
        pm.relu_directions(3, 4, sigma=0.0, rng=rng)
    with pytest.raises(ValueError, match="directions"):
        pm.relu_features(x, v[:10])


# --------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("n, m", [(30, 8), (8, 30), (20, 20)])
def test_ridge_primal_and_dual_match_lstsq(n, m):
    feats = random_features(n, m)
    y = np.random.default_rng(3).standard_normal(n)
    lam = 0.3
    # reference: ||F a - y||^2 + lam ||a||^2 is least squares on [F; sqrt(lam) I] a ~ [y; 0]
    stacked = np.vstack([feats, math.sqrt(lam) * np.eye(m)])
    ref = np.linalg.lstsq(stacked, np.concatenate([y, np.zeros(m)]), rcond=None)[0]
    np.testing.assert_allclose(pm.ridge_primal(feats, y, lam), ref, rtol=1e-8, atol=1e-10)
    dual = feats.T @ pm.ridge_dual(feats @ feats.T, y, lam)
    np.testing.assert_allclose(dual, ref, rtol=1e-8, atol=1e-10)
    for form in ("auto", "primal", "dual"):
        np.testing.assert_allclose(pm.ridge_solve(feats, y, lam, form=form), ref, rtol=1e-8, atol=1e-10)


def test_ridge_multi_output_and_solve_reference():
    feats = random_features(12, 40, seed=4)
    y = np.random.default_rng(5).standard_normal((12, 3))
    lam = 1e-2
    ref = np.linalg.solve(feats.T @ feats + lam * np.eye(40), feats.T @ y)
    np.testing.assert_allclose(pm.ridge_solve(feats, y, lam), ref, rtol=1e-6, atol=1e-8)


def test_ridge_small_lambda_interpolates_when_overparameterized():
    feats = random_features(10, 200, seed=6)
    y = np.sign(np.random.default_rng(7).standard_normal(10))
    a = pm.ridge_solve(feats, y, 1e-8)
    np.testing.assert_allclose(feats @ a, y, atol=1e-5)  # m > n: fits the training targets


def test_ridge_rejects_bad_arguments():
    feats = random_features(5, 3)
    with pytest.raises(ValueError, match="lam"):
        pm.ridge_primal(feats, np.zeros(5), 0.0)
    with pytest.raises(ValueError, match="targets"):
        pm.ridge_primal(feats, np.zeros(4), 1.0)
    with pytest.raises(ValueError, match="form"):
        pm.ridge_solve(feats, np.zeros(5), 1.0, form="svd")
    with pytest.raises(ValueError, match="kernel"):
        pm.ridge_dual(np.zeros((3, 4)), np.zeros(3), 1.0)


# --------------------------------------------------------------------------- logistic regression


def logistic_objective(feats, q, lam, a):
    f = feats @ a
    return np.sum(np.logaddexp(0, f) - q * f) + lam * a @ a


@pytest.mark.parametrize("n, m", [(40, 6), (15, 60)])
def test_logistic_matches_sklearn(n, m):
    from sklearn.linear_model import LogisticRegression

    feats = random_features(n, m, seed=8)
    y = (np.random.default_rng(9).random(n) < expit(feats @ np.random.default_rng(10).standard_normal(m))).astype(float)
    y[:2] = [0, 1]
    lam = 0.05
    # sklearn minimizes ||w||^2 / 2 + C sum CE: the same as sum CE + lam ||w||^2 at C = 1 / (2 lam)
    ref = LogisticRegression(C=1 / (2 * lam), fit_intercept=False, tol=1e-12, max_iter=10_000).fit(feats, y).coef_[0]
    for form in ("primal", "dual", "auto"):
        a = pm.logistic_newton(feats, y, lam, form=form)
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-6)
        assert logistic_objective(feats, y, lam, a) <= logistic_objective(feats, y, lam, ref) + 1e-9


def test_logistic_primal_and_dual_agree_on_separable_soft_and_hard_labels():
    feats = random_features(20, 80, seed=11)  # m > n: separable, the penalty alone keeps a finite
    rng = np.random.default_rng(12)
    for q in (rng.integers(0, 2, 20).astype(float), rng.random(20)):
        primal = pm.logistic_newton(feats, q, 1e-3, form="primal")
        dual = pm.logistic_newton(feats, q, 1e-3, form="dual")
        np.testing.assert_allclose(dual, primal, rtol=1e-5, atol=1e-6)
        # stationarity of sum CE + lam ||a||^2
        grad = feats.T @ (expit(feats @ primal) - q) + 2e-3 * primal
        assert np.max(np.abs(grad)) < 1e-6


def test_logistic_rejects_bad_labels():
    feats = random_features(5, 3)
    with pytest.raises(ValueError, match="q"):
        pm.logistic_primal(feats, np.full(5, 1.5), 1.0)
    with pytest.raises(ValueError, match="q"):
        pm.logistic_dual(feats @ feats.T, np.zeros(4), 1.0)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_fit_logistic_kdfast_matches_newton(kind):
    rng = np.random.default_rng(13)
    T, n, d, l2 = 3, 40, 4, 0.05
    x = rng.standard_normal((T, n, d))
    p = expit(x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3)
    target = p if kind == "soft" else (rng.random((T, n)) < p).astype(float)
    w, b = pm.fit_logistic_kdfast(x, l2=l2, **{kind: target})
    for t in range(T):
        # the same problem as logistic_primal on [x, 1] with the bias unpenalized: check stationarity
        z = x[t] @ w[t].numpy() + float(b[t])
        resid = expit(z) - target[t]
        grad_w = x[t].T @ resid / n + l2 * w[t].numpy()
        assert np.max(np.abs(grad_w)) < 1e-5 and abs(resid.mean()) < 1e-5
    # one problem alone gives the same answer as in the batch
    w0, _b0 = pm.fit_logistic_kdfast(x[0], l2=l2, **{kind: target[0]})
    np.testing.assert_allclose(w0.numpy(), w[0].numpy(), atol=1e-4)
    # against the Newton solver without intercept (mean CE + l2/2 ||w||^2 = (sum CE + lam ||w||^2) / n)
    w_ni, _ = pm.fit_logistic_kdfast(x[1], l2=l2, intercept=False, **{kind: target[1]})
    ref = pm.logistic_primal(x[1], target[1], lam=l2 * n / 2)
    np.testing.assert_allclose(w_ni.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_fit_logistic_kdfast_rejects_bad_arguments():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="exactly one"):
        pm.fit_logistic_kdfast(x, l2=1.0)
    with pytest.raises(ValueError, match="hard"):
        pm.fit_logistic_kdfast(x, hard=np.full(4, 0.5), l2=1.0)
    with pytest.raises(ValueError, match="l2"):
        pm.fit_logistic_kdfast(x, soft=np.full(4, 0.5), l2=0.0)


# --------------------------------------------------------------------------- transforms


def test_temperature_transform():
    p = np.array([0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0])
    np.testing.assert_allclose(pm.temperature_transform(p, 1.0), p, atol=1e-15)  # alpha = 1: identity
    np.testing.assert_array_equal(pm.temperature_transform(p, math.inf), [0, 0, 0, 0.5, 1, 1, 1])  # hard threshold
    direct = p**2 / (p**2 + (1 - p) ** 2)  # the paper's formula
    np.testing.assert_allclose(pm.temperature_transform(p, 2.0), direct, atol=1e-15)
    # larger alpha moves every probability away from 1/2, towards the threshold, keeping the side
    inner = np.linspace(0.01, 0.99, 99)
    t5, t50 = pm.temperature_transform(inner, 5.0), pm.temperature_transform(inner, 50.0)
    assert np.all(np.abs(t50 - 0.5) >= np.abs(t5 - 0.5) - 1e-12)
    assert np.all(np.sign(t5 - 0.5) == np.sign(inner - 0.5))
    with pytest.raises(ValueError, match="alpha"):
        pm.temperature_transform(p, 0.0)
    with pytest.raises(ValueError, match="p must"):
        pm.temperature_transform(np.array([1.2]), 2.0)


def test_calibration_distortion():
    u = np.linspace(0, 1, 101)
    np.testing.assert_allclose(pm.calibration_distortion(u, 1.0), u, atol=1e-15)  # identity at alpha = 1
    for alpha in (2.0, 8.0):
        psi = pm.calibration_distortion(u, alpha)
        assert psi.min() >= 0 and psi.max() <= 1 and psi[0] == 0 and psi[-1] == 1
        assert np.all(np.diff(psi) >= 0)  # monotone: ranks and decisions are kept
        np.testing.assert_array_equal(psi > 0.5, u > 0.5)
        np.testing.assert_allclose(psi[u < 0.5], 0.5 * (2 * u[u < 0.5]) ** alpha)
        np.testing.assert_allclose(psi[u > 0.5], 0.5 + 0.5 * (2 * u[u > 0.5] - 1) ** (1 / alpha))
    assert np.mean(np.abs(pm.calibration_distortion(u, 8.0) - u)) > np.mean(np.abs(pm.calibration_distortion(u, 2.0) - u))
    with pytest.raises(ValueError, match="alpha"):
        pm.calibration_distortion(u, 0.5)


# --------------------------------------------------------------------------- metrics and files


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(14)
    labels = rng.integers(0, 2, (4, 300))
    scores = np.round(rng.standard_normal((4, 300)) + labels, 1)  # rounding makes ties
    ours = pm.roc_auc(scores, labels)
    np.testing.assert_allclose(ours, [roc_auc_score(labels[t], scores[t]) for t in range(4)], rtol=1e-12)
    assert pm.roc_auc(scores[0], labels[0]) == pytest.approx(ours[0])
    shared = pm.roc_auc(scores, labels[0])  # one label vector for every row
    np.testing.assert_allclose(shared, [roc_auc_score(labels[0], scores[t]) for t in range(4)], rtol=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        pm.roc_auc(np.arange(3.0), np.ones(3))


def test_mean_entropy():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert pm.mean_entropy(probs) == pytest.approx(math.log(2) / 2)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    images = np.random.default_rng(15).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for name, arr, ndim in (("train-images-idx3-ubyte", images, 3), ("train-labels-idx1-ubyte", labels, 1)):
        blob = bytes([0, 0, 0x08, ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (tmp_path / name).write_bytes(blob)
    got_images, got_labels = pm.load_idx_pair(tmp_path, "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    # big-endian float32 payloads are decoded
    floats = np.array([1.5, -2.0], dtype=">f4")
    (tmp_path / "f.idx").write_bytes(bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, "big") + floats.tobytes())
    np.testing.assert_array_equal(pm.read_idx(tmp_path / "f.idx"), [1.5, -2.0])
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        pm.read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        pm.load_idx_pair(tmp_path, "test")


def test_ridge_sweep_matches_direct_solves():
    feats = random_features(25, 90, seed=16)
    evals = [random_features(7, 90, seed=17), random_features(3, 90, seed=18)]
    y = np.random.default_rng(19).standard_normal((25, 2))
    ms = [1, 5, 25, 26, 40, 90]  # primal, at the threshold, and dual fits
    preds = pm.ridge_sweep(feats, y, evals, 1e-3, ms)
    for m, per_eval in zip(ms, preds):
        coef = np.linalg.solve(feats[:, :m].T @ feats[:, :m] + 1e-3 * np.eye(m), feats[:, :m].T @ y)
        for e, got in zip(evals, per_eval):
            np.testing.assert_allclose(got, e[:, :m] @ coef, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="ms"):
        pm.ridge_sweep(feats, y, evals, 1e-3, [5, 3])


def test_expected_calibration_error_against_a_direct_count():
    rng = np.random.default_rng(20)
    logits = rng.standard_normal((500, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    conf, pred = probs.max(1), probs.argmax(1)
    ref = 0.0
    for lo in np.arange(10) / 10:  # bins (lo, lo + 0.1]
        rows = (conf > lo) & (conf <= lo + 0.1)
        if rows.any():
            ref += rows.mean() * abs((pred[rows] == labels[rows]).mean() - conf[rows].mean())
    assert pm.expected_calibration_error(probs, labels, bins=10) == pytest.approx(ref, abs=1e-12)
    perfect = np.eye(4)[labels]  # confident and right: no calibration error
    assert pm.expected_calibration_error(perfect, labels) == 0.0
