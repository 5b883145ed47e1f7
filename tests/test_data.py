"""Tests of ``kdfast.data``: the XMLRepo reader and writer, tf-idf / L2, the synthetic generator.

The reader is checked on handmade files (every quirk of the format and every error it must
name), and by round trips through ``write_xmlrepo``. The generator is checked against the
statistics it promises (DESIGN section 4), for determinism and caching, and for features that
actually predict the labels (a nearest-centroid classifier far above the popularity baseline).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import scipy.sparse as sp

import kdfast.data as kd
from kdfast import metrics

# --------------------------------------------------------------------------- reader: handmade files


def _write(tmp_path, text: str, name: str = "data.txt", newline: str = "\n") -> str:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode())
    return str(path)


# header N=5 D=6 L=4: a labeled point, an unlabeled one (leading blank), labels without features,
# a point with neither (a lone blank), and trailing blanks / tabs / an unsorted, repeated feature
HANDMADE = (
    "5 6 4\n"
    "0,2 1:0.5 3:1.25\n"
    " 0:2 5:1e-3\n"
    "3\n"
    " \n"
    "1,1,0 5:-2.5\t4:0.125 4:1   \n"
)
X_HANDMADE = np.array(
    [
        [0, 0.5, 0, 1.25, 0, 0],
        [2, 0, 0, 0, 0, 1e-3],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1.125, -2.5],  # feature 4 listed twice: values summed
    ],
    dtype=np.float32,
)
Y_HANDMADE = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=np.float32)


def _check_handmade(X, Y):
    assert isinstance(X, sp.csr_matrix) and isinstance(Y, sp.csr_matrix)
    assert X.dtype == np.float32 and Y.dtype == np.float32
    assert X.shape == (5, 6) and Y.shape == (5, 4)
    assert X.has_sorted_indices and Y.has_sorted_indices
    np.testing.assert_array_equal(X.toarray(), X_HANDMADE)
    np.testing.assert_array_equal(Y.toarray(), Y_HANDMADE)  # label 1 listed twice: counted once
    assert np.all(Y.data == 1)


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_reader_handmade(tmp_path, newline):
    _check_handmade(*kd.read_xmlrepo(_write(tmp_path, HANDMADE, newline=newline)))


def test_reader_without_final_newline_and_pathlike(tmp_path):
    path = _write(tmp_path, HANDMADE.rstrip("\n"))
    _check_handmade(*kd.read_xmlrepo(path))
    _check_handmade(*kd.read_xmlrepo(tmp_path / "data.txt"))


def test_reader_empty_and_blank_trailing_lines(tmp_path):
    X, Y = kd.read_xmlrepo(_write(tmp_path, "0 3 2\n"))
    assert X.shape == (0, 3) and Y.shape == (0, 2) and X.nnz == 0 and Y.nnz == 0
    X, Y = kd.read_xmlrepo(_write(tmp_path, "1 3 2\n1 2:1\n\n\n"))
    np.testing.assert_array_equal(X.toarray(), [[0, 0, 1]])
    np.testing.assert_array_equal(Y.toarray(), [[0, 1]])


# (file content, expected line, message regex, token) for malformed files
BAD_FILES = {
    "bad_label": ("2 6 4\n0,1 1:0.5\na,1 2:1\n", 3, "expected a label id", "a,1"),
    "empty_label": ("2 6 4\n0, 1:0.5\n1 2:1\n", 2, "expected a label id", "0,"),
    "empty_label_between": ("2 6 4\n1,,2 1:0.5\n1 2:1\n", 2, "expected a label id", "1,,2"),
    "trailing_comma": ("2 6 4\n1,2, 0:1\n1 2:1\n", 2, "expected a label id", "1,2,"),
    "empty_value": ("2 6 4\n1 0: 1:1\n1 2:1\n", 2, "expected a feature value", "0:"),
    "value_nan": ("2 6 4\n1 0:nan\n1 2:1\n", 2, "must be finite", "0:nan"),
    "value_plus_minus": ("2 6 4\n1 0:+-1\n1 2:1\n", 2, "expected a feature value", "0:+-1"),
    "value_plus_alone": ("2 6 4\n1 0:+ 1:1\n1 2:1\n", 2, "expected a feature value", "0:+"),
    "value_inf": ("2 6 4\n1 0:1 2:-inf\n1 2:1\n", 2, "must be finite", "2:-inf"),
    "value_above_float32": ("2 6 4\n1 0:1e50\n1 2:1\n", 2, "out of the float32 range", "0:1e50"),
    "value_above_float64": ("2 6 4\n1 0:1e999\n1 2:1\n", 2, "out of the float range", "0:1e999"),
    "label_above_int64": ("2 6 4\n99999999999999999999 0:1\n1 2:1\n", 2, "out of the int64 range",
                          "99999999999999999999"),
    # a "\r" that is not part of "\r\n" used to end the line there, dropping the rest of it
    "carriage_return_in_features": ("2 6 4\n1 0:1\r 2:5\n1 2:1\n", 2, r"carriage return inside the line \(",
                                    ""),
    "carriage_return_after_labels": ("2 6 4\n1\r 2:5\n1 2:1\n", 2, "carriage return inside the line", ""),
    "carriage_return_in_header": ("2 6 4\r 9\n1 2:5\n1 2:1\n", 1, "the header must be 'N D L'", ""),
    # an empty line is a point (no labels, no features): one before the last point is one too many here
    "empty_line_inside": ("2 6 4\n1 2:1\n\n0 1:1\n", 4, "more points than the header's N = 2", "0"),
    "label_separator": ("2 6 4\n0;1 1:0.5\n1 2:1\n", 2, "expected ',' or ' ' after a label", ";1"),
    "feature_without_colon": ("2 6 4\n0 1:0.5\n1 2-1.0\n", 3, "expected 'id:value'", "2-1.0"),
    "feature_bad_value": ("2 6 4\n0 1:0.5 3:abc\n1 2:1\n", 2, "expected a feature value", "3:abc"),
    "feature_bad_id": ("2 6 4\n0 x:0.5\n1 2:1\n", 2, "expected a feature 'id:value'", "x:0.5"),
    "feature_junk_after_value": ("2 6 4\n0 1:0.5x\n1 2:1\n", 2, "expected 'id:value'", "1:0.5x"),
    "feature_id_too_large": ("2 6 4\n0 1:0.5\n1 6:1\n", 3, re.escape("feature 6 outside [0, D = 6)"), "6:1"),
    "feature_id_negative": ("2 6 4\n0 -1:0.5\n1 2:1\n", 2, re.escape("feature -1 outside [0, D = 6)"), "-1:0.5"),
    "label_too_large": ("2 6 4\n0,4 1:0.5\n1 2:1\n", 2, re.escape("label 4 outside [0, L = 4)"), "4"),
    "label_negative": ("2 6 4\n0 1:0.5\n-1 2:1\n", 3, re.escape("label -1 outside [0, L = 4)"), "-1"),
    "more_points_than_header": ("1 6 4\n0 1:0.5\n1 2:1\n", 3, "more points than the header's N = 1", "1"),
    "bad_header": ("2 6\n0 1:0.5\n1 2:1\n", 1, "number of labels L", ""),
    "header_extra": ("2 6 4 9\n0 1:0.5\n1 2:1\n", 1, "the header must be 'N D L'", "9"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_reader_errors_name_file_line_and_token(tmp_path, case):
    text, line, message, token = BAD_FILES[case]
    path = _write(tmp_path, text, name=f"{case}.txt")
    with pytest.raises(ValueError) as info:
        kd.read_xmlrepo(path)
    error = str(info.value)
    assert error.startswith(f"{path}:{line}: "), error
    assert re.search(message, error), error
    if token:
        assert f"(token '{token}')" in error, error
    else:  # no token there: the error says what is there instead
        assert re.search(r"\((at the end of the (line|file)|at a blank|a carriage return inside the line)\)$", error), error


def test_reader_blank_lines_after_the_points_and_tiny_values(tmp_path):
    """Blank lines (spaces, tabs, CRLF) may follow the last point; an empty line before it is a
    point with neither labels nor features; a value below float32's range reads as 0."""
    X, Y = kd.read_xmlrepo(_write(tmp_path, "1 3 2\n1 0:1\n \n\t\n", newline="\r\n"))
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 0]])
    X, Y = kd.read_xmlrepo(_write(tmp_path, "3 3 2\n1 0:1\n\n0 2:1e-50 1:2\n"))
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 0], [0, 0, 0], [0, 2, 0]])
    np.testing.assert_array_equal(Y.toarray(), [[0, 1], [0, 0], [1, 0]])


def test_reader_values_with_a_plus_sign(tmp_path):
    """'+0.5', '+.25' and '+3e-1' read as strtod (and sklearn's reader) reads them."""
    X, _ = kd.read_xmlrepo(_write(tmp_path, "1 4 2\n1 0:+0.5 1:+.25 2:+3e-1 3:+2\n"))
    np.testing.assert_array_equal(X.toarray(), np.array([[0.5, 0.25, 0.3, 2.0]], dtype=np.float32))


def test_reader_header_claiming_more_points_than_the_file_holds(tmp_path):
    path = _write(tmp_path, "4000000000000 3 2\n0 0:1\n")  # used to reserve memory for all of them
    with pytest.raises(ValueError, match=re.escape(f"{path}: the header says N = 4000000000000 points but the file has 1")):
        kd.read_xmlrepo(path)


def test_reader_directory(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: is a directory, not a file")):
        kd.read_xmlrepo(tmp_path)


def test_reader_fewer_points_than_header(tmp_path):
    path = _write(tmp_path, "3 6 4\n0 1:0.5\n1 2:1\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: the header says N = 3 points but the file has 2")):
        kd.read_xmlrepo(path)


def test_reader_missing_file(tmp_path):
    path = str(tmp_path / "absent.txt")
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot open the file")):
        kd.read_xmlrepo(path)


# --------------------------------------------------------------------------- writer: round trips


def _random_xy(seed: int, n: int = 200, d: int = 50, num_labels: int = 30):
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=0.1, format="csr", dtype=np.float64, random_state=rng)
    X.data = (rng.standard_normal(X.nnz) * 10.0 ** rng.integers(-8, 8, X.nnz)).astype(np.float32)
    X = X.astype(np.float32)
    Y = sp.random(n, num_labels, density=0.08, format="csr", random_state=rng)
    Y.data[:] = 1
    X = sp.diags((np.arange(n) % 7 != 0).astype(np.float32)) @ X  # rows without features (some also without labels)
    X.eliminate_zeros()
    return X, Y.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_write_read_round_trip(tmp_path, seed):
    X, Y = _random_xy(seed)
    assert (np.diff(Y.indptr) == 0).any() and (np.diff(X.indptr) == 0).any()
    path = tmp_path / "round.txt"
    kd.write_xmlrepo(path, X, Y)
    X2, Y2 = kd.read_xmlrepo(path)
    assert X2.shape == X.shape and Y2.shape == Y.shape
    np.testing.assert_array_equal(X2.toarray(), X.toarray())  # float32 values exact
    np.testing.assert_array_equal(Y2.toarray(), Y.toarray())
    # unlabeled rows start with a blank; a row with neither is a lone blank
    lines = path.read_text().split("\n")
    assert lines[0] == f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}"
    for i, line in enumerate(lines[1:-1]):
        assert line.startswith(" ") == (Y[i].nnz == 0)


def test_write_read_round_trip_synthetic(tmp_path):
    X, Y, _X_test, _Y_test = kd.scaled_preset("amazon670k", "tiny").generate(seed=3)
    kd.write_xmlrepo(tmp_path / "train.txt", X, Y)
    X2, Y2 = kd.read_xmlrepo(tmp_path / "train.txt")
    assert (X2 != X).nnz == 0 and (Y2 != Y).nnz == 0


def test_write_rejects_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="X has 3 rows but Y has 2"):
        kd.write_xmlrepo(tmp_path / "x.txt", sp.csr_matrix((3, 4)), sp.csr_matrix((2, 5)))


# --------------------------------------------------------------------------- tf-idf and L2


def _row_norms(X):
    return np.sqrt(np.asarray(X.multiply(X).sum(axis=1), dtype=np.float64).ravel())


def test_l2_normalize():
    X = sp.csr_matrix(np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, -2.0, 0.0]]))
    before = X.copy()
    Z = kd.l2_normalize(X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z.toarray(), [[0.6, 0.8, 0.0], [0, 0, 0], [0, -1, 0]], rtol=1e-7)
    assert (X != before).nnz == 0  # input untouched


def test_tfidf_by_hand():
    # 4 training documents over 3 words; document frequencies df = [3, 1, 0]
    X_train = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    X_test = sp.csr_matrix(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # smoothed idf = ln((1 + 4) / (1 + df)) + 1 = [ln(5/4) + 1, ln(5/2) + 1, ln(5) + 1]
    idf = np.array([math.log(5 / 4) + 1, math.log(5 / 2) + 1, math.log(5) + 1])
    np.testing.assert_allclose(kd.idf_weights(X_train), idf, rtol=1e-6)
    T_train, T_test = kd.tfidf(X_train, X_test)
    row0 = np.array([1.0, 2.0, 0.0]) * idf
    np.testing.assert_allclose(T_train.toarray()[0], row0 / np.linalg.norm(row0), rtol=1e-6)
    np.testing.assert_allclose(T_test.toarray()[0], idf / np.linalg.norm(idf), rtol=1e-6)
    np.testing.assert_allclose(_row_norms(T_train), [1, 1, 1, 0], rtol=1e-6)  # empty row stays zero
    np.testing.assert_allclose(_row_norms(T_test), [1, 0], rtol=1e-6)
    (U,) = kd.tfidf(X_train, normalize=False)
    np.testing.assert_allclose(U.toarray()[0], row0, rtol=1e-6)
    (S,) = kd.tfidf(X_train, sublinear_tf=True, normalize=False)
    np.testing.assert_allclose(S.toarray()[2], [(1 + math.log(3)) * idf[0], 0, 0], rtol=1e-6)


def test_tfidf_idf_fitted_on_train_only():
    X_train, _ = _random_xy(5)
    X_test, _ = _random_xy(6)
    T_train, T_test = kd.tfidf(X_train, X_test)
    (T_train_alone,) = kd.tfidf(X_train)
    assert (T_train != T_train_alone).nnz == 0  # the test matrix does not move the idf
    weighting = kd.TfIdf.fit(X_train)
    assert (weighting.transform(X_test) != T_test).nnz == 0
    # a row's weights do not depend on the other rows of its matrix
    assert (weighting.transform(X_test[:10]) != T_test[:10]).nnz == 0
    norms = _row_norms(T_test)
    nonempty = np.diff(X_test.indptr) > 0
    np.testing.assert_allclose(norms[nonempty], 1.0, rtol=1e-6)
    assert np.all(norms[~nonempty] == 0)
    with pytest.raises(ValueError, match="features but the idf was fitted on"):
        weighting.transform(sp.csr_matrix((2, 7)))


# --------------------------------------------------------------------------- synthetic generator


@pytest.fixture(scope="module")
def medium():
    # about 4 train points per label, as Amazon-670K (490,449 * 5.45 / 670,091 = 3.99)
    return kd.synthetic_xmc(20_000, 20_000, 27_000, seed=0)


def test_synthetic_statistics(medium):
    X_train, Y_train, X_test, Y_test = medium
    assert X_train.shape == (20_000, 20_000) and Y_train.shape == (20_000, 27_000)
    assert X_test.shape == (round(20_000 * 153_025 / 490_449), 20_000) and Y_test.shape[1] == 27_000
    for X, Y in ((X_train, Y_train), (X_test, Y_test)):
        assert X.dtype == np.float32 and Y.dtype == np.float32 and np.all(Y.data == 1)
        assert X.has_canonical_format and Y.has_canonical_format
        labels, features = np.diff(Y.indptr), np.diff(X.indptr)
        assert labels.min() >= 1
        assert labels.mean() == pytest.approx(5.45, abs=0.08)
        assert labels.std() == pytest.approx(math.sqrt(5.45), rel=0.15)  # ~Poisson
        assert features.min() >= 1
        assert features.mean() == pytest.approx(75.0, abs=1.5)
        np.testing.assert_allclose(_row_norms(X), 1.0, rtol=1e-5)  # tf-idf + L2
        assert np.all(X.data > 0)
    stats = kd.dataset_stats(X_train, Y_train)
    assert stats["points_per_label"] == pytest.approx(20_000 * 5.45 / 27_000, rel=0.03)
    # power law: most labels rare, a few frequent; log-log slope of the sorted frequencies
    assert stats["labels_under_5_points"] / 27_000 > 0.6
    assert stats["top_label_points"] > 50 * stats["points_per_label"]
    assert -0.8 < kd.zipf_slope(Y_train) < -0.35
    for key in ("20,000 train", "27,000 labels", "labels/point", "features/point", "seed 0"):
        assert key in medium.description


def test_synthetic_zipf_exponent_steepens():
    flat = kd.synthetic_xmc(5_000, 5_000, 5_000, zipf_exponent=0.4, num_test_points=0, seed=1)
    steep = kd.synthetic_xmc(5_000, 5_000, 5_000, zipf_exponent=1.0, num_test_points=0, seed=1)
    assert kd.zipf_slope(steep.Y_train) < kd.zipf_slope(flat.Y_train) - 0.25
    assert flat.X_test.shape == (0, 5_000) and flat.Y_test.shape == (0, 5_000)


def test_synthetic_labels_co_occur(medium):
    # co-occurring label clusters: far more label pairs recur than if the same label occurrences
    # were spread over the points at random (marginals and row sizes kept)
    Y = medium.Y_train[:, :]
    rng = np.random.default_rng(0)
    shuffled = sp.csr_matrix((Y.data, rng.permutation(Y.indices), Y.indptr), shape=Y.shape)
    shuffled.sum_duplicates()
    shuffled.data[:] = 1

    def recurring_pairs(M):
        C = sp.triu(M.T @ M, k=1).tocsr()
        return int((C.data >= 2).sum())

    assert recurring_pairs(Y) > 3 * recurring_pairs(shuffled)


def test_synthetic_features_predict_labels():
    data = kd.scaled_preset("amazon670k", "tiny").generate(seed=0)
    X_train, Y_train, X_test, Y_test = data
    centroids = kd.l2_normalize(Y_train.T @ X_train)  # one tf-idf centroid per label
    scores = (X_test @ centroids.T).toarray()
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    popular = np.argsort(-np.asarray(Y_train.sum(axis=0)).ravel(), kind="stable")[:5]
    baseline = np.tile(popular, (X_test.shape[0], 1))
    w = metrics.inverse_propensity(Y_train, 0.6, 2.6)
    model, chance = metrics.evaluate(top, Y_test, w), metrics.evaluate(baseline, Y_test, w)
    assert model["P@1"] > 0.3 and model["P@1"] > 5 * chance["P@1"], (model, chance)
    assert model["P@5"] > 5 * chance["P@5"] and model["PSP@5"] > 5 * chance["PSP@5"], (model, chance)


def test_synthetic_deterministic(monkeypatch):
    monkeypatch.setattr(kd.synthetic, "_CHUNK_ROWS", 128)  # several chunks, drawn by 1 or 2 threads
    kwargs = {"num_test_points": 300, "seed": 7}
    a = kd.synthetic_xmc(1_000, 3_000, 2_000, threads=1, **kwargs)
    b = kd.synthetic_xmc(1_000, 3_000, 2_000, threads=2, **kwargs)
    c = kd.synthetic_xmc(1_000, 3_000, 2_000, num_test_points=300, seed=8)
    for m_a, m_b, m_c in zip(a, b, c):
        assert (m_a != m_b).nnz == 0 and m_a.dtype == m_b.dtype
        assert (m_a != m_c).nnz > 0


def test_synthetic_cache(tmp_path):
    kwargs = {"num_test_points": 200, "seed": 2, "cache_dir": tmp_path}
    first = kd.synthetic_xmc(800, 2_000, 1_000, **kwargs)
    assert not first.from_cache and os.path.exists(first.cache_path) and "cached at" in first.description
    second = kd.synthetic_xmc(800, 2_000, 1_000, **kwargs)
    assert second.from_cache and second.cache_path == first.cache_path
    assert "loaded from the cache" in second.description
    for m1, m2 in zip(first, second):
        assert type(m2) is sp.csr_matrix and m1.shape == m2.shape and m1.dtype == m2.dtype
        np.testing.assert_array_equal(m1.indptr, m2.indptr)
        np.testing.assert_array_equal(m1.indices, m2.indices)
        np.testing.assert_array_equal(m1.data, m2.data)
    # every parameter is part of the key
    other = kd.synthetic_xmc(800, 2_000, 1_000, labels_per_point=3.0, **kwargs)
    assert not other.from_cache and other.cache_path != first.cache_path
    assert len(os.listdir(tmp_path)) == 2


def test_synthetic_rejects_bad_parameters():
    with pytest.raises(ValueError, match="labels_per_point"):
        kd.synthetic_xmc(10, 10, 10, labels_per_point=0.5)
    with pytest.raises(ValueError, match="shares"):
        kd.synthetic_xmc(10, 10, 10, label_word_share=0.7, cluster_word_share=0.5)


# --------------------------------------------------------------------------- presets


def test_presets_hold_the_real_statistics():
    a, c = kd.PRESETS["amazon670k"], kd.PRESETS["amazoncat13k"]
    assert (a.num_features, a.num_labels, a.num_train, a.num_test) == (135_909, 670_091, 490_449, 153_025)
    assert (a.labels_per_point, a.propensity_a, a.propensity_b) == (5.45, 0.6, 2.6)
    assert (c.num_features, c.num_labels, c.num_train, c.num_test) == (203_882, 13_330, 1_186_239, 306_782)
    assert (c.labels_per_point, c.propensity_a, c.propensity_b) == (5.04, 0.55, 1.5)
    assert a.num_train * a.labels_per_point / a.num_labels == pytest.approx(3.99, abs=0.01)


@pytest.mark.parametrize("name", ["amazon670k", "amazoncat13k"])
def test_scaled_presets(name):
    real = kd.PRESETS[name]
    full = kd.scaled_preset(name, "full")
    assert (full.num_train, full.num_labels, full.num_features) == (real.num_train, real.num_labels, real.num_features)
    tiny, cpu = kd.scaled_preset(name, "tiny"), kd.scaled_preset(name, "cpu")
    assert tiny.num_train <= 2_000 and tiny.num_labels <= 3_000
    assert 20_000 <= cpu.num_train <= 60_000 and cpu.num_labels <= 50_000
    for p in (tiny, cpu):
        assert p.labels_per_point == real.labels_per_point and p.scale in p.describe()
        assert ("reduced" in p.note) == (p.num_labels < real.num_labels)
        assert f"{real.num_labels:,}" in p.note
    data = tiny.generate(seed=0)
    assert data.X_train.shape == (tiny.num_train, tiny.num_features)
    assert data.Y_test.shape == (tiny.num_test, tiny.num_labels)
    assert name in data.description and tiny.note in data.description
    with pytest.raises(ValueError, match="unknown scale"):
        kd.scaled_preset(name, "huge")
    with pytest.raises(ValueError, match="unknown preset"):
        kd.scaled_preset("eurlex", "tiny")
