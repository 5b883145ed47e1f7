"""Tests of ``kdfast.teacher_topk`` (the fused GEMM + top-k labeling op) and its raw op.

Oracles, all on the dense logits ``F.linear(hidden, weight, bias)`` made in float64 from the
very inputs the op gets (for bf16/fp16 inputs: the rounded values, upcast):

* ``torch.topk`` for indices and values, ``torch.logsumexp`` of ``logits / T`` for ``lse``,
  ``-sum p log p`` of ``softmax(logits / T)`` for the entropy and ``sum_{top-k} p`` for ``covered``;
* :func:`kdfast.reference.teacher_topk` (a stable descending sort: ties to the lower class
  index), the only oracle where logits tie, since ``torch.topk`` promises no order among ties.

Indices are compared exactly. Where the float64 logits of two classes are closer than the
rounding error of the op's GEMM (float32 accumulation, or any near tie), no implementation can
order them faithfully: there the test compares the float64 logits of the classes the op chose
with the true top-k values, rank by rank, instead of the indices. Tests on random data assert
that such near ties do not occur (a precondition on the fixed-seed data), so that indices are
compared exactly everywhere; only the k = V float32 case and the bf16/fp16 cases have them.
Data on a coarse dyadic grid (every GEMM exact in float32) gives bit-exact comparisons with
heavy ties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import kdfast
from kdfast import TopK, reference
from kdfast.targets import TOPK_TENSOR_FIELDS

OP = torch.ops.kdfast.teacher_topk.default

FLOAT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _has_kernel(device):
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::teacher_topk", key)


@pytest.fixture
def tdevice(device):
    """The shared ``device`` fixture, restricted to devices teacher_topk has a kernel for."""
    if not _has_kernel(device):
        pytest.skip(f"teacher_topk has no {device} kernel in this build")
    return device


# ----------------------------------------------------------------------------- inputs and oracles


def _random(B, d, V, *, dtype=torch.float64, bias=True, seed=0, scale=1.0, device="cpu"):
    """``(hidden, weight, bias)`` ~ N(0, 1) (bias N(0, 1)), logits of std ``scale``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(max(d, 1)))
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(h), cast(w), cast(b)


def _grid(B, d, V, *, dtype=torch.float32, bias=True, seed=0, levels=3, device="cpu"):
    """Small integers (hidden) and multiples of 1/4 (weight, bias): every logit is a multiple of
    1/4 of modest size, exact in float32 whatever the summation order, and many of them tie."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-levels, levels + 1, (B, d), generator=g).to(torch.float64)
    w = torch.randint(-levels, levels + 1, (V, d), generator=g).to(torch.float64) / 4
    b = torch.randint(-levels, levels + 1, (V,), generator=g).to(torch.float64) / 4 if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(h), cast(w), cast(b)


def _logits64(h, w, b):
    return F.linear(h.double(), w.double(), None if b is None else b.double())


def _oracle(h, w, b, k, T):
    """``(logits, indices, values, lse, entropy, covered)`` from the dense float64 logits."""
    logits = _logits64(h, w, b)
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    scaled = logits / T
    lse = torch.logsumexp(scaled, dim=-1)
    log_p = scaled - lse[:, None]
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    covered = p.gather(-1, indices).sum(-1)
    return logits, indices, values, lse, entropy, covered


def _resolved_ranks(logits64, k, margin):
    """``[B, k]`` bool: rank ``j`` of the row's sorted logits is apart from ranks ``j - 1`` and
    ``j + 1`` by more than ``margin`` (per row), so that its class is determined."""
    v = torch.sort(logits64, dim=-1, descending=True).values
    B = v.shape[0]
    inf = torch.full((B, 1), math.inf, dtype=v.dtype, device=v.device)
    gaps = v[:, :-1] - v[:, 1:]  # [B, V - 1]: gap between rank j and j + 1
    above = torch.cat([inf, gaps], dim=1)[:, :k]  # rank j - 1 minus rank j
    below = torch.cat([gaps, inf], dim=1)[:, :k]  # rank j minus rank j + 1
    return torch.minimum(above, below) > margin.reshape(-1, 1)


def _gemm_error_bound(h, w, b, acc_dtype):
    """Per-row bound on the rounding error of a logit computed in ``acc_dtype``: d·eps·sum|h w| (+|b|)."""
    eps = torch.finfo(acc_dtype).eps
    mag = F.linear(h.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    d = h.shape[1]
    return (d + 2) * eps * mag.max(dim=-1).values


def _tols(dtype, device="cpu"):
    """``(tol for logits/lse/entropy, tol for covered)`` of the op's outputs against float64."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}, {"rtol": 0, "atol": 1e-12}
    if dtype == torch.float32 or device == "cpu":
        # float32, and bf16 / fp16 inputs on the CPU: the float64 oracle runs on the same rounded
        # inputs, whose products are exact in float32, and the kernel accumulates in float32 (both
        # CPU GEMM paths of bf16, csrc/cpu/gemm.h): float32 accuracy, not the inputs' precision
        return {"rtol": 2e-5, "atol": 2e-5}, {"rtol": 0, "atol": 2e-5}
    # bf16 / fp16 on CUDA: the inputs' precision (cuBLAS may reduce split-K partial sums in the
    # inputs' dtype); not yet run on a GPU, so not tightened
    eps = torch.finfo(dtype).eps
    return {"rtol": eps, "atol": eps}, {"rtol": 0, "atol": eps}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(res, B, k, dtype):
    assert isinstance(res, TopK)
    out = _acc_dtype(dtype)
    assert res.indices.shape == (B, k) and res.indices.dtype == torch.int64
    assert res.logits.shape == (B, k) and res.logits.dtype == out
    for name in ("lse", "entropy", "covered"):
        t = getattr(res, name)
        assert t is not None and t.shape == (B,) and t.dtype == out, name
    assert res.k == k


def _check_against_full_logits(res, h, w, b, k, T, *, all_resolved=True, min_resolved=1.0):
    """The op's result against ``torch.topk`` / ``logsumexp`` / entropy on the float64 logits of
    the same inputs and against :func:`kdfast.reference.teacher_topk`. Returns the fraction of
    (row, rank) pairs whose index was compared exactly."""
    B, V = h.shape[0], w.shape[0]
    _check_shapes(res, B, k, h.dtype)
    tol, cov_tol = _tols(h.dtype, h.device.type)
    logits, indices, values, lse, entropy, covered = _oracle(h, w, b, k, T)

    # indices are classes, distinct within a row, and the op's values are their logits
    assert int(res.indices.min()) >= 0 and int(res.indices.max()) < V
    assert all(len(set(row)) == k for row in res.indices.tolist())
    picked = logits.gather(-1, res.indices)
    assert_close(res.logits.double(), picked, **tol)
    # the chosen classes carry the k largest logits, rank by rank (also across near ties)
    assert_close(picked, values, **tol)
    # indices exactly equal wherever the float64 logits are not within the GEMM error of a tie
    margin = 4 * _gemm_error_bound(h, w, b, _acc_dtype(h.dtype)) if h.dtype != torch.float64 else torch.full(
        (B,), 1e-9, dtype=torch.float64, device=h.device
    )
    resolved = _resolved_ranks(logits, k, margin)
    if all_resolved:
        assert bool(resolved.all()), "precondition: the test data has near ties; choose another seed"
    fraction = float(resolved.double().mean()) if resolved.numel() else 1.0
    assert fraction >= min_resolved, f"only {fraction:.2%} of the ranks are apart from a near tie"
    assert torch.equal(res.indices[resolved], indices[resolved])

    assert_close(res.lse.double(), lse, **tol)
    assert_close(res.entropy.double(), entropy, **tol)
    assert_close(res.covered.double(), covered, **cov_tol)

    # kdfast.reference agrees with the oracle above on the same float64 inputs
    r_idx, r_val, r_lse, r_ent, r_cov = reference.teacher_topk(
        h.double(), w.double(), None if b is None else b.double(), k=k, temperature=T
    )
    assert torch.equal(r_idx[resolved], res.indices[resolved])
    assert_close(res.logits.double(), r_val, **tol)
    for mine, ref in ((res.lse, r_lse), (res.entropy, r_ent)):
        assert_close(mine.double(), ref, **tol)
    assert_close(res.covered.double(), r_cov, **cov_tol)
    _check_covered_range(res)
    return fraction


def _check_covered_range(res, slack=None):
    """``covered`` is a probability mass in [0, 1]. The checks of the other tests allow rounding
    past 1 by ``slack`` (the covered tolerance); test_covered_is_a_probability has none."""
    cov = res.covered
    if slack is None:
        slack = _tols(cov.dtype)[1]["atol"]
    assert bool(((cov >= 0) & (cov <= 1 + slack)).all()), (
        f"covered outside [0, 1{f' + {slack:g}' if slack else ''}]: min {cov.min()}, max {cov.max()}"
    )


def _check_against_reference_exactly(res, h, w, b, k, T):
    """Bit-exact against :func:`kdfast.reference.teacher_topk` on float64 copies (for data whose
    logits are exact in the op's dtype): indices and logits equal, statistics to tolerance."""
    _check_shapes(res, h.shape[0], k, h.dtype)
    r_idx, r_val, r_lse, r_ent, r_cov = reference.teacher_topk(
        h.double(), w.double(), None if b is None else b.double(), k=k, temperature=T
    )
    assert torch.equal(res.indices, r_idx)
    assert torch.equal(res.logits.double(), r_val)
    tol, cov_tol = _tols(h.dtype, h.device.type)
    assert_close(res.lse.double(), r_lse, **tol)
    assert_close(res.entropy.double(), r_ent, **tol)
    assert_close(res.covered.double(), r_cov, **cov_tol)
    _check_covered_range(res)


def _run(h, w, b, k, T=1.0, tile=None):
    return kdfast.teacher_topk(h, w, b, k=k, temperature=T, tile_size=tile)


def _assert_equal_results(a, b, *, stats_tol=None):
    """Indices and top-k logits bit-equal; lse/entropy/covered equal (bit-equal without ``stats_tol``)."""
    assert torch.equal(a.indices, b.indices)
    for name in ("logits", "lse", "entropy", "covered"):
        x, y = getattr(a, name), getattr(b, name)
        if stats_tol is None or name == "logits":
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, **stats_tol, msg=name)


# ----------------------------------------------------------------------------- against full logits


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("k_kind", ["1", "32", "V"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_matches_topk_logsumexp_entropy(dtype, k_kind, bias, T, tdevice):
    B, d, V = 9, 24, 300
    k = {"1": 1, "32": 32, "V": V}[k_kind]
    h, w, b = _random(B, d, V, dtype=dtype, bias=bias, seed=1, scale=4.0, device=tdevice)
    res = _run(h, w, b, k, T, tile=64)
    # k = V in float32: the full order of 300 logits has gaps below float32's GEMM error
    full_order_f32 = dtype == torch.float32 and k == V
    frac = _check_against_full_logits(
        res, h, w, b, k, T, all_resolved=not full_order_f32, min_resolved=0.8 if full_order_f32 else 1.0
    )
    assert frac > 0
    assert res.temperature == T  # the temperature of lse/entropy/covered is recorded
    # temperature scales lse/entropy/covered only: the logits are raw
    assert_close(res.logits.double(), _logits64(h, w, b).gather(-1, res.indices), **_tols(dtype)[0])
    if k == V:
        assert_close(res.covered.double(), torch.ones(B, dtype=torch.float64, device=res.covered.device),
                     **_tols(dtype)[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_many_tiles_large_logits(dtype, tdevice):
    """Many tiles (and threads), logits of std 30: the online max/sum rescaling and tile skipping."""
    B, d, V = 7, 32, 20_011
    h, w, b = _random(B, d, V, dtype=dtype, seed=2, scale=30.0, device=tdevice)
    for tile, T in ((None, 1.0), (257, 0.5), (4096, 3.0)):
        _check_against_full_logits(_run(h, w, b, 16, T, tile), h, w, b, 16, T)


def test_to_moves_every_tensor_and_keeps_the_temperature(tdevice):
    h, w, b = _random(3, 8, 50, dtype=torch.float32, seed=3)
    res = _run(h, w, b, 4, T=2.5)
    moved = res.to(tdevice)
    assert moved.temperature == 2.5
    for name in TOPK_TENSOR_FIELDS:
        assert getattr(moved, name).device.type == torch.device(tdevice).type
        assert torch.equal(getattr(moved, name).cpu(), getattr(res, name)), name
    bare = TopK(res.indices, res.logits, res.lse).to(tdevice)  # optional fields stay None
    assert bare.entropy is None and bare.covered is None and bare.temperature == 1.0


def test_lse_of_huge_logits_does_not_overflow(tdevice):
    """Logits ~ 1e4 (float32 exp overflows past 88): lse stays finite and exact."""
    h, w, b = _random(3, 8, 500, dtype=torch.float32, seed=3, scale=1e4, device=tdevice)
    for T in (0.5, 1.0, 3.0):
        res = _run(h, w, b, 5, T, tile=64)
        assert torch.isfinite(res.lse).all() and torch.isfinite(res.entropy).all()
        _check_against_full_logits(res, h, w, b, 5, T)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_covered_is_a_probability(dtype, tdevice):
    """``covered`` never leaves [0, 1], not even by rounding (so that e.g. ``log1p(-covered)`` is
    defined); for k = V it is 1 up to rounding, from below."""
    h, w, b = _random(64, 13, 300, dtype=dtype, seed=22, scale=4.0, device=tdevice)
    for k in (1, 32, 299, 300):
        for T in (0.5, 1.0, 3.0):
            res = _run(h, w, b, k, T, 64)
            _check_covered_range(res, slack=0.0)
            if k == 300:
                assert_close(res.covered.double(), torch.ones(64, dtype=torch.float64, device=res.covered.device),
                             **_tols(dtype)[1])


# ----------------------------------------------------------------------------- ties


@pytest.mark.parametrize("tile", [1, 3, 5, 64, None, 10_000], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_ties_go_to_the_lower_class_index(dtype, tile, tdevice):
    """Integer-valued logits with heavy ties: the order of a stable descending sort, exactly."""
    B, d, V = 6, 3, 211
    g = torch.Generator().manual_seed(4)
    h = torch.randint(-2, 3, (B, d), generator=g).to(dtype=dtype, device=tdevice)
    h[0] = 0  # a row whose logits are the bias (and all zero without it)
    w = torch.randint(-2, 3, (V, d), generator=g).to(dtype=dtype, device=tdevice)
    b = torch.randint(-1, 2, (V,), generator=g).to(dtype=dtype, device=tdevice)
    logits = _logits64(h, w, b)
    # ties are really there: each row has fewer than V / 4 distinct logits
    assert all(len(set(row)) < V // 4 for row in logits.tolist())
    for k in (1, 5, 17, 100, V):
        res = _run(h, w, b, k, 1.0, tile)
        _check_against_reference_exactly(res, h, w, b, k, 1.0)
        # the order, written out independently of the reference: (-logit, class index)
        for i, row in enumerate(logits.tolist()):
            expected = sorted(range(V), key=lambda j: (-row[j], j))[:k]
            assert res.indices[i].tolist() == expected
    # row 0 without the bias: all V logits are 0, so class order, lse = entropy = log V
    res = _run(h, w, None, V, 1.0, tile)
    assert res.indices[0].tolist() == list(range(V))
    assert torch.equal(res.logits[0], torch.zeros(V, dtype=dtype, device=res.logits.device))
    log_v = torch.tensor(math.log(V), dtype=torch.float64, device=res.lse.device)
    assert_close(res.lse[0].double(), log_v, **_tols(dtype)[0])
    assert_close(res.entropy[0].double(), log_v, **_tols(dtype)[0])


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_grid_data_is_exact(dtype, T, tdevice):
    """Logits exact in float32: indices and top-k logits bit-equal to the reference, also in float32."""
    h, w, b = _grid(10, 13, 1031, dtype=dtype, seed=5, device=tdevice)
    for k, tile in ((1, 100), (32, None), (200, 7), (1031, 1000)):
        _check_against_reference_exactly(_run(h, w, b, k, T, tile), h, w, b, k, T)


# ----------------------------------------------------------------------------- shapes and tiles


@pytest.mark.parametrize("tile", [None, 1, 3, 64, 1000, 5000], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("d", [1, 13])
@pytest.mark.parametrize("V", [1, 7, 1031])
def test_odd_shapes_and_tile_sizes(V, d, tile, tdevice):
    """V = 1, 7, 1031 with ragged last tiles, tiles of one class and tiles larger than V."""
    h, w, b = _random(5, d, V, seed=6 + V + d, scale=3.0, device=tdevice)
    for k in sorted({1, min(4, V), V}):
        res = _run(h, w, b, k, 2.0, tile)
        _check_against_full_logits(res, h, w, b, k, 2.0)
    if V == 1:
        dev = res.indices.device
        assert torch.equal(res.indices, torch.zeros(5, 1, dtype=torch.int64, device=dev))
        assert_close(res.lse, res.logits[:, 0] / 2.0)
        assert torch.equal(res.entropy, torch.zeros(5, dtype=torch.float64, device=dev))
        assert torch.equal(res.covered, torch.ones(5, dtype=torch.float64, device=dev))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES, ids=_dtype_id)
def test_empty_batch(dtype, tdevice):
    h, w, b = _random(0, 6, 40, dtype=dtype, seed=7, device=tdevice)
    for tile in (None, 7):
        res = _run(h, w, b, 3, 1.5, tile)
        _check_shapes(res, 0, 3, dtype)


def test_single_row_and_default_arguments(tdevice):
    h, w, _ = _random(1, 16, 100, dtype=torch.float32, seed=8, device=tdevice)
    res = kdfast.teacher_topk(h, w)  # k = 32, temperature = 1, no bias, default tile
    _check_against_full_logits(res, h, w, None, 32, 1.0)
    assert res.indices[0, 0] == _logits64(h, w, None).argmax()  # indices[:, 0] is the hard label


def test_masked_classes_minus_inf_bias(tdevice):
    """A bias of -inf masks classes: they carry no mass and enter the top-k last (in class order)."""
    h, w, b = _random(4, 5, 20, dtype=torch.float64, seed=9, device=tdevice)
    b[::2] = -math.inf
    for k, tile in ((3, 6), (15, 6), (20, None)):
        res = _run(h, w, b, k, 2.0, tile)
        _check_shapes(res, 4, k, torch.float64)
        r_idx, r_val, r_lse, r_ent, r_cov = reference.teacher_topk(h, w, b, k=k, temperature=2.0)
        assert torch.equal(res.indices, r_idx)
        assert_close(res.logits, r_val)  # -inf where masked
        assert_close(res.lse, r_lse)
        assert_close(res.entropy, r_ent)
        assert_close(res.covered, r_cov)
        _check_covered_range(res)


def test_row_of_minus_inf_logits_agrees_with_the_reference(tdevice):
    """A row whose logits are all -inf has no softmax: lse -inf, NaN entropy and covered, in the
    op and in the reference (which used to read its NaN probabilities as 0: entropy -0.0)."""
    h, w, b = _random(3, 4, 9, dtype=torch.float64, seed=10, device=tdevice)
    w[:, 0] = -w[:, 0].abs() - 0.1  # every class's first weight < 0 ...
    h[1, 0] = math.inf  # ... so row 1's logits are all -inf; rows 0 and 2 stay finite
    res = _run(h, w, b, 3, 1.0, 4)
    _, _, r_lse, r_ent, r_cov = reference.teacher_topk(h, w, b, k=3, temperature=1.0)
    assert r_lse[1] == -math.inf and r_ent[1].isnan() and r_cov[1].isnan()
    assert_close(res.lse, r_lse)
    assert_close(res.entropy, r_ent, equal_nan=True)
    assert_close(res.covered, r_cov, equal_nan=True)


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_half_precision_inputs(dtype, bias, tdevice, cpu_bf16_gemm):
    """bf16/fp16 inputs against float64 on the same rounded inputs; float32 outputs."""
    h, w, b = _random(16, 64, 3001, dtype=dtype, bias=bias, seed=10, scale=5.0, device=tdevice)
    for k, T, tile in ((1, 1.0, None), (32, 0.5, 100), (32, 3.0, 1000)):
        res = _run(h, w, b, k, T, tile)
        assert res.logits.dtype == torch.float32
        # near ties (float64 logits closer than 4x the float32 GEMM error) are compared by value
        frac = _check_against_full_logits(res, h, w, b, k, T, all_resolved=False, min_resolved=0.9)
        assert frac >= 0.9


def test_float32_with_tf32_allowed(tdevice, set_tf32):
    """float32 with torch.backends.cuda.matmul.allow_tf32 on (CUDA's fused kernel then multiplies
    in tf32): the classes chosen carry the k largest float64 logits rank by rank and their
    logits, lse and entropy are within tf32's error (inputs rounded by up to 2^-11: 2^-9 of
    sum |h w|); covered within as much."""
    set_tf32(True)
    h, w, b = _random(40, 100, 1500, dtype=torch.float32, seed=16, scale=4.0, device=tdevice)
    res = _run(h, w, b, 24, 1.5)
    _check_shapes(res, 40, 24, torch.float32)
    logits, _, values, lse, entropy, covered = _oracle(h, w, b, 24, 1.5)
    tol = 2.0**-9 * F.linear(h.double().abs(), w.double().abs(), b.double().abs()).max().item()
    assert all(len(set(row)) == 24 for row in res.indices.tolist())
    picked = logits.gather(-1, res.indices)
    assert_close(picked, values, rtol=0, atol=tol)
    assert_close(res.logits.double(), picked, rtol=0, atol=tol)
    assert_close(res.lse.double(), lse, rtol=0, atol=tol)
    assert_close(res.entropy.double(), entropy, rtol=0, atol=tol)
    assert_close(res.covered.double(), covered, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_non_contiguous_inputs(dtype, layout, tdevice, cpu_bf16_gemm):
    """Non-contiguous hidden/weight/bias give bit-for-bit the result of their contiguous copies."""
    B, d, V = 6, 10, 333
    h, w, b = _random(B, d, V, dtype=dtype, seed=11, scale=3.0, device=tdevice)
    if layout == "transposed":
        hn, wn, bn = h.t().contiguous().t(), w.t().contiguous().t(), b
    elif layout == "strided":
        hn = torch.zeros(B, 2 * d, dtype=dtype, device=tdevice)[:, ::2]
        hn.copy_(h)
        wn = torch.zeros(2 * V, d + 3, dtype=dtype, device=tdevice)[::2, 1 : d + 1]
        wn.copy_(w)
        bn = torch.zeros(3 * V, dtype=dtype, device=tdevice)[::3]
        bn.copy_(b)
    else:  # a stride-0 bias and hidden rows broadcast from one
        hn, h = h[:1].expand(B, d), h[:1].expand(B, d).contiguous()
        wn, bn = w, b[:1].expand(V)
        b = bn.contiguous()
    assert not (hn.is_contiguous() and wn.is_contiguous() and bn.is_contiguous())
    for k, tile in ((5, 64), (40, None)):
        _assert_equal_results(_run(hn, wn, bn, k, 1.5, tile), _run(h, w, b, k, 1.5, tile))
    if dtype == torch.float32:
        _check_against_full_logits(_run(hn, wn, bn, 5, 1.5, 64), h, w, b, 5, 1.5)


# ----------------------------------------------------------------------------- determinism


def test_deterministic_across_calls(tdevice):
    h, w, b = _random(12, 48, 9001, dtype=torch.float32, seed=12, scale=6.0, device=tdevice)
    first = _run(h, w, b, 32, 2.0, 128)
    for _ in range(3):
        _assert_equal_results(_run(h, w, b, 32, 2.0, 128), first)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_dtype_id)
def test_independent_of_tile_size(dtype, tdevice):
    """Random data: the same indices for every tile size; values equal up to rounding (a tile's GEMM
    may round differently from another shape's, and lse sums in another order)."""
    h, w, b = _random(6, 40, 4003, dtype=dtype, seed=15, scale=6.0, device=tdevice)
    base = _run(h, w, b, 16, 1.0, 4003)  # one tile
    # precondition: no two of the top 17 logits within twice the GEMM error (either computation's
    # error is below it), so the indices cannot depend on rounding
    margin = 2 * _gemm_error_bound(h, w, b, _acc_dtype(dtype))
    assert bool(_resolved_ranks(_logits64(h, w, b), 17, margin).all())
    eps = torch.finfo(_acc_dtype(dtype)).eps
    tol = {"rtol": 64 * eps, "atol": 64 * eps}
    for tile in (1, 7, 64, 500, 4002, 10**6, None):
        res = _run(h, w, b, 16, 1.0, tile)
        assert torch.equal(res.indices, base.indices), tile
        for name in ("logits", "lse", "entropy", "covered"):
            assert_close(getattr(res, name), getattr(base, name), **tol, msg=f"{name}, tile {tile}")


def test_independent_of_tile_size_exact_data(tdevice):
    """Exact (grid) data with ties: indices and top-k logits bit-equal for every tile size."""
    h, w, b = _grid(8, 13, 1031, dtype=torch.float32, seed=14, device=tdevice)
    base = _run(h, w, b, 64, 1.0, 1031)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    for tile in (1, 2, 7, 64, 1000, 1030, 4096, None):
        _assert_equal_results(_run(h, w, b, 64, 1.0, tile), base, stats_tol=tol)


def test_independent_of_thread_count():
    """One thread and several: the same indices; values equal up to summation order. (CPU only:
    the thread count does not reach the CUDA kernels.)"""
    h, w, b = _random(8, 32, 6007, dtype=torch.float32, seed=15, scale=6.0, device="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(h, w, b, 16, 1.0, 100)
        torch.set_num_threads(max(threads, 2))
        many = _run(h, w, b, 16, 1.0, 100)
        again = _run(h, w, b, 16, 1.0, 100)
    finally:
        torch.set_num_threads(threads)
    _assert_equal_results(many, again)
    _assert_equal_results(many, one, stats_tol={"rtol": 1e-5, "atol": 1e-6})


# ----------------------------------------------------------------------------- NaN


def test_nan_row_does_not_crash_and_stays_in_its_row(tdevice):
    """A NaN hidden row: no crash, other rows unchanged, and the row's statistics are NaN (like
    ``torch.logsumexp``), not a number that looks valid."""
    h, w, b = _random(5, 8, 300, dtype=torch.float32, seed=16, device=tdevice)
    clean = _run(h, w, b, 4, 1.0, 64)
    h_nan = h.clone()
    h_nan[2] = math.nan
    for tile in (None, 64, 7):
        res = _run(h_nan, w, b, 4, 1.0, tile)
        _check_shapes(res, 5, 4, torch.float32)
        keep = torch.tensor([0, 1, 3, 4])
        clean_t = _run(h, w, b, 4, 1.0, tile)
        assert torch.equal(res.indices[keep], clean_t.indices[keep])
        for name in ("logits", "lse", "entropy", "covered"):
            assert torch.equal(getattr(res, name)[keep], getattr(clean_t, name)[keep]), name
        assert ((res.indices[2] >= 0) & (res.indices[2] < 300)).all()
        assert res.logits[2].isnan().all()
        for name in ("lse", "entropy", "covered"):
            assert getattr(res, name)[2].isnan(), f"{name} of the NaN row is {getattr(res, name)[2].item()}, not NaN"
    assert torch.isfinite(clean.lse).all()


def _nan_class_problem(nan_class, device):
    """One class with a NaN logit in every row: a NaN bias entry."""
    h, w, b = _random(4, 8, 300, dtype=torch.float64, seed=17, device=device)
    b[nan_class] = math.nan
    return h, w, b


@pytest.mark.parametrize("nan_class", [0, 5, 299])
@pytest.mark.parametrize("tile", [None, 64, 7], ids=lambda t: f"tile{t}")
def test_nan_logit_statistics_are_nan(nan_class, tile, tdevice):
    """A NaN logit makes lse, entropy and covered NaN (like ``torch.logsumexp``) wherever the NaN
    class sits and whatever the tile size: never a finite or infinite value that looks valid."""
    h, w, b = _nan_class_problem(nan_class, tdevice)
    res = _run(h, w, b, 3, 1.0, tile)
    _check_shapes(res, 4, 3, torch.float64)
    assert torch.logsumexp(_logits64(h, w, b), dim=-1).isnan().all()
    for name in ("lse", "entropy", "covered"):
        assert getattr(res, name).isnan().all(), f"{name} = {getattr(res, name).tolist()}, expected NaN"


@pytest.mark.parametrize("nan_class", [0, 5, 299])
@pytest.mark.parametrize("tile", [None, 64, 7], ids=lambda t: f"tile{t}")
def test_nan_logit_does_not_corrupt_the_selection(nan_class, tile, tdevice):
    """Besides the NaN class (which ``torch.topk`` and the reference rank first; the op may rank it
    first or leave it out), the op's indices are the largest finite logits in order, wherever the
    NaN class sits and whatever the tile size."""
    h, w, b = _nan_class_problem(nan_class, tdevice)
    k = 3
    res = _run(h, w, b, k, 1.0, tile)
    logits = _logits64(h, w, b)
    finite_order = reference.teacher_topk(h, w, b.nan_to_num(nan=-math.inf), k=w.shape[0])[0]
    for i in range(h.shape[0]):
        chosen = [j for j in res.indices[i].tolist() if not math.isnan(logits[i, j])]
        assert len(chosen) >= k - 1
        expected = [j for j in finite_order[i].tolist() if j != nan_class][: len(chosen)]
        assert chosen == expected, f"row {i}: indices {res.indices[i].tolist()}, finite top-k {expected}"


# ----------------------------------------------------------------------------- autograd


def test_inputs_requiring_grad_give_outputs_without_grad(tdevice):
    h, w, b = _random(4, 6, 50, dtype=torch.float64, seed=18, device=tdevice)
    h, w, b = (t.requires_grad_(True) for t in (h, w, b))
    res = _run(h, w, b, 5, 2.0, 16)
    for name in TOPK_TENSOR_FIELDS:
        t = getattr(res, name)
        assert not t.requires_grad and t.grad_fn is None, name
    expected = _run(h.detach(), w.detach(), b.detach(), 5, 2.0, 16)
    _assert_equal_results(res, expected)


def test_raw_op_outputs_do_not_require_grad(tdevice):
    """The raw op is not differentiable (labels are data), so its outputs must not require grad
    either. Without a kernel at an Autograd key, torch's autograd fallback (mode "warn") marks the
    float outputs as requiring grad, with a backward that only warns and returns no gradient."""
    h, w, b = _random(4, 6, 50, dtype=torch.float64, seed=18, device=tdevice)
    h, w, b = (t.requires_grad_(True) for t in (h, w, b))
    outs = OP(h, w, b, 5, 2.0, 16)
    assert [t.requires_grad for t in outs] == [False] * 5


# ----------------------------------------------------------------------------- opcheck and compile


@pytest.mark.parametrize(
    "case", ["float64_bias", "float32_no_bias", "bfloat16_bias", "empty_batch", "k_equals_V"]
)
def test_opcheck(case, tdevice):
    """``torch.library.opcheck`` on the raw op: schema, fake kernel, AOT dispatch (dynamic shapes).

    The op has no autograd, so the inputs do not require grad. With such inputs opcheck's
    ``test_autograd_registration`` returns at once without checking anything (torch's
    ``safe_autograd_registration_check`` skips when no input requires grad), so it need not be
    excluded; with inputs that require grad it would pass too (the kernel makes no outputs that
    require grad under the "nothing" fallback it sets), but ``test_aot_dispatch_dynamic`` would
    then try to differentiate the outputs — see test_raw_op_outputs_do_not_require_grad.
    """
    dtype, bias, B, V, k, tile = {
        "float64_bias": (torch.float64, True, 5, 41, 4, 8),
        "float32_no_bias": (torch.float32, False, 3, 29, 7, 0),
        "bfloat16_bias": (torch.bfloat16, True, 4, 33, 3, 5),
        "empty_batch": (torch.float32, True, 0, 20, 2, 0),
        "k_equals_V": (torch.float64, False, 3, 9, 9, 4),
    }[case]
    h, w, b = _random(B, 6, V, dtype=dtype, bias=bias, seed=19, device=tdevice)
    args = (h, w, b, k, 1.5, tile)
    result = torch.library.opcheck(OP, args)
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result
    outs = OP(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for real, f in zip(outs, fake):
        assert real.shape == f.shape and real.dtype == f.dtype


def test_torch_compile_fullgraph(tdevice):
    torch._dynamo.reset()

    def label(h, w, b):
        res = kdfast.teacher_topk(h, w, b, k=6, temperature=2.0, tile_size=16)
        return res.indices, res.logits, res.lse, res.entropy, res.covered

    compiled = torch.compile(label, fullgraph=True, backend="inductor")
    h, w, b = _random(5, 12, 100, dtype=torch.float32, seed=20, device=tdevice)
    got = TopK(*compiled(h, w, b))
    expected = TopK(*label(h, w, b))
    _assert_equal_results(got, expected)
    _check_against_full_logits(got, h, w, b, 6, 2.0)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    h, w, b = _random(3, 4, 10, dtype=torch.float32, seed=21)
    return {
        "k_zero": ((h, w, b), {"k": 0}, ValueError, r"\bk must be in \[1, V = 10\], got 0"),
        "k_negative": ((h, w, b), {"k": -3}, ValueError, r"\bk must be in \[1, V = 10\]"),
        "k_above_V": ((h, w, b), {"k": 11}, ValueError, r"\bk must be in \[1, V = 10\], got 11"),
        "k_float": ((h, w, b), {"k": 2.0}, TypeError, r"\bk must be an int"),
        "k_bool": ((h, w, b), {"k": True}, TypeError, r"\bk must be an int"),
        "k_tensor": ((h, w, b), {"k": torch.tensor(2)}, TypeError, r"\bk must be an int"),
        "d_mismatch": ((h, torch.randn(10, 5), b), {"k": 2}, ValueError, r"weight must have shape \[V, d\] with d = 4"),
        "weight_1d": ((h, torch.randn(10), b), {"k": 2}, ValueError, r"weight must have shape"),
        "weight_dtype": ((h, w.double(), b), {"k": 2}, TypeError, r"weight has dtype torch.float64"),
        "weight_bf16": ((h, w.bfloat16(), b), {"k": 2}, TypeError, r"weight has dtype torch.bfloat16"),
        "bias_shape": ((h, w, torch.randn(9)), {"k": 2}, ValueError, r"bias must have shape \[V\] = \[10\]"),
        "bias_2d": ((h, w, b[None]), {"k": 2}, ValueError, r"bias must have shape"),
        "bias_dtype": ((h, w, b.double()), {"k": 2}, TypeError, r"bias has dtype torch.float64"),
        "temperature_zero": ((h, w, b), {"k": 2, "temperature": 0.0}, ValueError, r"temperature must be > 0"),
        "temperature_negative": ((h, w, b), {"k": 2, "temperature": -1.0}, ValueError, r"temperature must be > 0"),
        "temperature_nan": ((h, w, b), {"k": 2, "temperature": math.nan}, ValueError, r"temperature must be > 0"),
        "temperature_str": ((h, w, b), {"k": 2, "temperature": "1"}, TypeError, r"temperature must be a real number"),
        "hidden_1d": ((h[0], w, b), {"k": 2}, ValueError, r"hidden must have shape \[B, d\]"),
        "hidden_3d": ((h[None], w, b), {"k": 2}, ValueError, r"hidden must have shape \[B, d\]"),
        "hidden_int": ((h.long(), w.long(), b.long()), {"k": 2}, TypeError, r"hidden must be a floating-point"),
        "hidden_bool": ((h > 0, w, b), {"k": 2}, TypeError, r"hidden must be a floating-point"),
        "hidden_list": ((h.tolist(), w, b), {"k": 2}, TypeError, r"hidden must be a torch.Tensor"),
        "tile_negative": ((h, w, b), {"k": 2, "tile_size": -4}, ValueError,
                          r"tile_size must be an int >= 0 \(0: the default\), got -4"),
        "tile_str": ((h, w, b), {"k": 2, "tile_size": "x"}, TypeError, r"tile_size must be an int >= 0 .*got 'x'"),
        "tile_float": ((h, w, b), {"k": 2, "tile_size": 2.9}, TypeError, r"tile_size must be an int >= 0 .*got 2\.9"),
        "tile_bool": ((h, w, b), {"k": 2, "tile_size": True}, TypeError, r"tile_size must be an int >= 0"),
        "tile_numpy_negative": ((h, w, b), {"k": 2, "tile_size": np.int32(-1)}, ValueError,
                                r"tile_size must be an int >= 0 .*got -1"),
        "k_numpy_bool": ((h, w, b), {"k": np.bool_(True)}, TypeError, r"\bk must be an int"),
        "k_numpy_float": ((h, w, b), {"k": np.float64(2.0)}, TypeError, r"\bk must be an int"),
        "temperature_bool": ((h, w, b), {"k": 2, "temperature": True}, TypeError, r"temperature must be a real number"),
        "temperature_tensor": ((h, w, b), {"k": 2, "temperature": torch.tensor(2.0)}, TypeError,
                               r"temperature must be a real number"),
        "temperature_numpy_zero": ((h, w, b), {"k": 2, "temperature": np.float32(0.0)}, ValueError,
                                   r"temperature must be > 0"),
        # 1/temperature overflows float32 (lse, entropy and covered came out NaN)
        "temperature_below_float32": ((h, w, b), {"k": 2, "temperature": 1e-39}, ValueError,
                                      r"temperature must be in \[2\.9\d*e-39, .*Float accumulation"),
    }


def test_k_above_2048_is_a_cuda_limit(tdevice, runs_cuda_code):
    """k = 2049: the CPU labels it (checked against the full logits); CUDA refuses it by name."""
    h, w, b = _random(2, 4, 2100, dtype=torch.float64, seed=22, device=tdevice)  # float64: no near ties
    if not runs_cuda_code:
        _check_against_full_logits(_run(h, w, b, 2049, 1.0, 512), h, w, b, 2049, 1.0)
    else:
        with pytest.raises(ValueError, match=r"k must be at most 2048 on CUDA, got 2049"):
            _run(h, w, b, 2049)


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_naming_the_argument(case):
    args, kwargs, exception, pattern = _bad_cases()[case]
    with pytest.raises(exception, match=pattern):
        kdfast.teacher_topk(*args, **kwargs)


def test_tiny_temperatures_within_the_accumulation_range():
    """The smallest temperatures whose inverse is finite in the accumulation dtype work: softmax is
    then one-hot on the top logit (entropy 0, covered 1); float64 takes 1e-39, which float32 refuses."""
    h, w, b = _random(3, 4, 10, dtype=torch.float64, seed=23)
    for hh, ww, bb, T in ((h.float(), w.float(), b.float(), 1e-30), (h, w, b, 1e-39)):
        res = kdfast.teacher_topk(hh, ww, bb, k=2, temperature=T)
        top = F.linear(hh.double(), ww.double(), bb.double()).max(-1).values
        assert_close(res.lse.double(), top / T, rtol=1e-6, atol=0)
        assert torch.all(res.entropy == 0) and torch.all(res.covered == 1)


def test_numpy_and_other_integral_or_real_scalars_are_accepted():
    """``k``/``tile_size`` take any integral number and ``temperature`` any real one (numpy scalars
    included), with the same result as the Python int / float."""
    h, w, b = _random(3, 4, 10, dtype=torch.float32, seed=22)
    want = kdfast.teacher_topk(h, w, b, k=2, temperature=2.0, tile_size=3)
    for kw in (
        {"k": np.int64(2), "temperature": 2.0, "tile_size": 3},
        {"k": 2, "temperature": np.float32(2.0), "tile_size": np.uint8(3)},
        {"k": np.int32(2), "temperature": np.float64(2.0), "tile_size": np.int64(3)},
        {"k": 2, "temperature": 2, "tile_size": 3},
    ):
        got = kdfast.teacher_topk(h, w, b, **kw)
        _assert_equal_results(got, want)
        assert type(got.temperature) is float and got.temperature == 2.0
    # 0 and None both mean the default tile size
    _assert_equal_results(kdfast.teacher_topk(h, w, b, k=2, tile_size=0), kdfast.teacher_topk(h, w, b, k=2))
    _assert_equal_results(kdfast.teacher_topk(h, w, b, k=2, tile_size=np.int64(0)), kdfast.teacher_topk(h, w, b, k=2))


@pytest.mark.parametrize(
    "case",
    ["k_zero", "k_above_V", "d_mismatch", "weight_1d", "weight_dtype", "bias_shape", "bias_dtype",
     "temperature_zero", "temperature_negative", "hidden_1d", "hidden_int"],
)
def test_raw_op_rejects_bad_input_too(case):
    """The kernel checks its arguments itself (same error types and messages) when called directly."""
    (h, w, b), kwargs, exception, pattern = _bad_cases()[case]
    # the kernel's messages name the argument the same way (dtypes spelled the ATen way: Double)
    pattern = {
        "weight_dtype": r"weight has dtype Double but hidden has Float",
        "bias_shape": r"bias must have shape \[10\], got \[9\]",
        "bias_dtype": r"bias has dtype Double but hidden has Float",
    }.get(case, pattern)
    with pytest.raises(exception, match=pattern):
        OP(h, w, b, kwargs.get("k", 2), kwargs.get("temperature", 1.0), kwargs.get("tile_size", 0))
