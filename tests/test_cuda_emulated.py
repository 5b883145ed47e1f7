"""Tests of the CUDA emulation itself (tests/cuda_emu): run only under ``KDFAST_CUDA_EMU=1``
(``make test-cuda-emu``), where tests/conftest.py has installed it.

The launch rewriting, the execution model on small kernels of known result (tests/cuda_emu/
selftest.cu), the errors it raises for what a GPU would do wrong or undefined, and that the
CUDA ops now really run the emulated kernels.
"""

from __future__ import annotations

import cuda_emulation as cuda_emu  # on sys.path: tests/conftest.py installed the emulation from it
import pytest
import torch
from test_fused_linear import TERMS, _grad_out, _peaked_problem, _problem, _run_dense, _run_fused

import kdfast
from kdfast import reference

SELFTEST = torch.ops.cuda_emu_selftest


def test_rewrite_launches():
    text = (
        "if (B > 0) init_kernel<acc_t><<<row_blocks(B), kThreads, 0, stream>>>(state, f(B, 2));\n"
        "  ns::plain<<<1, 32>>>();\n"
        "k<Pair<int, float>><<<g, b, 0, s>>>\n    (x);"
    )
    assert cuda_emu.rewrite_launches(text) == (
        "if (B > 0) ::cuda_emu::Launch(row_blocks(B), kThreads, 0, stream).named(\"init_kernel\")"
        ".run(init_kernel<acc_t>, state, f(B, 2));\n"
        "  ::cuda_emu::Launch(1, 32).named(\"plain\").run(ns::plain);\n"
        "::cuda_emu::Launch(g, b, 0, s).named(\"k\").run(k<Pair<int, float>>, x);"
    )
    assert cuda_emu.rewrite_launches("no launch here") == "no launch here"


@pytest.mark.parametrize(
    "text, message",
    [("k<<<1, 32>>>;", "without its arguments"), ("k<<<1, 32(x);", "without its '>>>'"),
     ("k<<<1, 32>>>(x;", "unbalanced"), ("(<<<1, 32>>>(x);", "no kernel name")],
)
def test_rewrite_launches_rejects_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=message):
        cuda_emu.rewrite_launches(text)


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_block_reduction_by_shuffles_and_shared_memory(threads):
    x = torch.randn(7 * threads, generator=torch.Generator().manual_seed(threads))
    sums, partner = SELFTEST.block_sum(x, threads)
    torch.testing.assert_close(sums, x.view(7, threads).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(partner, x.view(-1, 2).flip(1).reshape(-1))  # lane t got lane t ^ 1's value


@pytest.mark.parametrize("shift", [0, 5, 31, 40])
def test_shuffle_by_lane_index_and_ballot(shift):
    x = torch.randn(3 * 64, generator=torch.Generator().manual_seed(shift))
    rotated, ballot = SELFTEST.lane_exchange(x, shift, 64)
    assert torch.equal(rotated, x.view(-1, 32).roll(-(shift % 32), dims=1).reshape(-1))  # lane t: lane t + shift's
    expected = [sum(1 << lane for lane in range(32) if warp[lane] > 0) for warp in x.view(-1, 32).tolist()]
    assert [b & 0xFFFFFFFF for b in ballot.tolist()] == expected


def test_barrier_not_reached_by_every_thread_is_an_error():
    with pytest.raises(RuntimeError, match=r"__syncthreads not reached by every thread: 32 of 64 threads"):
        SELFTEST.divergent_barrier(64)
    # the error is taken by the check that raised it: the next launch is clean
    SELFTEST.block_sum(torch.ones(64), 32)


@pytest.mark.parametrize("threads", [0, 2048])
def test_bad_launch_configuration_is_an_error(threads):
    with pytest.raises(RuntimeError, match=r"invalid launch configuration: grid \(1,1,1\) block"):
        SELFTEST.racy_write(threads)


def test_a_race_between_sync_points_moves_with_the_seed():
    """The threads' order between two sync points is shuffled by seed: a kernel whose result
    depends on it gives different results for different seeds, the same for the same seed."""
    results = []
    for seed in range(8):
        cuda_emu.set_seed(seed)
        results.append(SELFTEST.racy_write(64))
    assert len(set(results)) >= 4, results
    cuda_emu.set_seed(3)
    assert SELFTEST.racy_write(64) == results[3]
    cuda_emu.set_seed(1)


def test_rewrite_dynamic_shared():
    assert cuda_emu.rewrite_dynamic_shared("  extern __shared__ __align__(128) unsigned char smem[];") == (
        "  unsigned char* smem = static_cast<unsigned char*>(::cuda_emu::dynamic_shared());"
    )
    assert cuda_emu.rewrite_dynamic_shared("extern __shared__ float buf[ ];") == (
        "float* buf = static_cast<float*>(::cuda_emu::dynamic_shared());"
    )
    assert cuda_emu.rewrite_dynamic_shared("__shared__ float fixed[32];") == "__shared__ float fixed[32];"


def _bf16_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 16, generator=g).bfloat16(), torch.randn(16, 16, generator=g).bfloat16()


def test_tensor_core_product_in_dynamic_shared_memory():
    """wmma's load, mma and store in dynamic shared memory: the float product of the bf16 inputs."""
    a, b = _bf16_pair()
    c, total = SELFTEST.wmma_product(a, b, True, 2048, 0)
    expected = a.double() @ b.double()  # bf16 products are exact; float sums, in some order
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(total.double(), expected.sum(), rtol=1e-5, atol=1e-4)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to tf32: to nearest on the 13 low mantissa bits, ties away from zero."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_tensor_core_product():
    """wmma's 16 x 16 x 8 tf32 shape: __float_to_tf32 rounds to nearest (ties away from zero, the
    halfway cases included here), the product is that of the rounded inputs, summed in float."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    a[0, 0] = 1.0 + 2.0**-11  # halfway between two tf32 values: rounds up (away from zero)
    a[0, 1] = -(1.0 + 2.0**-11)
    a[0, 2] = 1.0 + 2.0**-11 - 2.0**-23  # just below halfway: rounds down
    c = SELFTEST.tf32_product(a, b)
    assert _tf32(a[0, :3]).tolist() == [1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1.0]
    expected = _tf32(a).double() @ _tf32(b).double()  # the products are exact in float
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)  # rounding happened


def test_dynamic_shared_memory_over_48k_needs_the_opt_in():
    a, b = _bf16_pair()
    with pytest.raises(RuntimeError, match=r"asks for 65536 bytes of dynamic shared memory, over the 49152"):
        SELFTEST.wmma_product(a, b, True, 65536, 0)
    c, _ = SELFTEST.wmma_product(a, b, True, 65536, 65536)  # opted in
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
    # past what sm_80 has (163 KiB), the opt-in itself is refused, so the launch fails
    with pytest.raises(RuntimeError, match=r"asks for 204800 bytes"):
        SELFTEST.wmma_product(a, b, True, 200 * 1024, 200 * 1024)


def test_reading_other_lanes_elements_without_syncwarp_moves_with_the_seed():
    """An accumulator's elements are stored by their own lanes: lane 0 summing the stored tile
    without a __syncwarp sees some of them still 0, how many depending on the lanes' order."""
    a, b = _bf16_pair()
    synced, racy = set(), set()
    for seed in range(8):
        cuda_emu.set_seed(seed)
        synced.add(SELFTEST.wmma_product(a, b, True, 2048, 0)[1].item())
        racy.add(SELFTEST.wmma_product(a, b, False, 2048, 0)[1].item())
    cuda_emu.set_seed(1)
    assert len(synced) == 1
    assert len(racy) >= 4, racy


def _fused_and_tiled(run, monkeypatch):
    """run()'s results from the fused kernels and from the tiled cuBLAS-style path, checking which
    path ran by the GEMMs it called."""
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("KDFAST_CUDA_FUSED", fused)
        out, gemms = _tile_gemms(run)
        assert (gemms > 0) == (fused == "0"), f"KDFAST_CUDA_FUSED={fused}: {gemms} GEMMs"
        results.append(out)
    return results


@pytest.mark.parametrize(
    "form, term",
    [("none", "hard_smoothed")] + [(f, t) for f in ("dense", "linear", "topk") for t in ("combined", "combined_one_minus_prob")],
)
@pytest.mark.parametrize("B, V, d, d_t, max_splits", [(70, 300, 24, 40, None), (300, 1000, 13, 37, None),
                                                    (300, 1000, 13, 37, 3)])
def test_fused_kernels_match_the_tiled_path(form, term, B, V, d, d_t, max_splits, monkeypatch):
    """bf16, every term, multi-label targets: the fused kernels (tensor-core tiles in shared memory)
    give the tiled path's loss and gradients, and call no GEMM (for one_minus_prob weights, the
    teacher's log-partition is fused too). B = 70 (two row blocks, the second partial: two row
    groups of the forward's grid), V = 300 (three class tiles, the last partial), d = 24 and
    d_t = 40 (padded to 32 and staged in a chunk of 64; rows copied 16 bytes at a time), k = 7.
    B = 300, V = 1000: eight class splits by five row groups in the forward's grid; d = 13 and
    d_t = 37 (rows copied element by element); with KDFAST_CUDA_MAX_SPLITS=3, three splits of
    two or three class tiles each (the forward folds each tile into the states the split's
    previous tile left, as at a large V). Both sum in float, in different orders, and round
    dL/df and the outputs to bf16."""
    if max_splits:
        monkeypatch.setenv("KDFAST_CUDA_MAX_SPLITS", str(max_splits))
    p = _problem(B, d, V, seed=41, form="dense" if form == "none" else form, target_kind="multi",
                 dtype=torch.bfloat16, d_t=d_t, k=7)
    kwargs = dict(TERMS[term], reduction="none")
    (loss, grads), (loss_t, grads_t) = _fused_and_tiled(
        lambda: _run_fused(p, kwargs, _grad_out(p, "none"), exact=True), monkeypatch
    )
    torch.testing.assert_close(loss.float(), loss_t.float(), rtol=2**-7, atol=0)  # one bf16 rounding
    for name, g, g_t in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads_t):
        scale = g_t.float().abs().max().item()
        torch.testing.assert_close(g.float(), g_t.float(), rtol=2**-7, atol=2**-9 * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("form, term", [("none", "hard_smoothed"), ("linear", "combined"), ("dense", "soft")])
@pytest.mark.parametrize("upstream", [1.0, 2.0**-14], ids=["upstream_1", "upstream_2^-14"])
def test_fused_fp16_backward_keeps_small_gradient_entries(form, term, upstream, monkeypatch):
    """fp16, mean reduction over B = 300, V = 1000: the background entries of dL/df (~1/(B V),
    times the upstream gradient) are below fp16's normal range (6e-5), most of them below its
    smallest subnormal at upstream 2^-14. The fused backward scales each dL/df tile by a power of
    two before rounding it to fp16, so its gradients' error against float64 stays within twice
    the tiled path's (float dL/df and GEMMs) plus one fp16 rounding of the output. Rounding the
    unscaled tile instead fails this at upstream 2^-14 (checked by hand: grad_hidden's error
    6-14x the tiled path's)."""
    p = _problem(300, 13, 1000, seed=47, form="dense" if form == "none" else form, target_kind="int",
                 dtype=torch.float16, d_t=37, k=7)
    kwargs = dict(TERMS[term], reduction="none")
    g = torch.full((p.B,), upstream / p.B, dtype=torch.float16)
    (_, grads), (_, grads_t) = _fused_and_tiled(lambda: _run_fused(p, kwargs, g, exact=True), monkeypatch)
    _, exact = _run_dense(reference.distillation_loss, p, kwargs, g.double(), torch.float64)
    for name, got, tiled, want in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads_t, exact):
        half_ulp = 2.0**-11 * want.abs().max().item()
        err, err_t = ((x.double() - want).abs().max().item() for x in (got, tiled))
        assert err <= 2 * err_t + half_ulp, f"{name}: fused {err:.3g} > 2 x tiled {err_t:.3g} + half ulp {half_ulp:.3g}"


def _gemm_calls(fn):
    """(fn's result, how many float GEMMs (aten::mm / addmm) it called)."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::mm_out"))


@pytest.mark.parametrize("form, term", [("none", "hard_smoothed"), ("linear", "combined_one_minus_prob"),
                                        ("topk", "combined")])
def test_float32_takes_the_fused_kernels_only_with_tf32_allowed(form, term, set_tf32):
    """float32 with allow_tf32: the fused kernels (tf32 WMMA, no GEMM called), within tf32's error
    of the exact float32 path, which the default (allow_tf32 off) takes with its float32 GEMMs.
    The top-k op the same way. (d = 24, d_t = 40: the float layout's teacher chunks of 32.)"""
    p = _problem(70, 24, 300, seed=44, form="dense" if form == "none" else form, target_kind="multi",
                 dtype=torch.float32, d_t=40, k=7)
    kwargs = dict(TERMS[term], reduction="none")
    results = []
    for tf32 in (True, False):
        set_tf32(tf32)
        (loss, grads), gemms = _gemm_calls(lambda: _run_fused(p, kwargs, _grad_out(p, "none"), exact=True))
        assert (gemms == 0) == tf32, f"allow_tf32={tf32}: {gemms} GEMMs"
        results.append((loss, grads))
    (loss, grads), (loss_x, grads_x) = results
    for got, want in zip((loss,) + grads, (loss_x,) + grads_x):
        torch.testing.assert_close(got, want, rtol=0, atol=2.0**-8 * want.abs().max().item())
    h, w = p.teacher_kwargs().get("teacher_hidden", p.hidden), p.teacher_kwargs().get("teacher_weight", p.weight)
    labels = []
    for tf32 in (True, False):
        set_tf32(tf32)
        res, gemms = _gemm_calls(lambda: kdfast.teacher_topk(h, w, None, k=5))
        assert (gemms == 0) == tf32, f"teacher_topk, allow_tf32={tf32}: {gemms} GEMMs"
        labels.append(res)
    scale = (h.abs() @ w.abs().T).max().item()
    torch.testing.assert_close(labels[0].lse, labels[1].lse, rtol=0, atol=2.0**-9 * scale)


def _tile_gemms(fn):
    """(fn's result, how many GEMMs of the tiled path it called: float ones and bf16/fp16 ones)."""
    before = cuda_emu.mixed_mm_calls()
    out, gemms = _gemm_calls(fn)
    return out, gemms + cuda_emu.mixed_mm_calls() - before


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "tf32"])
@pytest.mark.parametrize("form", ["none", "dense", "linear", "topk"])
@pytest.mark.parametrize("d", [64, 72, 80, 112, 128])
def test_forward_and_backward_take_the_same_path(dtype, form, d, set_tf32):
    """A forward takes the fused kernels exactly where its backward does. The backward's layout is
    the larger (its gradient tile), so for float with TF32 nine of these cases took the fused
    forward and the tiled backward, whose logits (cuBLAS's products on a GPU, exact float32 here)
    then met the forward's log-partitions of tf32 logits. Found by fuzzing: a hard CE at B = 2,
    d = 128, V = 300 had grad_hidden 3.4e-3 (of its largest entry) from float64, against 5.4e-4
    for tf32 products in both directions (a float64 simulation) and 2.6e-7 for the tiled path."""
    set_tf32(dtype == "tf32")
    torch_dtype = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
    p = _problem(70, d, 300, seed=45, form="dense" if form == "none" else form, target_kind="multi",
                 dtype=torch_dtype, d_t=40, k=7)
    kwargs = TERMS["hard" if form == "none" else "combined"]
    h, w = p.hidden.clone().requires_grad_(), p.weight.clone().requires_grad_()
    teacher = p.teacher_kwargs() if form != "none" else {}
    loss, forward_gemms = _tile_gemms(lambda: kdfast.fused_linear_distillation_loss(
        h, w, p.target, student_bias=p.bias, reduction="sum", exact=True, **teacher, **kwargs))
    _, backward_gemms = _tile_gemms(lambda: loss.backward())
    assert (forward_gemms == 0) == (backward_gemms == 0), f"forward {forward_gemms}, backward {backward_gemms} GEMMs"
    # bf16 and fp16 take the fused kernels at every d <= 128; float (tf32, tiles of twice the bytes)
    # up to d = 112, or 64 with a teacher (README, kdfast/fused.py)
    fused_up_to = 128 if dtype != "tf32" else 112 if form == "none" else 64
    assert (forward_gemms == 0) == (d <= fused_up_to), f"forward {forward_gemms} GEMMs at d = {d}"


@pytest.mark.parametrize("seed", range(32))
def test_fused_kernels_match_the_tiled_path_on_random_cases(seed, monkeypatch, set_tf32):
    """Random configurations (seeded): dtype (bf16, fp16, float with TF32), B, V, d and d_t across
    the tiles' edges, teacher form, target kind, terms, reduction, bias, exact or filtered, class
    splits. The fused kernels give the tiled path's loss and gradients within one rounding of the
    inputs' precision (tf32: 5e-3) relative, or 2^-9 of the largest entry (filtered: 2^-6, a few
    skipped entries of filter_eps each). Fuzzing this way (1,400 cases) found the TF32 forward
    that took the fused kernels over a tiled backward (test_forward_and_backward_take_the_same_path)."""
    import random

    r = random.Random(seed)
    dtype = r.choice(["bfloat16", "float16", "tf32"])
    B, V, d = r.choice([1, 5, 64, 65, 130]), r.choice([2, 17, 128, 129, 300]), r.choice([1, 7, 16, 33, 64, 100, 128])
    form = r.choice(["none", "dense", "linear", "topk"])
    if dtype == "tf32":  # where float takes the fused kernels
        d = min(d, 112 if form == "none" else 64)
    target_kind = r.choice(["int", "multi"])
    term = "hard" if form == "none" else r.choice(sorted(TERMS))
    reduction = r.choice(["none", "sum", "mean"])
    exact = r.random() < 0.7
    splits = r.choice([None, 1, 2, 3])
    if splits:
        monkeypatch.setenv("KDFAST_CUDA_MAX_SPLITS", str(splits))
    set_tf32(dtype == "tf32")
    p = _problem(B, d, V, seed=1000 + seed, form="dense" if form == "none" else form, target_kind=target_kind,
                 bias=r.random() < 0.5, dtype=torch.float32 if dtype == "tf32" else getattr(torch, dtype),
                 d_t=r.choice([d + 1, 9, 40, 65, 130]), k=r.randint(1, min(V, 64)), scale=r.choice([1.0, 2.0, 6.0]),
                 ignore=tuple(r.sample(range(B), min(B, r.randint(0, 3)))), teacher_bias=r.random() < 0.5)
    if form == "none":
        p.form, p.teacher = None, None
    kwargs = dict(TERMS[term], reduction=reduction)
    (loss, grads), (loss_t, grads_t) = _fused_and_tiled(
        lambda: _run_fused(p, kwargs, _grad_out(p, reduction), exact=exact), monkeypatch
    )
    rtol = 5e-3 if dtype == "tf32" else 2**-7

    def largest(x):
        return x.float().nan_to_num(0, 0, 0).abs().max().item() if x.numel() else 0.0

    torch.testing.assert_close(loss.float(), loss_t.float(), rtol=rtol, atol=2**-9 * largest(loss_t), equal_nan=True)
    for name, g, g_t in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads_t):
        if g_t is None:
            continue
        atol = (2**-9 if exact else 2**-6) * largest(g_t)
        torch.testing.assert_close(g.float(), g_t.float(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", ["peaked_hard_filtered", "linear_one_minus_prob", "topk_combined", "tf32_linear"])
def test_fused_kernels_do_not_depend_on_the_threads_order(case, monkeypatch, set_tf32):
    """The fused kernels under four orders of the emulated threads (seeds) give bit-identical
    results: no result depends on a race between sync points (a missing __syncthreads or
    __syncwarp moves it, as test_reading_other_lanes_elements_without_syncwarp_moves_with_the_seed
    shows). The peaked case (each row's target logit far above the rest) has the gradient filter
    skip most class groups, so the flags that decide it are set by a few warps only."""
    monkeypatch.setenv("KDFAST_CUDA_FUSED", "1")
    if case == "peaked_hard_filtered":
        p = _peaked_problem(torch.bfloat16, "cpu")
        kwargs, extra = {"reduction": "none"}, {"exact": False, "filter_eps": 1e-3, "tile_size": 64}
    elif case == "tf32_linear":
        set_tf32(True)
        p = _problem(70, 24, 300, seed=43, form="linear", target_kind="multi", dtype=torch.float32, d_t=40)
        kwargs, extra = dict(TERMS["combined_one_minus_prob"], reduction="none"), {"exact": True}
    else:
        form, term = case.split("_", 1)
        p = _problem(70, 24, 300, seed=43, form=form, target_kind="multi", dtype=torch.bfloat16, d_t=40, k=7)
        kwargs = dict(TERMS["combined" if term == "combined" else "combined_one_minus_prob"], reduction="none")
        extra = {"exact": True}
    runs = []
    for seed in range(2, 6):
        cuda_emu.set_seed(seed)
        runs.append(_run_fused(p, kwargs, _grad_out(p, "none"), **extra))
    cuda_emu.set_seed(1)
    (loss, grads), rest = runs[0], runs[1:]
    for other_loss, other_grads in rest:
        assert torch.equal(loss, other_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))


def _grid_teacher(B, d, V, dtype, *, seed):
    """Teacher inputs on a coarse integer grid: every logit exact in bf16 x bf16 -> float sums
    (whatever their order), so the paths must agree bit for bit; ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (B, d), generator=g).to(dtype)
    w = torch.randint(-2, 3, (V, d), generator=g).to(dtype)
    b = torch.randint(-3, 4, (V,), generator=g).to(dtype)
    return h, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B, V, d, k, max_splits",
    [
        (70, 300, 40, 7, None),  # 3 class tiles (the last partial), 3 splits x 2 row groups; d padded to 64
        (150, 1000, 100, 150, 3),  # 8 tiles in 3 splits (lists carried across tiles); d in 2 chunks; k > a tile
        (5, 130, 64, 130, None),  # k = V: every class in the list
    ],
)
def test_fused_topk_matches_the_tiled_path_and_the_reference(dtype, B, V, d, k, max_splits, monkeypatch):
    """The fused top-k kernel (logits made in shared memory, a list per row and class split,
    then the splits merged) against the tiled path and kdfast.reference on grid data: indices
    and logits bit-equal, ties to the lower class across tiles and splits; a NaN row (every
    logit NaN: the first k classes, lse NaN) and the rest of the statistics as the tiled path's."""
    if max_splits:
        monkeypatch.setenv("KDFAST_CUDA_MAX_SPLITS", str(max_splits))
    h, w, b = _grid_teacher(B, d, V, dtype, seed=B)
    h[1, 0] = float("nan")
    T = 1.5
    fused, tiled = _fused_and_tiled(lambda: kdfast.teacher_topk(h, w, b, k=k, temperature=T), monkeypatch)
    assert torch.equal(fused.indices, tiled.indices)
    assert torch.equal(fused.logits.isnan(), tiled.logits.isnan())
    assert torch.equal(fused.logits.nan_to_num(), tiled.logits.nan_to_num())
    assert torch.equal(fused.indices[1], torch.arange(k)) and bool(fused.lse[1].isnan())
    for name in ("lse", "entropy", "covered"):
        torch.testing.assert_close(getattr(fused, name), getattr(tiled, name), rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    rows = [i for i in range(B) if i != 1]
    r_idx, r_val, r_lse, _, _ = reference.teacher_topk(h[rows].double(), w.double(), b.double(), k=k, temperature=T)
    assert torch.equal(fused.indices[rows], r_idx)
    assert torch.equal(fused.logits[rows].double(), r_val)
    torch.testing.assert_close(fused.lse[rows].double(), r_lse, rtol=1e-5, atol=1e-6)


def test_fused_topk_does_not_depend_on_the_threads_order(monkeypatch):
    """Bit-identical results under four orders of the emulated threads (as the loss kernels')."""
    monkeypatch.setenv("KDFAST_CUDA_FUSED", "1")
    monkeypatch.setenv("KDFAST_CUDA_MAX_SPLITS", "2")
    h, w, b = _grid_teacher(70, 40, 300, torch.bfloat16, seed=3)
    runs = []
    for seed in range(2, 6):
        cuda_emu.set_seed(seed)
        runs.append(kdfast.teacher_topk(h, w, b, k=40, temperature=0.7))
    cuda_emu.set_seed(1)
    for other in runs[1:]:
        for name in ("indices", "logits", "lse", "entropy", "covered"):
            assert torch.equal(getattr(runs[0], name), getattr(other, name)), name


def _call_each_cuda_op():
    """(op name, a call of that op alone), for every op of kdfast.ops.CUDA_OPS."""
    g = torch.Generator().manual_seed(0)
    B, d, V = 3, 4, 40
    h, W = torch.randn(B, d, generator=g), torch.randn(V, d, generator=g)
    y = torch.randint(0, V, (B,), generator=g)
    logits = torch.randn(B, V, generator=g)
    loss_args = (1.0, 0.0, 0.0, 1.0, "sigmoid", 1.0, 0.0, 0.0, -100)  # hard CE
    ops = torch.ops.kdfast
    _, dense_stats = ops.distillation_loss_forward(logits, y, None, *loss_args)
    fused_inputs = (h, W, None, y, *[None] * 9)  # student, target, no teacher
    fused_tail = (*loss_args, 0, 0.0)  # tile_size, filter_eps
    _, fused_stats = ops.fused_linear_loss_forward(*fused_inputs, *fused_tail)
    ones = torch.ones(B)
    return {
        "distillation_loss_forward": lambda: ops.distillation_loss_forward(logits, y, None, *loss_args),
        "distillation_loss_backward": lambda: ops.distillation_loss_backward(
            ones, logits, y, None, dense_stats, *loss_args
        ),
        "fused_linear_loss_forward": lambda: ops.fused_linear_loss_forward(*fused_inputs, *fused_tail),
        "fused_linear_loss_backward": lambda: ops.fused_linear_loss_backward(
            ones, *fused_inputs, fused_stats, *fused_tail
        ),
        "teacher_topk": lambda: ops.teacher_topk(h, W, None, 3, 1.0, 0),
    }


def test_the_cuda_ops_run_the_emulated_kernels():
    """Every op of kdfast.ops.CUDA_OPS on CPU tensors now launches (emulated) kernels."""
    calls = _call_each_cuda_op()
    assert sorted(calls) == sorted(kdfast.ops.CUDA_OPS)
    for name, call in calls.items():
        before = cuda_emu.launch_count()
        call()
        assert cuda_emu.launch_count() > before, f"{name} launched no kernel"
