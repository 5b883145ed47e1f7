"""Tests of the teacher-labeling pipeline: ``kdfast.label_dataset``, ``kdfast.LabelStore``,
``python -m kdfast label`` and ``kdfast.models``.

The oracle of a store's contents is :func:`kdfast.reference.teacher_topk` on the full logits of
the teacher's hidden states (float64). Faults are real: a subprocess SIGKILLed mid-run, a
torchrun job with 2 gloo ranks, flipped and truncated shard files. Byte-identity claims are
checked on every file of the store; processes that must agree bit for bit run with one torch
thread (``teacher_topk``'s last bits depend on the thread count, see ``kdfast/labeling.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn
from torch.testing import assert_close

import kdfast
from kdfast import LabelStore, ShardVerificationError, TopK, label_dataset, labeling, reference
from kdfast.__main__ import main as cli_main
from kdfast.labeling import LabelStoreError, load_features
from kdfast.models import SparseLinearClassifier, load_checkpoint, model_fingerprint, save_checkpoint
from kdfast.targets import TOPK_TENSOR_FIELDS

REPO = Path(__file__).resolve().parents[1]
N, D, HIDDEN, V, K = 480, 60, 16, 700, 8
# the store layout most tests use: 5 shards (the last one short), 3-4 batches each
LAYOUT = {"k": K, "temperature": 2.0, "batch_size": 32, "shard_rows": 100}


@contextlib.contextmanager
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_teacher(seed: int = 0, num_features: int = D, num_classes: int = V) -> SparseLinearClassifier:
    torch.manual_seed(seed)
    model = SparseLinearClassifier(num_features, HIDDEN, num_classes)
    with torch.no_grad():  # spread the logits so the top-k has no near-ties
        model.output.weight.mul_(4.0)
        model.output.bias.normal_()
    return model.eval()


def make_csr(seed: int = 0, rows: int = N, cols: int = D) -> sp.csr_matrix:
    X = sp.random(rows, cols, density=0.15, format="csr", random_state=seed, dtype=np.float32)
    X.data[X.indptr[7] : X.indptr[8]] = 0  # a row without features
    X.eliminate_zeros()
    X.sort_indices()
    return X


def label(encoder, weight, features, out, bias=None, **kw):
    args = dict(LAYOUT, progress=False)
    args.update(kw)
    return label_dataset(encoder, weight, features, out, bias=bias, **args)


def label_model(model, features, out, **kw):
    return label(model.encode, model.output.weight, features, out, bias=model.output.bias, **kw)


def read_files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def expected_topk(model, features, k=K, temperature=2.0) -> TopK:
    with torch.no_grad():
        hidden = model.encode(features)
        out = reference.teacher_topk(
            hidden.double(), model.output.weight.double(), model.output.bias.double(), k=k, temperature=temperature
        )
    return TopK(*out)


def assert_store_matches(store: LabelStore, want: TopK) -> None:
    got = store[:]
    assert got.indices.dtype == torch.int64 and got.logits.dtype == torch.float32
    assert torch.equal(got.indices, want.indices)
    for field in ("logits", "lse", "entropy", "covered"):
        assert_close(getattr(got, field).double(), getattr(want, field), rtol=1e-5, atol=2e-5, msg=field)


class CountCalls:
    """Counts the batches label_dataset hands to teacher_topk (monkeypatched in)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._orig = labeling.teacher_topk
        monkeypatch.setattr(labeling, "teacher_topk", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._orig(*args, **kwargs)


def batches_in(rows: int, batch_size: int = LAYOUT["batch_size"]) -> int:
    return -(-rows // batch_size)


PROBE = 1  # label_dataset checks its inputs on one row before it touches out_dir


# ---------------------------------------------------------------------------------------------
# contents against the reference
# ---------------------------------------------------------------------------------------------


def test_dense_pipeline_matches_reference(tmp_path):
    model = make_teacher()
    X = torch.from_numpy(make_csr().toarray())
    store = label_model(model, X, tmp_path / "s")
    want = expected_topk(model, X)
    assert len(store) == N
    assert_store_matches(store, want)
    # files: 5 shards, the last one short; no leftovers
    assert sorted(os.listdir(tmp_path / "s")) == ["manifest.json"] + [f"shard-{i:05d}.npy" for i in range(5)]
    m = store.manifest
    assert m["complete"] and m["rows"] == N and m["k"] == K and m["temperature"] == 2.0
    assert m["dtype"] == "float32" and m["num_classes"] == V and m["hidden_dim"] == HIDDEN
    assert m["kdfast_version"] == kdfast.__version__ and m["shard_rows"] == 100 and m["num_shards"] == 5
    assert [s["rows"] for s in m["shards"]] == [100, 100, 100, 100, 80]
    assert m["feature_fingerprint"]["shape"] == [N, D] and m["feature_fingerprint"]["kind"] == "dense"
    # the shard is a plain structured .npy
    raw = np.load(tmp_path / "s" / "shard-00004.npy")
    assert raw.shape == (80,) and np.array_equal(raw["indices"], want.indices[400:].numpy())
    # summary: from the stored values
    s = store.summary()
    cov = want.covered.numpy()
    assert s["rows"] == N and s["k"] == K
    assert s["mean_covered"] == pytest.approx(cov.mean(), rel=1e-5)
    assert s["p5_covered"] == pytest.approx(np.percentile(cov, 5), rel=1e-5)
    assert s["mean_entropy"] == pytest.approx(want.entropy.mean().item(), rel=1e-5)
    assert s["seconds"] > 0 and s["rows_labelled"] == N
    # a store opened later has the same summary, without this run's time
    later = LabelStore(tmp_path / "s").summary()
    assert later["seconds"] is None and later["mean_covered"] == s["mean_covered"]


def test_csr_pipeline_matches_reference(tmp_path):
    model = make_teacher(seed=1)
    X = make_csr(seed=1)
    store = label_model(model, X, tmp_path / "s", k=1, temperature=1.0, batch_size=50, shard_rows=128)
    want = expected_topk(model, X, k=1, temperature=1.0)
    assert_store_matches(store, want)
    assert store.manifest["feature_fingerprint"]["kind"] == "csr"
    assert store.manifest["feature_fingerprint"]["nnz"] == X.nnz
    # the hard label is column 0; the row without features still gets labels (from the biases)
    assert torch.equal(store[7].indices, want.indices[7])


def test_k_equals_num_classes_covers_all_mass(tmp_path):
    model = make_teacher(num_classes=40)
    X = make_csr()
    store = label_model(model, X, tmp_path / "s", k=40)
    assert_store_matches(store, expected_topk(model, X, k=40))
    assert_close(store[:].covered, torch.ones(N), atol=1e-5, rtol=0)


def test_row_access(tmp_path):
    model = make_teacher()
    X = make_csr()
    store = label_model(model, X, tmp_path / "s")
    full = store[:]
    one = store[250]
    assert one.temperature == store[[1, 2]].temperature == store.temperature
    assert one.indices.shape == (K,) and one.lse.shape == ()
    assert torch.equal(one.indices, full.indices[250]) and torch.equal(store[-1].lse, full.lse[-1])
    rows = [399, 0, 101, 101, 479]  # across shards, unsorted, repeated
    picked = store[np.array(rows)]
    for field in TOPK_TENSOR_FIELDS:
        assert torch.equal(getattr(picked, field), getattr(full, field)[rows])
        assert torch.equal(getattr(store[torch.tensor(rows)], field), getattr(full, field)[rows])
        assert torch.equal(getattr(store[95:305:3], field), getattr(full, field)[95:305:3])
    mask = np.zeros(N, dtype=bool)
    mask[[3, 200]] = True
    assert torch.equal(store[mask].indices, full.indices[[3, 200]])
    assert store[[]].indices.shape == (0, K)
    # a 0-d integer tensor / array is one row, like an int
    for zero_d in (torch.tensor(250), np.array(250), np.array(250, dtype=np.uint16), torch.tensor(-230)):
        got = store[zero_d]
        assert got.indices.shape == (K,) and got.lse.shape == ()
        for field in TOPK_TENSOR_FIELDS:
            assert torch.equal(getattr(got, field), getattr(one, field))
    with pytest.raises(IndexError, match="480"):
        store[480]
    with pytest.raises(IndexError, match="480"):
        store[torch.tensor(480)]
    with pytest.raises(IndexError, match="out of range"):
        store[[0, -481]]


def test_inputs_as_arrays_tensors_and_files_give_the_same_store(tmp_path, monkeypatch):
    model = make_teacher()
    X = make_csr()
    dense = X.toarray()
    np.save(tmp_path / "x.npy", dense)
    sp.save_npz(tmp_path / "x.npz", X)
    with one_thread():
        a = read_files(label_model(model, X, tmp_path / "csr").out_dir)
        b = read_files(label_model(model, tmp_path / "x.npz", tmp_path / "csr_file").out_dir)
        c = read_files(label_model(model, dense, tmp_path / "np").out_dir)
        d = read_files(label_model(model, torch.from_numpy(dense), tmp_path / "torch").out_dir)
        e = read_files(label_model(model, str(tmp_path / "x.npy"), tmp_path / "np_file").out_dir)
        f = read_files(label_model(model, torch.from_numpy(dense).to_sparse_csr(), tmp_path / "torch_csr").out_dir)
        assert a == b == f and c == d == e
        # and a path resumes a store made from the array: nothing to do
        counter = CountCalls(monkeypatch)
        label_model(model, tmp_path / "x.npz", tmp_path / "csr")
        assert counter.calls == PROBE


def test_hidden_states_without_encoder(tmp_path):
    model = make_teacher()
    with torch.no_grad():
        hidden = model.encode(make_csr())
    W, b = model.output.weight.detach(), model.output.bias.detach()
    store = label(None, W, hidden, tmp_path / "s", bias=b)
    want = TopK(*reference.teacher_topk(hidden.double(), W.double(), b.double(), k=K, temperature=2.0))
    assert_store_matches(store, want)
    # float64 hidden states are cast to the weight's dtype
    store64 = label(None, W, hidden.double().numpy(), tmp_path / "s64", bias=b)
    assert torch.equal(store64[:].indices, want.indices)
    # a plain callable encoder
    store_fn = label(lambda x: model.encode(x), W, make_csr(), tmp_path / "fn", bias=b)
    assert torch.equal(store_fn[:].indices, want.indices)


def test_big_endian_features(tmp_path):
    model = make_teacher()
    with torch.no_grad():
        hidden = model.encode(make_csr()).numpy()
    W, b = model.output.weight.detach(), model.output.bias.detach()
    with one_thread():
        want = label(None, W, hidden, tmp_path / "native", bias=b)[:]
        np.save(tmp_path / "h.npy", hidden.astype(">f4"))
        for name, features in (("file", tmp_path / "h.npy"), ("array", hidden.astype(">f4"))):
            got = label(None, W, features, tmp_path / name, bias=b)[:]
            for field in TOPK_TENSOR_FIELDS:
                assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
    # big-endian input features through an encoder module
    X = make_csr().toarray()
    got = label_model(model, X.astype(">f4"), tmp_path / "encoded")
    assert_store_matches(got, expected_topk(model, X))


def test_numpy_scalar_arguments(tmp_path):
    model = make_teacher()
    X = make_csr()
    with one_thread():
        want = read_files(label_model(model, X, tmp_path / "python").out_dir)
        store = label_model(model, X, tmp_path / "numpy", k=np.int64(K), temperature=np.float32(2.0),
                            batch_size=np.int32(32), shard_rows=np.uint16(100))
        assert read_files(store.out_dir) == want
    assert store.manifest["temperature"] == 2.0 and type(store.temperature) is float


def test_progress_and_summary_without_tqdm(tmp_path, monkeypatch, capsys):
    model = make_teacher()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is an optional extra: no bar, same run
    store = label_model(model, make_csr(), tmp_path / "s", progress=True)
    out = capsys.readouterr().out
    s = store.summary()
    assert "480 rows (480 labelled now)" in out and "rows/s" in out
    assert f"mean {s['mean_covered']:.4f}" in out and f"5th percentile {s['p5_covered']:.4f}" in out
    assert f"mean entropy {s['mean_entropy']:.4f}" in out
    assert s["rows_per_second"] == pytest.approx(N / s["seconds"])
    label_model(model, make_csr(), tmp_path / "s", progress=True)  # resumed: nothing to do
    captured = capsys.readouterr()
    assert "5 of 5 shards complete" in captured.err and "(0 labelled now)" in captured.out


def test_float64_teacher_stores_float64(tmp_path):
    model = make_teacher().double()
    X = make_csr()
    store = label_model(model, X, tmp_path / "s")
    assert store.manifest["dtype"] == "float64" and store[:].logits.dtype == torch.float64
    want = expected_topk(model, X)
    assert torch.equal(store[:].indices, want.indices)
    assert_close(store[:].lse, want.lse, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# batches into the fused loss
# ---------------------------------------------------------------------------------------------


def test_store_batches_plug_into_fused_loss(tmp_path):
    model = make_teacher()
    X = make_csr()
    bs = 64
    # one teacher_topk call per store batch: the direct TopK is bit-identical to the stored one
    store = label_model(model, X, tmp_path / "s", batch_size=bs, shard_rows=bs)
    with torch.no_grad():
        hidden = model.encode(X)
    W, b = model.output.weight.detach(), model.output.bias.detach()
    torch.manual_seed(5)
    student_hidden = torch.randn(N, 12, dtype=torch.float32)
    student_weight = torch.randn(V, 12) * 0.3
    target = torch.randint(0, V, (N,))
    terms = {"hard_weight": 0.5, "soft_weight": 1.0, "double_weight": 0.7, "temperature": 2.0, "reduction": "none"}

    direct_parts = []
    seen = 0
    for rows, top in store.batches(bs):
        assert rows.dtype == torch.int64 and torch.equal(rows, torch.arange(seen, seen + len(rows)))
        direct = kdfast.teacher_topk(hidden[rows], W, b, k=K, temperature=2.0)
        direct_parts.append(direct)
        for field in TOPK_TENSOR_FIELDS:
            assert torch.equal(getattr(top, field), getattr(direct, field)), field
        assert top.temperature == direct.temperature == 2.0  # the temperature of lse travels with it
        got = kdfast.fused_linear_distillation_loss(
            student_hidden[rows], student_weight, target[rows], teacher_topk=top, **terms
        )
        want = kdfast.fused_linear_distillation_loss(
            student_hidden[rows], student_weight, target[rows], teacher_topk=direct, **terms
        )
        assert torch.equal(got, want) and torch.isfinite(got).all()
        seen += len(rows)
    assert seen == N

    # shuffled batches: rows say which student rows the TopK belongs to
    direct_all = TopK(*(torch.cat([getattr(p, f) for p in direct_parts]) for f in TOPK_TENSOR_FIELDS), temperature=2.0)
    order = []
    for rows, top in store.batches(100, shuffle=True, seed=3):
        order.append(rows)
        want_top = TopK(*(getattr(direct_all, f)[rows] for f in TOPK_TENSOR_FIELDS), temperature=2.0)
        got = kdfast.fused_linear_distillation_loss(
            student_hidden[rows], student_weight, target[rows], teacher_topk=top, **terms
        )
        want = kdfast.fused_linear_distillation_loss(
            student_hidden[rows], student_weight, target[rows], teacher_topk=want_top, **terms
        )
        assert torch.equal(got, want)
    order = torch.cat(order)
    assert sorted(order.tolist()) == list(range(N)) and not torch.equal(order, torch.arange(N))
    again = torch.cat([r for r, _ in store.batches(100, shuffle=True, seed=3)])
    other = torch.cat([r for r, _ in store.batches(100, shuffle=True, seed=4)])
    assert torch.equal(order, again) and not torch.equal(order, other)
    sizes = [len(r) for r, _ in store.batches(100, drop_last=True)]
    assert sizes == [100] * 4
    # the module form takes the TopK as its teacher
    rows, top = next(store.batches(bs))
    loss_fn = kdfast.FusedLinearDistillationLoss(hard_weight=0.0, soft_weight=1.0)
    assert torch.isfinite(loss_fn(student_weight, student_hidden[rows], teacher=top))


# ---------------------------------------------------------------------------------------------
# resume, crash leftovers, corruption
# ---------------------------------------------------------------------------------------------


def test_resume_skips_complete_shards_and_redoes_broken_ones(tmp_path, monkeypatch):
    model = make_teacher()
    X = make_csr()
    out = tmp_path / "s"
    counter = CountCalls(monkeypatch)
    label_model(model, X, out)
    assert counter.calls == PROBE + 4 * batches_in(100) + batches_in(80)
    original = read_files(out)

    counter.calls = 0
    label_model(model, X, out)  # complete: nothing to do
    assert counter.calls == PROBE and read_files(out) == original

    (out / "shard-00001.npy").unlink()  # deleted
    with open(out / "shard-00003.npy", "r+b") as f:  # truncated
        f.truncate(1000)
    counter.calls = 0
    store = label_model(model, X, out)
    assert counter.calls == PROBE + 2 * batches_in(100)
    assert read_files(out) == original
    assert store.summary()["rows_labelled"] == 200


def test_resume_after_simulated_crash_states(tmp_path, monkeypatch):
    """The states a kill can leave, made by hand: temporary files, a shard without its checksum
    record, a record whose shard was never renamed into place, an in-progress manifest."""
    model = make_teacher()
    X = make_csr()
    with one_thread():
        ref = read_files(label_model(model, X, tmp_path / "ref").out_dir)
        out = tmp_path / "s"
        label_model(model, X, out)
        # back to the in-progress state of a killed run
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.update(complete=False, summary=None)
        for s in manifest["shards"]:
            s["sha256"] = None
        (out / "manifest.json").write_text(json.dumps(manifest))
        digests = {s["file"]: s["sha256"] for s in json.loads(ref["manifest.json"])["shards"]}
        (out / "shard-00000.npy.sha256").write_text(f"{digests['shard-00000.npy']}  shard-00000.npy\n")
        (out / "shard-00002.npy.sha256").write_text(f"{digests['shard-00002.npy']}  shard-00002.npy\n")
        (out / "shard-00002.npy").unlink()  # record without a shard
        (out / "shard-00003.npy.sha256").write_text(f"{'0' * 64}  shard-00003.npy\n")  # wrong record
        (out / ".shard-00004.npy.tmp-12345").write_bytes(b"half a shard")
        (out / ".manifest.json.tmp-12345").write_bytes(b"{")
        # shard 1 has no record: redone
        with pytest.raises(LabelStoreError, match="incomplete"):
            LabelStore(out)
        counter = CountCalls(monkeypatch)
        label_model(model, X, out)
        # shard 0 is kept (its record matches); 1 (no record), 2 (no shard), 3 (wrong record), 4 (only a
        # temporary file) are redone
        assert counter.calls == PROBE + 3 * batches_in(100) + batches_in(80)
        assert read_files(out) == ref


def test_resume_without_batch_size_uses_the_stores(tmp_path, monkeypatch):
    model = make_teacher()
    X = make_csr()
    out = tmp_path / "s"
    with one_thread():
        ref = read_files(label_model(model, X, tmp_path / "ref", batch_size=64).out_dir)
        label_model(model, X, out, batch_size=64)
        (out / "shard-00001.npy").unlink()  # as if interrupted
        counter = CountCalls(monkeypatch)
        store = label_model(model, X, out, batch_size=None)  # the store's own: 64
        assert counter.calls == PROBE + batches_in(100, 64)
        assert store.manifest["batch_size"] == 64 and store.summary()["rows_labelled"] == 100
        assert read_files(out) == ref
        # an explicit batch size that disagrees with the store is still refused
        with pytest.raises(ValueError, match="batch_size = 64, not 32.*overwrite=True"):
            label_model(model, X, out, batch_size=32)
        assert read_files(out) == ref
        # not resuming: 4096 (a fresh store, or one replaced with overwrite=True)
        assert label_model(model, X, tmp_path / "fresh", batch_size=None).manifest["batch_size"] == 4096
        replaced = label_model(model, X, out, batch_size=None, k=K + 1, overwrite=True)
        assert replaced.manifest["batch_size"] == 4096 and replaced.k == K + 1
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        label_model(model, X, tmp_path / "bad", batch_size=0)


def test_cli_resume_without_batch_size(saved):
    ref = reference_store(saved, saved.dir / "ref")  # --batch-size 32
    out = saved.dir / "s"
    args = saved.args(out)
    i = args.index("--batch-size")
    del args[i : i + 2]
    with one_thread():
        assert cli_main(saved.args(out)) == 0
        (out / "shard-00002.npy").unlink()
        assert cli_main(args) == 0  # resumed with the store's --batch-size 32
    assert read_files(out) == ref


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nonfinite_rows_keep_the_summary_finite_and_the_manifest_strict_json(tmp_path, capsys):
    torch.manual_seed(0)
    hidden = torch.randn(200, 8)
    hidden[17] = float("nan")  # one bad teacher row
    W = torch.randn(30, 8)
    store = label(None, W, hidden, tmp_path / "s", k=4, progress=True)
    manifest = _strict_json((tmp_path / "s" / "manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["nonfinite_rows"] == 1
    for key in ("mean_covered", "p5_covered", "mean_entropy"):
        assert isinstance(summary[key], float) and np.isfinite(summary[key]), key
    good = torch.cat([hidden[:17], hidden[18:]]).double()
    want = TopK(*reference.teacher_topk(good, W.double(), None, k=4, temperature=2.0))
    assert summary["mean_covered"] == pytest.approx(want.covered.mean().item(), rel=1e-5)
    assert summary["p5_covered"] == pytest.approx(np.percentile(want.covered.numpy(), 5), rel=1e-5)
    assert summary["mean_entropy"] == pytest.approx(want.entropy.mean().item(), rel=1e-5)
    s = store.summary()
    assert s["nonfinite_rows"] == 1 and s["mean_covered"] == summary["mean_covered"]
    assert "1 row with non-finite" in capsys.readouterr().out
    LabelStore(tmp_path / "s").verify()
    # every row non-finite: no statistics (null), still strict JSON
    label(None, W, torch.full((5, 8), float("nan")), tmp_path / "all_nan", k=4)
    summary = _strict_json((tmp_path / "all_nan" / "manifest.json").read_text())["summary"]
    assert summary == {"mean_covered": None, "p5_covered": None, "mean_entropy": None, "nonfinite_rows": 5}
    # the manifest writer maps any non-finite float to null and writes strict JSON
    text = labeling._json_bytes({"a": [1.0, float("inf"), {"b": float("-inf"), "c": float("nan")}], "d": 2}).decode()
    assert _strict_json(text) == {"a": [1.0, None, {"b": None, "c": None}], "d": 2}


def test_corrupted_shard_is_detected_and_relabelled(tmp_path):
    model = make_teacher()
    X = make_csr()
    out = tmp_path / "s"
    with one_thread():
        first = label_model(model, X, out)[:]
        original = read_files(out)
        path = out / "shard-00002.npy"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40  # one flipped bit in the last record
        path.write_bytes(bytes(data))

        with pytest.raises(ShardVerificationError) as info:
            LabelStore(out)
        msg = str(info.value)
        assert "shard-00002.npy" in msg and "sha256" in msg
        assert "label_dataset" in msg and "python -m kdfast label" in msg and str(out) in msg

        lazy = LabelStore(out, verify="lazy")
        assert torch.equal(lazy[0:200].indices, first.indices[:200])  # the intact shards still read
        with pytest.raises(ShardVerificationError, match="shard-00002.npy"):
            lazy[250]
        with pytest.raises(ShardVerificationError, match="shard-00002.npy"):
            list(lazy.batches(64))

        (out / "shard-00004.npy").unlink()
        with pytest.raises(ShardVerificationError, match="shard-00004.npy.*missing"):
            LabelStore(out, verify="lazy")[470]

        label_model(model, X, out)  # what the message says to do
        assert read_files(out) == original
        LabelStore(out).verify()


# ---------------------------------------------------------------------------------------------
# refusing a different configuration, foreign directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"k": K + 1}, "k = 8, not 9"),
        ({"temperature": 1.5}, "temperature = 2.0, not 1.5"),
        ({"shard_rows": 90}, "shard_rows = 100, not 90"),
        ({"batch_size": 16}, "batch_size = 32, not 16"),
        ({"teacher": 1}, "a different teacher"),
        ({"features": 1}, "different features"),
    ],
)
def test_mismatched_store_refused_unless_overwrite(tmp_path, change, needle):
    model = make_teacher()
    X = make_csr()
    out = tmp_path / "s"
    label_model(model, X, out)
    before = read_files(out)
    change = dict(change)
    new_model = make_teacher(seed=change.pop("teacher", 0))
    new_X = make_csr(seed=change.pop("features", 0))
    with pytest.raises(ValueError, match="overwrite=True") as info:
        label_model(new_model, new_X, out, **change)
    assert needle in str(info.value)
    assert read_files(out) == before  # untouched
    with one_thread():
        store = label_model(new_model, new_X, out, overwrite=True, **change)
        fresh = label_model(new_model, new_X, tmp_path / "fresh", **change)
        assert read_files(out) == read_files(fresh.out_dir)
    assert_store_matches(store, expected_topk(new_model, new_X, k=change.get("k", K),
                                              temperature=change.get("temperature", 2.0)))


def test_foreign_directory_refused(tmp_path):
    model = make_teacher()
    X = make_csr()
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not part of a kdfast label store \(notes\.txt\)"):
            label_model(model, X, out, overwrite=overwrite)
    assert os.listdir(out) == ["notes.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="not a kdfast label store manifest"):
        label_model(model, X, other, overwrite=True)
    with pytest.raises(ValueError, match="not a kdfast label store manifest"):
        LabelStore(other)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        label_model(model, X, a_file)

    orphan = tmp_path / "orphan"  # shards without a manifest
    orphan.mkdir()
    (orphan / "shard-00000.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match="no manifest.json"):
        label_model(model, X, orphan)
    store = label_model(model, X, orphan, overwrite=True)
    assert len(store) == N

    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LabelStore(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="verify"):
        LabelStore(orphan, verify="never")


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ---------------------------------------------------------------------------------------------


def test_bad_input(tmp_path):
    model = make_teacher()
    X = make_csr()
    W, b = model.output.weight, model.output.bias
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=r"k must be in \[1, V = 700\].*got 0"):
        label_model(model, X, out, k=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, V = 700\].*got 701"):
        label_model(model, X, out, k=V + 1)
    with pytest.raises(TypeError, match="k must be an int"):
        label_model(model, X, out, k=2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        label_model(model, X, out, k=np.bool_(True))
    with pytest.raises(ValueError, match="temperature"):
        label_model(model, X, out, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        label_model(model, X, out, temperature=np.float32("inf"))
    with pytest.raises(TypeError, match="temperature must be a real number"):
        label_model(model, X, out, temperature=torch.tensor(2.0))
    with pytest.raises(TypeError, match="temperature must be a real number"):
        label_model(model, X, out, temperature=True)
    with pytest.raises(ValueError, match="batch_size"):
        label_model(model, X, out, batch_size=0)
    with pytest.raises(ValueError, match="shard_rows"):
        label_model(model, X, out, shard_rows=-1)
    # features whose column count does not match the teacher
    with pytest.raises(ValueError, match=r"features have 59 columns .*num_features = 60"):
        label_model(model, X[:, :59], out)
    with pytest.raises(ValueError, match=r"features have 61 columns .*num_features = 60"):
        label_model(model, np.zeros((5, 61), np.float32), out)
    # hidden / weight width mismatch
    with torch.no_grad():
        hidden = model.encode(X)
    with pytest.raises(ValueError, match=r"features have 15 columns.*hidden states, of width d = 16"):
        label(None, W, hidden[:, :15], out, bias=b)
    with pytest.raises(ValueError, match=r"hidden states of shape \(1, 12\).*d = 16"):
        label(lambda x: model.encode(x)[:, :12], W, X, out, bias=b)
    with pytest.raises(ValueError, match=r"shape \(1, 700\).*pass SparseLinearClassifier.encode"):
        label(model, W, X, out, bias=b)  # the model itself gives logits
    with pytest.raises(ValueError, match=r"weight must have shape \[V, d\]"):
        label(None, W[0], hidden, out)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[700\]"):
        label(None, W, hidden, out, bias=b[:-1])
    # features themselves
    with pytest.raises(ValueError, match="2-D"):
        label(None, W, hidden[0], out)
    with pytest.raises(ValueError, match="no rows"):
        label(None, W, hidden[:0], out)
    with pytest.raises(TypeError, match="features must be"):
        label(None, W, [[1.0] * 16], out)
    with pytest.raises(TypeError, match="encoder must be callable"):
        label("encode", W, X, out)
    assert not out.exists()  # no bad input touched the disk


class ParametersOn(nn.Module):
    """An encoder whose parameters claim to live on ``device``: device checks without a GPU."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.claimed = torch.device(device)

    def parameters(self, recurse: bool = True):
        yield types.SimpleNamespace(device=self.claimed)

    def forward(self, x):
        return x


def test_cuda_device_without_index_is_the_current_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    same = labeling._same_device
    assert same(torch.device("cuda:0"), torch.device("cuda")) and not same(torch.device("cuda:1"), torch.device("cuda"))
    assert same(torch.device("cuda:1"), torch.device("cuda:1")) and not same(torch.device("cuda:0"), torch.device("cuda:1"))
    assert same(torch.device("cpu"), torch.device("cpu")) and not same(torch.device("cpu"), torch.device("cuda"))
    assert not same(torch.device("cuda:0"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same(torch.device("cuda:1"), torch.device("cuda")) and not same(torch.device("cuda:0"), torch.device("cuda"))

    # label_dataset with a build that has a CUDA kernel: an encoder on cuda:0 passes the device check
    # for device="cuda" (the features, checked next, have no rows, so nothing runs on a GPU)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: key == "CUDA" or has_kernel(op, key))
    no_rows = np.zeros((0, 3), np.float32)
    out = tmp_path / "s"
    for device in ("cuda", torch.device("cuda"), "cuda:0"):
        with pytest.raises(ValueError, match="features have no rows"):
            label(ParametersOn("cuda:0"), torch.zeros(5, 3), no_rows, out, k=2, device=device)
    with pytest.raises(ValueError, match=r"encoder's parameters are on cuda:1 but labeling runs on cuda:0"):
        label(ParametersOn("cuda:1"), torch.zeros(5, 3), no_rows, out, k=2, device="cuda")
    with pytest.raises(ValueError, match=r"encoder's parameters are on cpu but labeling runs on cuda:0"):
        label(ParametersOn("cpu"), torch.zeros(5, 3), no_rows, out, k=2, device="cuda")
    assert not out.exists()


def test_load_features_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'.*\.npy.*\.npz.*\.txt"):
        load_features(tmp_path / "train.csv")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        load_features(tmp_path / "train.txt")
    with pytest.raises(ValueError, match="unknown extension"):
        label_dataset(None, torch.zeros(3, 4), tmp_path / "train.csv", tmp_path / "s", k=2)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_features(tmp_path / "missing.npy")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="scipy.sparse.save_npz"):
        load_features(tmp_path / "plain.npz")
    np.save(tmp_path / "vec.npy", np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        load_features(tmp_path / "vec.npy")
    X = make_csr()
    sp.save_npz(tmp_path / "x.npz", X)
    loaded = load_features(tmp_path / "x.npz")
    assert sp.isspmatrix_csr(loaded) or loaded.format == "csr"
    assert (loaded != X).nnz == 0


def test_xmlrepo_features_file(tmp_path):
    """An XMLRepo BoW file labels like its L2-normalized feature matrix."""
    X = make_csr().astype(np.float32)
    Y = sp.csr_matrix((np.ones(X.shape[0], np.float32), (np.arange(X.shape[0]), np.zeros(X.shape[0], int))),
                      shape=(X.shape[0], 3))
    kdfast.data.write_xmlrepo(tmp_path / "train.txt", X, Y)
    loaded = load_features(tmp_path / "train.txt")
    expected = kdfast.data.l2_normalize(X)
    assert loaded.shape == X.shape
    np.testing.assert_allclose(loaded.toarray(), expected.toarray(), rtol=1e-6, atol=1e-7)
    W = torch.randn(7, X.shape[1], dtype=torch.float64)
    a = label_dataset(None, W, tmp_path / "train.txt", tmp_path / "from_txt", k=3, progress=False)
    b = label_dataset(None, W, expected, tmp_path / "from_csr", k=3, progress=False)
    assert torch.equal(a[:].indices, b[:].indices)


# ---------------------------------------------------------------------------------------------
# subprocesses: kill and resume, torchrun, the command line
# ---------------------------------------------------------------------------------------------

# The command line, optionally slowed down (so a kill lands mid-run) and optionally inside a
# gloo process group the script initializes itself (the "already initialized" path).
RUNNER = """
import os, sys, time
import kdfast.labeling as L
slow = float(os.environ.get("KDFAST_TEST_SLOW", "0"))
if slow:
    _orig = L.teacher_topk
    def _slow(*args, **kwargs):
        time.sleep(slow)
        return _orig(*args, **kwargs)
    L.teacher_topk = _slow
init = os.environ.get("KDFAST_TEST_INIT_GLOO")
if init:
    import torch.distributed as dist
    dist.init_process_group("gloo")
from kdfast.__main__ import main
rc = main(sys.argv[1:])
if init:
    assert dist.is_initialized()  # label_dataset leaves a group it did not create alone
    dist.destroy_process_group()
sys.exit(rc)
"""


@pytest.fixture
def saved(tmp_path):
    """A teacher checkpoint, its features as a .npz file, the runner script and CLI arguments."""
    model = make_teacher()
    save_checkpoint(model, tmp_path / "teacher.pt", trained_on="nothing")
    sp.save_npz(tmp_path / "x.npz", make_csr())
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)

    def args(out, *extra):
        return ["label", "--teacher", str(tmp_path / "teacher.pt"), "--data", str(tmp_path / "x.npz"),
                "--out", str(out), "--k", str(K), "--temperature", "2", "--batch-size", "32",
                "--shard-rows", "100", "--no-progress", *extra]

    class Saved:
        pass

    s = Saved()
    s.model, s.dir, s.runner, s.args = model, tmp_path, runner, args
    return s


def env(**extra) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def reference_store(saved, out) -> dict[str, bytes]:
    """The uninterrupted single-process store, in this process with one thread."""
    with one_thread():
        assert cli_main(saved.args(out)) == 0
    return read_files(out)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.002)


def test_kill_and_resume_is_byte_identical(saved):
    ref = reference_store(saved, saved.dir / "ref")
    out = saved.dir / "killed"
    cmd = [sys.executable, str(saved.runner), *saved.args(out)]
    slow_env = env(KDFAST_TEST_SLOW=0.05)  # ~0.2 s a shard: a kill lands mid-run
    # kill 1: as soon as the in-progress manifest appears; kill 2: right after the first shard;
    # kill 3: a little after a later checksum record (typically while a shard is being made)
    for marker, delay in (("manifest.json", 0.0), ("shard-00000.npy", 0.0), ("shard-00002.npy.sha256", 0.03)):
        proc = subprocess.Popen(cmd, cwd=REPO, env=slow_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(out / marker, proc)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] is False  # killed mid-run
    leftovers = set(os.listdir(out)) - set(ref)
    assert leftovers  # checksum records (and maybe temporary files) of the killed runs
    with pytest.raises(LabelStoreError, match="incomplete"):
        LabelStore(out)
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_files(out) == ref
    LabelStore(out).verify()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_rank(saved):
    ref = reference_store(saved, saved.dir / "ref")
    out = saved.dir / "ranks2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(saved.runner), *saved.args(out)]
    run = subprocess.run(cmd, check=False, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_files(out) == ref

    # resume with 2 ranks in a process group the script made itself: the broken shards are
    # shared between the ranks, and the store is the same again
    (out / "shard-00001.npy").unlink()
    (out / "shard-00002.npy").unlink()
    with open(out / "shard-00004.npy", "r+b") as f:
        f.truncate(100)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(saved.runner), *saved.args(out)], cwd=REPO,
            env=env(KDFAST_TEST_INIT_GLOO=1, RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    assert read_files(out) == ref


def test_cli_end_to_end(saved, capsys):
    out = saved.dir / "cli"
    cmd = [sys.executable, "-m", "kdfast", *saved.args(out)[:-1]]  # with the progress bar and summary
    run = subprocess.run(cmd, check=False, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "480 rows" in run.stdout and "covered mass" in run.stdout and "mean entropy" in run.stdout
    store = LabelStore(out)
    model = load_checkpoint(saved.dir / "teacher.pt")
    assert model.metadata == {"trained_on": "nothing"}
    assert_store_matches(store, expected_topk(model, make_csr()))
    assert read_files(out) == reference_store(saved, saved.dir / "ref")

    # bad input: exit status 1 and a one-line error naming the problem
    cmd = [sys.executable, "-m", "kdfast", *saved.args(out, "--temperature", "3")]
    bad = subprocess.run(cmd, check=False, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "temperature = 2.0, not 3.0" in bad.stderr and "--overwrite" in bad.stderr
    capsys.readouterr()
    cases = [
        (["--teacher", str(saved.dir / "missing.pt")], "missing.pt"),
        (["--data", str(saved.dir / "x.csv")], "unknown extension '.csv'"),
        (["--k", "701"], "k must be in [1, V = 700]"),
        (["--teacher", str(saved.dir / "x.npz")], "is not a kdfast checkpoint"),
        (["--out", str(saved.dir / "teacher.pt")], "not a directory"),
    ]
    for override, needle in cases:
        argv = saved.args(saved.dir / "cli_bad")
        for i in range(0, len(override), 2):
            argv[argv.index(override[i]) + 1] = override[i + 1]
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err and needle in err, (override, err)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["label", "--k", "0"])  # argparse usage error
    assert exit_info.value.code == 2
    with one_thread():
        assert cli_main(saved.args(out, "--temperature", "3", "--overwrite")) == 0
    assert LabelStore(out).temperature == 3.0


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def test_sparse_linear_classifier_inputs_and_checkpoint(tmp_path):
    model = make_teacher()
    X = make_csr()
    dense = torch.from_numpy(X.toarray())
    with torch.no_grad():
        h = model.encode(X)
        assert h.shape == (N, HIDDEN)
        want = dense @ model.hidden.weight + model.hidden_bias
        assert_close(h, want, rtol=1e-5, atol=1e-6)
        assert_close(model.encode(dense), want, rtol=1e-5, atol=1e-6)
        assert_close(model.encode(dense.to_sparse_csr()), h)
        assert_close(model.encode(dense.to_sparse()), h)
        assert_close(model.encode(X.tocoo()), h)
        assert_close(model(X), model.output(h))
        assert model.encode(X[:0]).shape == (0, HIDDEN)
    with pytest.raises(ValueError, match="59 columns.*num_features = 60"):
        model.encode(X[:, :59])
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        SparseLinearClassifier(0, 4, 4)
    no_bias = SparseLinearClassifier(D, 4, 9, bias=False)
    assert no_bias.hidden_bias is None and no_bias.output.bias is None

    fp = model_fingerprint(model)
    save_checkpoint(model, tmp_path / "m.pt", epochs=3, lr=0.1)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "kdfast.SparseLinearClassifier/1"
    assert payload["config"] == {"num_features": D, "hidden_dim": HIDDEN, "num_classes": V, "bias": True}
    assert payload["metadata"] == {"epochs": 3, "lr": 0.1}
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert not loaded.training and loaded.metadata == {"epochs": 3, "lr": 0.1}
    assert model_fingerprint(loaded) == fp == model_fingerprint(model.state_dict())
    assert len(fp) == 64
    with torch.no_grad():
        loaded.output.bias[3] += 1e-6
    assert model_fingerprint(loaded) != fp
    assert model_fingerprint(model.double()) != fp  # dtype is part of it
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(model, tmp_path / "bad.pt", when=object())
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kdfast.SparseLinearClassifier/1 checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "other.pt"]  # no partial or temporary files
