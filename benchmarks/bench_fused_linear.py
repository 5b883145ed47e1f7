"""Forward+backward time and peak memory of ``kdfast.fused_linear_distillation_loss`` against PyTorch eager
and ``torch.compile``.

The student's last linear layer plus the loss, at the Amazon-670K shapes of
``shared/DESIGN.md`` section 3 (default B=256, d_s=64, V=670,091, float32; an on-the-fly
teacher has d_t=512); loss and gradients of the student hidden ``h`` [B, d_s] and weight
``W`` [V, d_s] (no bias). Five cases; eager is what a user writes without kdfast:

* ``ce``            hard cross-entropy: eager ``F.cross_entropy(F.linear(h, W), y)``;
* ``ce_kd_linear``  0.5 * hard CE + 0.5 * T^2 * KL(softmax(s/T) || softmax(f/T)), T=2, teacher on the fly
                    (``s = F.linear(th, tW)``; eager makes it under ``torch.no_grad()`` inside the step, then
                    the loss of ``bench_losses.py``'s ``ce_kd``);
* ``dd_linear``     double distillation (seed 003 eq. 13) with w = 1 - sigmoid(s) (a=1, b=0), teacher on the
                    fly: eager ``logsumexp(f + log w) - sum(softmax(s) * f)``, batch mean;
* ``dd_topk``       the same loss with a stored top-32 teacher (``kdfast.TopK``: the 32 largest teacher logits,
                    their classes and the full log-partition, made once, not timed). Eager gets the same teacher
                    as a dense [B, V] tensor with -inf outside the top-32 (also made once, not timed): positives
                    softmax over the 32, w = 1 outside them (log w = -softplus(-inf) = 0);
* ``pal``           pick-all-labels hard CE, 5.45 positives per row on average (``kdfast.MultiTarget``):
                    eager expands the rows, ``F.cross_entropy(F.linear(h[rows], W), labels)`` (mean over the
                    positives).

``compile`` is ``torch.compile`` (Inductor's C++ backend, default mode) of eager's step as a
function of tensors; it still makes the dense [B, V] logits, but fuses the loss's elementwise work.
Its first step compiles (a minute or two per case on 2 cores): that step is run and reported
apart (``compile_s``) before its peak memory and times are measured.

Each (case, implementation) runs in a fresh process: make the inputs, reset the peak RSS
(``/proc/self/clear_refs``), run one forward+backward and record the growth of the peak RSS
over it; then time ``--warmup`` + ``--repeats`` more steps (median reported; ``--slow-repeats``
for eager and compile in the cases where eager's step takes 5-30 s). "Extra" peak
is that growth minus the bytes of the gradients the step returns ((B + V) * d_s * 4): the
memory beyond the inputs and the outputs. The kdfast and compile workers finally check their
loss and gradients against eager once. A separate worker measures the sgemm rate (4096^3 float32
matmul, same threads) at the start and the end of the run; each case's floor is
``(6 B d_s V [+ 2 B d_t V for an on-the-fly teacher]) / rate`` at the higher of the two rates.

Results are appended to ``benchmarks/results/fused_linear.csv`` and written to the
``bench_fused_linear`` section of ``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_fused_linear.py                     # the full run (~10 minutes on 2 cores)
    python benchmarks/bench_fused_linear.py --cases ce,pal --repeats 5 --slow-repeats 3 --no-write

``--device cuda`` (issue 6) runs the same five cases on the GPU at B=4096, d_s=64, V=670,091,
bf16 (d_t=512), plus teacher labeling (``topk``: ``kdfast.teacher_topk`` with k=32 over
d_t=512, V=670,091, 4096 rows), against PyTorch eager, ``torch.compile`` of the eager
function, Liger-Kernel (``LigerFusedLinearCrossEntropyLoss``; for KD that plus
``LigerFusedLinearJSD(jsd_beta=0)`` times T^2) and Cut Cross-Entropy (``linear_cross_entropy``,
hard CE only), each only on the losses it has; a peer that does not import is reported as
"not installed". Each (case, impl) runs in a fresh process and a failure there (out of memory,
a crashed kernel, a compile that hangs past ``--worker-timeout``) is one error row. Time is the
median of ``--repeats`` (20) steps timed with CUDA events after ``--warmup`` (3) (fewer, at least
3, for a step so slow that ``--impl-seconds`` would not hold them); peak memory is the growth of
``torch.cuda.max_memory_allocated`` over one step. Each implementation (except torch.compile)
is checked on the first ``--check-rows`` rows against eager in float32. The floor is
``6 B d_s V`` flops (+ ``2 B d_t V`` on the fly; ``2 B d_t V`` for labeling) at the rate of
an 8192^3 matmul in the same dtype, measured at the start and the end. Rows go to
``benchmarks/results/fused_linear_cuda.csv`` and the ``bench_fused_linear_cuda`` section of
``BENCHMARKS.md``; ``--json`` keeps the raw results (rewritten after every row), and
``--merge-json`` reports saved runs (e.g. one split across two GPU sessions) without a GPU.
``benchmarks/gpu_check.sh`` runs it on a fresh GPU machine.

    python benchmarks/bench_fused_linear.py --device cuda --json run.json            # ~10 minutes on an H100
    python benchmarks/bench_fused_linear.py --device cuda --cases ce,ce_kd_linear --impls kdfast,liger --no-write
    python benchmarks/bench_fused_linear.py --device cuda --merge-json run1.json run2.json   # CSV + BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CASES = ("ce", "ce_kd_linear", "dd_linear", "dd_topk", "pal")
IMPLS = ("eager", "kdfast", "compile")

CASE_TITLES = {
    "ce": "hard CE",
    "ce_kd_linear": "hard CE + soft KD (T=2), teacher on the fly",
    "dd_linear": "double distillation, teacher on the fly",
    "dd_topk": "double distillation, top-32 teacher",
    "pal": "pick-all-labels hard CE",
}

# the loss parameters of each case (those of bench_losses.py)
TEMPERATURE = 2.0
HARD_WEIGHT_KD = 0.5
SOFT_WEIGHT_KD = 0.5
NEG_SCALE = 1.0  # a
NEG_SHIFT = 0.0  # b
TOPK = 32  # classes a stored teacher keeps per row
POSITIVES_PER_ROW = 5.45  # pick-all-labels: mean positives per row (Amazon-670K's label density)

_DOUBLE = {
    "hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "sigmoid",
    "negative_scale": NEG_SCALE, "negative_shift": NEG_SHIFT,
}
KDFAST_KWARGS = {
    "ce": {"hard_weight": 1.0},
    "ce_kd_linear": {"hard_weight": HARD_WEIGHT_KD, "soft_weight": SOFT_WEIGHT_KD, "temperature": TEMPERATURE},
    "dd_linear": _DOUBLE,
    "dd_topk": _DOUBLE,
    "pal": {"hard_weight": 1.0},
}
SLOW_EAGER = ("ce_kd_linear", "dd_linear", "dd_topk", "pal")  # eager takes 5-30 s a step: --slow-repeats
ON_THE_FLY = ("ce_kd_linear", "dd_linear")  # cases whose teacher's logits are made inside the step
TEACHER_CASES = ("ce_kd_linear", "dd_linear", "dd_topk")

# the goals of issue 3
GOAL_SPEEDUP = {"ce": 4.0}  # kdfast at most 1/4 of eager's time; every other case: no slower (1x)
GOAL_MIN_SPEEDUP = 1.0
GOAL_EXTRA_RATIO = 0.05  # kdfast's extra peak at most 5% of eager's
GOAL_FLOOR_RATIO = 2.0  # kdfast's time at most 2x the floor

CSV_COLUMNS = (
    "date", "commit", "device", "torch", "kdfast", "python",
    "case", "impl", "batch", "classes", "d", "d_t", "dtype", "time_s", "peak_mb", "extra_peak_mb",
    "speedup_vs_eager", "floor_s", "sgemm_gflops",
)
CSV_PATH = common.RESULTS_DIR / "fused_linear.csv"
MD_SECTION = "bench_fused_linear"

STUDENT_STD = 1.0  # student logits ~ N(0, 1): h ~ N(0, 1), W ~ N(0, 1/d_s)
TEACHER_STD = 2.0  # teacher logits ~ N(0, 4): th ~ N(0, 1), tW ~ N(0, 4/d_t); peakier than the student
SEED = 0
SGEMM_N = 4096  # the floor's sgemm: [N, N] @ [N, N] float32
SGEMM_REPEATS = 5

# kdfast vs eager: loss rtol; gradients rtol and atol (times the tensor's max |grad|). grad_h sums
# V = 670k terms in float32 in a different order (tiles, per-thread parts), and kdfast's default
# gradient filter (exact=False) drops entries below 2^-24, hence the 1e-5 relative atol.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
GRAD_RTOL, GRAD_ATOL_REL = 1e-3, 1e-5


# ---------------------------------------------------------------------------
# inputs and the two implementations
# ---------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything a step of either implementation reads (made once per process, not timed)."""

    h: torch.Tensor  # [B, d_s] student hidden, requires grad
    W: torch.Tensor  # [V, d_s] student weight, requires grad
    y: torch.Tensor | None = None  # [B] hard labels
    th: torch.Tensor | None = None  # [B, d_t] teacher hidden (on-the-fly teacher)
    tW: torch.Tensor | None = None  # [V, d_t] teacher weight
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (indices, logits, lse) for kdfast.TopK
    s_topk_dense: torch.Tensor | None = None  # [B, V] the top-k teacher for eager: -inf outside the top-k
    indptr: torch.Tensor | None = None  # pick-all-labels positives, CSR (kdfast.MultiTarget)
    indices: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # pick-all-labels for eager: the row of each positive

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h, self.W

    @property
    def num_positives(self) -> int:
        return int(self.indices.numel()) if self.indices is not None else 0


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``N(0, std^2)`` filled in place: no temporary raises the peak RSS before the measurement."""
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def _multi_target(batch: int, classes: int, per_row: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR positives: Poisson counts clipped to >= 1 and nudged (at random rows) to a total of
    ``round(per_row * batch)``; per row that many distinct classes, sorted."""
    total = max(batch, round(per_row * batch))
    lam = max(per_row - math.exp(-per_row), 1e-3)  # E[max(X, 1)] = lam + e^-lam for X ~ Poisson(lam)
    counts = torch.poisson(torch.full((batch,), lam, dtype=torch.float64), generator=g).long().clamp_(min=1)
    counts.clamp_(max=classes)
    while int(counts.sum()) != total:
        i = int(torch.randint(batch, (1,), generator=g))
        if int(counts.sum()) < total and counts[i] < classes:
            counts[i] += 1
        elif int(counts.sum()) > total and counts[i] > 1:
            counts[i] -= 1
    rows = []
    for c in counts.tolist():
        picked = torch.empty(0, dtype=torch.int64)
        while picked.numel() < c:  # distinct classes (a repeat is rare when c << V)
            picked = torch.cat([picked, torch.randint(classes, (c - picked.numel(),), generator=g)]).unique()
        rows.append(picked)  # unique() sorts
    indptr = torch.zeros(batch + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    return indptr, torch.cat(rows)


def make_inputs(
    case: str, batch: int, classes: int, dim: int = 64, teacher_dim: int = 512, *,
    dtype: torch.dtype = torch.float32, seed: int = SEED, topk: int = TOPK, positives: float = POSITIVES_PER_ROW,
) -> Inputs:
    """The inputs of ``case``; the same seed gives the same inputs in every worker.

    Weights are scaled so that the logits are O(1): student ``f = h W^T ~ N(0, 1)``, teacher
    ``s = th tW^T ~ N(0, 4)``. The top-k teacher is the on-the-fly teacher's top ``topk``
    logits (its dense logits are made once here and freed). Does not import kdfast, so that
    the eager worker runs without the extension.
    """
    g = torch.Generator().manual_seed(seed)
    h = _normal((batch, dim), 1.0, g, dtype).requires_grad_(True)
    W = _normal((classes, dim), STUDENT_STD / math.sqrt(dim), g, dtype).requires_grad_(True)
    x = Inputs(h, W)
    if KDFAST_KWARGS[case]["hard_weight"] > 0 and case != "pal":
        x.y = torch.randint(classes, (batch,), generator=g)
    if case in TEACHER_CASES:
        th = _normal((batch, teacher_dim), 1.0, g, dtype)
        tW = _normal((classes, teacher_dim), TEACHER_STD / math.sqrt(teacher_dim), g, dtype)
        if case in ON_THE_FLY:
            x.th, x.tW = th, tW
        else:
            with torch.no_grad():
                s = F.linear(th, tW)
                del th, tW
                vals, idx = s.topk(min(topk, classes), dim=1)
                lse = torch.logsumexp(s, dim=1)
                x.topk = (idx, vals.contiguous(), lse)
                x.s_topk_dense = s.fill_(-math.inf).scatter_(1, idx, vals)  # in place: no second [B, V]
    if case == "pal":
        x.indptr, x.indices = _multi_target(batch, classes, positives, g)
        x.rows = torch.repeat_interleave(torch.arange(batch), x.indptr.diff())
    return x


def _ce_kd(f: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # as bench_losses.py's eager ce_kd
    T = TEMPERATURE
    hard = F.cross_entropy(f, y)
    soft = F.kl_div(F.log_softmax(f / T, dim=-1), F.log_softmax(s / T, dim=-1),
                    reduction="batchmean", log_target=True)
    return HARD_WEIGHT_KD * hard + SOFT_WEIGHT_KD * T * T * soft


def _double(f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # as bench_losses.py's eager double: LSE(f + log w) - <softmax(s), f>, w = 1 - sigmoid(a (s - b))
    z = s if (NEG_SCALE, NEG_SHIFT) == (1.0, 0.0) else NEG_SCALE * (s - NEG_SHIFT)
    log_w = -F.softplus(z)  # log(1 - sigmoid(z)); 0 where s = -inf (outside a top-k teacher)
    p = torch.softmax(s, dim=-1)  # 0 where s = -inf: the top-k renormalized
    return (torch.logsumexp(f + log_w, dim=-1) - (p * f).sum(-1)).mean()


def eager_loss(case: str, x: Inputs) -> torch.Tensor:
    """The PyTorch-eager baseline of each case (what a user writes without kdfast)."""
    if case == "ce":
        return F.cross_entropy(F.linear(x.h, x.W), x.y)
    if case == "pal":
        return F.cross_entropy(F.linear(x.h[x.rows], x.W), x.indices)  # one row per positive
    if case in ON_THE_FLY:
        with torch.no_grad():
            s = F.linear(x.th, x.tW)
        f = F.linear(x.h, x.W)
        return _ce_kd(f, x.y, s) if case == "ce_kd_linear" else _double(f, s)
    if case == "dd_topk":
        return _double(F.linear(x.h, x.W), x.s_topk_dense)
    raise ValueError(f"unknown case {case!r}")


def kdfast_loss(case: str, x: Inputs) -> torch.Tensor:
    import kdfast

    kw = dict(KDFAST_KWARGS[case])
    if case in ON_THE_FLY:
        kw.update(teacher_hidden=x.th, teacher_weight=x.tW)
    elif case == "dd_topk":
        kw["teacher_topk"] = kdfast.TopK(*x.topk)
    target = kdfast.MultiTarget(x.indptr, x.indices) if case == "pal" else x.y
    return kdfast.fused_linear_distillation_loss(x.h, x.W, target, **kw)


LOSS_FNS: dict[str, Callable] = {"eager": eager_loss, "kdfast": kdfast_loss}


def compiled_loss(case: str, x: Inputs) -> Callable[[], torch.Tensor]:
    """``torch.compile`` of eager's step of ``case`` (the same function as on CUDA; it compiles on
    its first call)."""
    fn, fn_args = eager_parts(case, x)
    compiled = torch.compile(fn)
    return lambda: compiled(*fn_args)


def make_step(impl: str, case: str, x: Inputs) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(step, reset)``: ``step()`` runs forward+backward and returns the loss (detached);
    ``reset()`` drops the previous gradients so that every step allocates its own."""
    if impl == "compile":
        compiled = compiled_loss(case, x)
        loss_fn = lambda case, x: compiled()
    else:
        loss_fn = LOSS_FNS[impl]

    def step() -> torch.Tensor:
        loss = loss_fn(case, x)
        loss.backward()
        return loss.detach()

    def reset() -> None:
        for t in x.leaves():
            t.grad = None

    return step, reset


def grad_bytes(x: Inputs) -> int:
    """Bytes of the gradients a step returns (grad of h and of W)."""
    return sum(t.numel() * t.element_size() for t in x.leaves())


def floor_flops(case: str, batch: int, classes: int, dim: int, teacher_dim: int) -> float:
    """The issue's floor: forward, grad-hidden and grad-weight GEMMs of the student (6 B d_s V),
    plus the teacher's forward GEMM (2 B d_t V) when it runs on the fly."""
    flops = 6.0 * batch * dim * classes
    if case in ON_THE_FLY:
        flops += 2.0 * batch * teacher_dim * classes
    return flops


def kdfast_gemm_flops(case: str, batch: int, classes: int, dim: int, teacher_dim: int) -> float:
    """The GEMMs kdfast's exact algorithm itself runs: the student's logits twice (forward, and
    recomputed in the backward, since no [B, V] tensor is kept), grad-hidden and grad-weight
    (8 B d_s V), plus the on-the-fly teacher's logits twice (4 B d_t V): its softmax needs the
    whole row's log-partition before any gradient entry, so the backward makes them again."""
    flops = 8.0 * batch * dim * classes
    if case in ON_THE_FLY:
        flops += 4.0 * batch * teacher_dim * classes
    return flops


def check_against_eager(case: str, x: Inputs, impl: str = "kdfast") -> dict:
    """``impl``'s loss and gradients (of h and W) against eager's, on the same inputs (keys say
    kdfast for either impl)."""
    step_k, reset = make_step(impl, case, x)
    reset()
    loss_k = step_k()
    grads_k = [t.grad for t in x.leaves()]
    reset()
    step_e, _ = make_step("eager", case, x)
    loss_e = step_e()
    grads_e = [t.grad for t in x.leaves()]
    reset()
    out = {
        "loss_kdfast": loss_k.item(), "loss_eager": loss_e.item(),
        "loss_ok": bool(torch.allclose(loss_k, loss_e, rtol=LOSS_RTOL, atol=LOSS_ATOL)),
    }
    for name, gk, ge in zip(("h", "W"), grads_k, grads_e):
        scale = ge.abs().max().item()
        out[f"grad_{name}_max_abs_diff"] = (gk - ge).abs().max().item()
        out[f"grad_{name}_max_abs"] = scale
        out[f"grad_{name}_ok"] = bool(torch.allclose(gk, ge, rtol=GRAD_RTOL, atol=GRAD_ATOL_REL * scale))
    return out


# ---------------------------------------------------------------------------
# workers: one (case, impl) in a fresh process; the sgemm rate
# ---------------------------------------------------------------------------


def worker(case: str, impl: str, args: argparse.Namespace) -> dict:
    threads = common.set_threads(args.threads)
    common.hwm_reset_works()  # probe before the inputs exist, so it cannot raise a ru_maxrss fallback's peak
    if impl == "kdfast":
        import kdfast  # noqa: F401  (load the extension before the baseline RSS is taken)
    x = make_inputs(case, args.batch, args.classes, args.dim, args.teacher_dim)
    step, reset = make_step(impl, case, x)
    reset()
    compile_s = None
    if impl == "compile":  # compile first: the compiler's own memory is not the step's
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        reset()
    gc.collect()
    peak_mb, method, loss = common.peak_memory_growth_mb(step)
    times = common.time_fn(step, repeats=args.repeats, warmup=args.warmup, setup=reset)
    gbytes = grad_bytes(x)
    result = {
        "case": case, "impl": impl, "threads": threads, "peak_mb": peak_mb, "memory_method": method,
        "grad_mb": gbytes / common.MB, "extra_peak_mb": peak_mb - gbytes / common.MB,
        "times": times, "time_s": common.median(times), "loss": loss.item(), "positives": x.num_positives,
        "compile_s": compile_s,
    }
    reset()
    if impl != "eager" and not args.no_check:
        result["check"] = check_against_eager(case, x, impl)
    return result


def repeats_for(case: str, impl: str, args: argparse.Namespace) -> int:
    """Timed steps of ``(case, impl)``: ``--slow-repeats`` for eager and compile in the slow cases,
    else ``--repeats``."""
    return args.slow_repeats if impl in ("eager", "compile") and case in SLOW_EAGER else args.repeats


def worker_argv(case: str, impl: str, args: argparse.Namespace) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--_worker", case, impl,
        "--batch", str(args.batch), "--classes", str(args.classes),
        "--dim", str(args.dim), "--teacher-dim", str(args.teacher_dim),
        "--repeats", str(repeats_for(case, impl, args)), "--warmup", str(args.warmup), "--threads", str(args.threads),
    ] + (["--no-check"] if args.no_check else [])


def sgemm_worker(args: argparse.Namespace) -> dict:
    """Median GFLOP/s of a ``[N, N] @ [N, N]`` float32 matmul (1 warm-up, ``SGEMM_REPEATS`` timed)."""
    threads = common.set_threads(args.threads)
    g = torch.Generator().manual_seed(SEED)
    a = torch.empty(SGEMM_N, SGEMM_N).normal_(generator=g)
    b = torch.empty(SGEMM_N, SGEMM_N).normal_(generator=g)
    c = torch.empty(SGEMM_N, SGEMM_N)
    times = common.time_fn(lambda: torch.mm(a, b, out=c), repeats=SGEMM_REPEATS, warmup=1)
    flops = 2.0 * SGEMM_N**3
    return {"threads": threads, "gflops": flops / common.median(times) / 1e9,
            "runs_gflops": [flops / t / 1e9 for t in times]}


def measure_sgemm(args: argparse.Namespace, when: str) -> float:
    r = common.run_worker([str(Path(__file__).resolve()), "--_sgemm", "--threads", str(args.threads)])
    runs = ", ".join(f"{v:.0f}" for v in r["runs_gflops"])
    print(f"  sgemm {SGEMM_N}^3 float32 ({when}): {r['gflops']:.1f} GFLOP/s (runs: {runs})", flush=True)
    return r["gflops"]


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def goal_checks(case: str, speedup: float | None, extra_ratio: float | None, floor_ratio: float | None
                ) -> list[tuple[str, bool | None, str]]:
    """``(goal, passed or None if not measured, detail)`` for each goal of issue 3 that applies to ``case``."""
    min_speedup = GOAL_SPEEDUP.get(case, GOAL_MIN_SPEEDUP)
    out = []
    if speedup is None:
        out.append(("speed", None, "not measured"))
    else:
        ok = speedup >= min_speedup
        out.append(("speed", ok, f"speedup {speedup:.2f}x {'>=' if ok else '<'} {min_speedup:g}x"))
    if extra_ratio is None:
        out.append(("memory", None, "not measured"))
    else:
        ok = extra_ratio <= GOAL_EXTRA_RATIO
        detail = f"extra peak {100 * extra_ratio:.1f}% {'<=' if ok else '>'} {100 * GOAL_EXTRA_RATIO:g}% of eager's"
        out.append(("memory", ok, detail))
    if floor_ratio is None:
        out.append(("floor", None, "not measured"))
    else:
        ok = floor_ratio <= GOAL_FLOOR_RATIO
        out.append(("floor", ok, f"time {floor_ratio:.2f}x {'<=' if ok else '>'} {GOAL_FLOOR_RATIO:g}x the floor"))
    return out


def summarize(results: dict[tuple[str, str], dict], cases: list[str], args: argparse.Namespace,
              gflops: float | None) -> list[dict]:
    """One summary per case: times, peaks, extra peaks, speedups (over eager and over compile),
    extra ratio, floor, goals."""
    out = []
    for case in cases:
        e, k = results.get((case, "eager")), results.get((case, "kdfast"))
        c = results.get((case, "compile"))
        speedup = e["time_s"] / k["time_s"] if e and k else None
        speedup_compile = c["time_s"] / k["time_s"] if c and k else None
        extra_ratio = (k["extra_peak_mb"] / e["extra_peak_mb"] if e and k and e["extra_peak_mb"] > 0 else None)
        floor_s = (floor_flops(case, args.batch, args.classes, args.dim, args.teacher_dim) / (gflops * 1e9)
                   if gflops else None)
        floor_ratio = k["time_s"] / floor_s if k and floor_s else None
        gemm_s = (kdfast_gemm_flops(case, args.batch, args.classes, args.dim, args.teacher_dim) / (gflops * 1e9)
                  if gflops else None)
        goals = goal_checks(case, speedup, extra_ratio, floor_ratio)
        out.append({
            "case": case, "eager": e, "kdfast": k, "compile": c, "speedup": speedup,
            "speedup_compile": speedup_compile, "extra_ratio": extra_ratio,
            "floor_s": floor_s, "floor_ratio": floor_ratio, "gemm_s": gemm_s,
            "gemm_ratio": k["time_s"] / gemm_s if k and gemm_s else None, "goals": goals,
        })
    return out


def _e(x: float) -> str:
    """``1e-4`` rather than ``0.0001``."""
    return f"{x:.0e}".replace("e-0", "e-")


def _goals_short(goals: list[tuple[str, bool | None, str]]) -> str:
    return ", ".join(f"{name} {'-' if ok is None else _verdict(ok)}" for name, ok, _ in goals)


def table_rows(summary: list[dict]) -> list[list[str]]:
    rows = []
    for r in summary:
        e, k, c = r["eager"] or {}, r["kdfast"] or {}, r["compile"] or {}
        rows.append([
            CASE_TITLES[r["case"]],
            common.fmt(e.get("time_s"), ".3f"), common.fmt(c.get("time_s"), ".3f"), common.fmt(k.get("time_s"), ".3f"),
            common.fmt(r["speedup"], ".2f"), common.fmt(r["speedup_compile"], ".2f"),
            common.fmt(e.get("peak_mb"), ".0f"), common.fmt(c.get("peak_mb"), ".0f"), common.fmt(k.get("peak_mb"), ".0f"),
            common.fmt(e.get("extra_peak_mb"), ".0f"), common.fmt(c.get("extra_peak_mb"), ".0f"),
            common.fmt(k.get("extra_peak_mb"), ".1f"), common.fmt(r["extra_ratio"], ".3f"),
            common.fmt(r["floor_s"], ".3f"), common.fmt(r["floor_ratio"], ".2f"),
            common.fmt(r["gemm_s"], ".3f"), common.fmt(r["gemm_ratio"], ".2f"), _goals_short(r["goals"]),
        ])
    return rows


HEADERS = ["case", "eager s", "compile s", "kdfast s", "speedup", "vs compile", "eager peak MB",
           "compile peak MB", "kdfast peak MB", "eager extra MB", "compile extra MB", "kdfast extra MB", "extra ratio",
           "floor s", "kdfast/floor", "kdfast GEMMs s", "kdfast/GEMMs", "goals"]
ALIGN = "lrrrrrrrrrrrrrrrrl"


def check_line(case: str, check: dict, positives: int = 0, impl: str = "kdfast") -> str:
    ok = check["loss_ok"] and check["grad_h_ok"] and check["grad_W_ok"]
    label = "" if impl == "kdfast" else f" ({impl})"
    parts = [(f"{case}{label}: loss {impl} {check['loss_kdfast']:.6f} vs eager {check['loss_eager']:.6f} "
              f"({'allclose' if check['loss_ok'] else 'NOT allclose'})")]
    for name in ("h", "W"):
        diff, scale = check[f"grad_{name}_max_abs_diff"], check[f"grad_{name}_max_abs"]
        rel = diff / scale if scale else float("nan")
        parts.append(f"grad {name} max|diff| {diff:.3g} = {rel:.2g} of max|grad| "
                     f"({'allclose' if check[f'grad_{name}_ok'] else 'NOT allclose'})")
    if case == "pal":
        parts[0] += f" [{positives} positives; eager = {positives} expanded rows]"
    verdict = f"OK: {impl} equals eager" if ok and case == "pal" else ("OK" if ok else "MISMATCH")
    return "; ".join(parts) + f" -> {verdict}"


def markdown_section(meta: dict, args: argparse.Namespace, summary: list[dict], checks: list[str],
                     memory_method: str, sgemm: dict, load: float | None = None,
                     load_end: float | None = None, positives: int | None = None) -> str:
    method = {
        "vmhwm": "growth of peak RSS over one step (`VmHWM` after resetting it via `/proc/self/clear_refs`, "
                 "minus `VmRSS` before)",
        "ru_maxrss": "growth of peak RSS over one step (`ru_maxrss` minus `VmRSS` before, in a fresh process)",
    }.get(memory_method, memory_method)
    gmb = (args.batch + args.classes) * args.dim * 4 / common.MB
    rates = ", ".join(f"{w} {v:.1f}" for w, v in sgemm.items() if v is not None)
    pos = f" ({positives:,} in all)" if positives else ""
    compiles = [f"{r['case']} {r['compile']['compile_s']:.0f} s" for r in summary
                if r["compile"] and r["compile"].get("compile_s") is not None]
    compile_note = f" ({', '.join(compiles)})" if compiles else ""
    lines = [
        (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · "
         f"torch {meta['torch']} · kdfast {meta['kdfast']} · Python {meta['python']}"),
        "",
        (f"B = {args.batch}, d_s = {args.dim}, V = {args.classes:,}, d_t = {args.teacher_dim} (on-the-fly teacher), "
         f"top-{TOPK} teacher, {POSITIVES_PER_ROW} positives per row for pick-all-labels{pos}; float32, forward + "
         f"backward (gradients of h and W); compile = `torch.compile` of eager's step (Inductor, default mode), "
         f"measured after its first step, which compiles{compile_note}; time = median of {args.repeats} "
         f"({args.slow_repeats} for eager and compile in the slow cases {', '.join(SLOW_EAGER)}) after "
         f"{args.warmup} warm-up; peak MB = {method}; extra MB = peak MB minus the {gmb:.0f} MB of returned "
         "gradients; speedup = eager time / kdfast time; vs compile = compile time / kdfast time; "
         "extra ratio = kdfast extra / eager extra; "
         f"floor = (6·B·d_s·V [+ 2·B·d_t·V on the fly]) flops at the sgemm rate "
         f"({SGEMM_N}³ float32 matmul, GFLOP/s: {rates}; the higher is used); kdfast GEMMs = the GEMMs "
         "kdfast's exact algorithm runs, (8·B·d_s·V [+ 4·B·d_t·V on the fly]) flops at the same rate "
         "(logits are made again in the backward), so kdfast/GEMMs is its distance from its own bound."
         + (f" Load average at start: {load:.2f}" if load is not None else "")
         + (f", at end: {load_end:.2f}." if load_end is not None else ".")),
        "",
        common.markdown_table(HEADERS, table_rows(summary), ALIGN),
    ]
    if checks:
        lines += ["", (f"kdfast and compile vs eager on these inputs (loss rtol {_e(LOSS_RTOL)}, atol {_e(LOSS_ATOL)}; gradients "
                       f"rtol {_e(GRAD_RTOL)}, atol {_e(GRAD_ATOL_REL)}·max|grad|):"), ""]
        lines += [f"- {c}" for c in checks]
    lines += ["", ("Goals (issue 3: hard CE at most 1/4 of eager's time; every case no slower than eager, extra "
                   "peak at most 5% of eager's, time within 2x the floor):"), ""]
    for r in summary:
        lines.append(f"- {CASE_TITLES[r['case']]}: "
                     + "; ".join(f"{name} {'-' if ok is None else _verdict(ok)} ({detail})"
                                 for name, ok, detail in r["goals"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CUDA (issue 6): kdfast against eager, torch.compile, Liger-Kernel and Cut Cross-Entropy
# ---------------------------------------------------------------------------
#
# Everything below runs only with --device cuda; the CPU benchmark above does not use it.
# One fresh process per (case, implementation), as on the CPU: an out-of-memory error, a
# crashed CUDA context or a compile that hangs becomes one error row and the run goes on.

CUDA_CASES = CASES + ("topk",)
# the order the workers run in: what matters most first, so that a run cut short by its
# time budget still has kdfast and the cheap peers (torch.compile's compiles are slow)
CUDA_IMPLS = ("kdfast", "eager", "cce", "liger", "compile")
PEERS = ("eager", "compile", "liger", "cce")  # everything kdfast is compared with
CUDA_CASE_TITLES = {**CASE_TITLES, "topk": f"teacher top-{TOPK} labeling (d_t, no grad)"}
IMPL_TITLES = {
    "kdfast": "kdfast", "eager": "PyTorch eager", "compile": "torch.compile(eager)",
    "liger": "Liger-Kernel", "cce": "Cut Cross-Entropy",
}
# Which losses each implementation has. Liger: LigerFusedLinearCrossEntropyLoss for hard CE,
# and for KD that plus LigerFusedLinearJSD(jsd_beta=0), i.e. forward KL(teacher || student),
# scaled by T^2 (two fused passes, as a Liger user writes it); it has no double distillation
# and no top-k teacher. Cut Cross-Entropy: hard CE only. Pick-all-labels for both, as for
# eager, is hard CE on the rows expanded to one row per positive.
CUDA_SUPPORT = {
    "kdfast": set(CUDA_CASES),
    "eager": set(CUDA_CASES),
    "compile": set(CUDA_CASES),
    "liger": {"ce", "ce_kd_linear", "pal"},
    "cce": {"ce", "pal"},
}
PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
PEER_DISTRIBUTIONS = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}
CUDA_DEFAULTS = {"batch": 4096, "repeats": 20, "warmup": 3}
CPU_DEFAULTS = {"batch": 256, "repeats": 3, "warmup": 1}
# "tf32": float32 inputs with torch.backends.cuda.matmul.allow_tf32 on, for every implementation (and
# for the floor's matmul): kdfast's fused kernels then take float32 too, multiplying in tf32.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "tf32": torch.float32}

GEMM_N = 8192  # the floor's rate: [N, N] @ [N, N] in the benchmark's dtype
GEMM_REPEATS = 10
MIN_CUDA_REPEATS = 3  # a slow implementation gets at least this many timed steps
CSV_PATH_CUDA = common.RESULTS_DIR / "fused_linear_cuda.csv"
MD_SECTION_CUDA = "bench_fused_linear_cuda"

# the goals of issue 6
GOAL_PEER_SPEEDUP = 1.5  # kdfast at least 1.5x faster than the fastest peer, every shared loss
GOAL_DD_VS_KD = 1.3  # double distillation (teacher on the fly) within 1.3x of kdfast's KD time
GOAL_MEMORY = 1.10  # peak (inputs + growth) at most weights + gradients + 10%
GOAL_FLOOR_CUDA = 2.5  # time within 2.5x the floor
GOAL_TOPK_ROWS_PER_S = 300_000

# The correctness check: each implementation on the first --check-rows rows against eager in
# float32 on the same (bf16-valued) inputs. Tolerances for bf16 logits and gradients: a
# relative error of the loss, and ||g - g_ref|| / ||g_ref|| for each gradient. (float32 runs
# use the tighter pair; tf32 ones, whose products round inputs at 2^-11, one in between.)
CHECK_TOL = {"low": (1e-2, 3e-2), "float32": (1e-4, 1e-3), "tf32": (2e-3, 1e-2)}


def check_tol_kind(dtype_name: str) -> str:
    """The CHECK_TOL entry of a --dtype."""
    return dtype_name if dtype_name in ("float32", "tf32") else "low"

CUDA_CSV_COLUMNS = (
    "date", "commit", "device", "torch", "kdfast", "python",
    "case", "impl", "status", "batch", "classes", "d", "d_t", "dtype", "steps", "time_s", "floor_s", "x_floor",
    "speedup_vs_fastest_peer", "peak_mb", "extra_mb", "state_mb", "mem_ratio", "loss", "check", "gemm_tflops",
    "message",
)


_clock = time.monotonic  # the run's clock for --time-budget (the tests replace it)


class PeerUnavailable(Exception):
    """A peer library is not importable: its rows say "not installed" instead of an error."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_inputs_cuda(case: str, batch: int, classes: int, dim: int, teacher_dim: int, dtype: torch.dtype, *,
                     dense_topk: bool = False, seed: int = SEED, device: str = "cuda") -> Inputs:
    """The inputs of ``case`` on the GPU (made on the GPU with a seeded generator, so every
    worker of a run gets the same tensors), scaled as :func:`make_inputs`: student logits
    ~ N(0, 1), teacher logits ~ N(0, 4).

    ``topk`` (teacher labeling) has no student: ``h`` and ``W`` are ``None`` and the teacher
    is ``th``/``tW``. The top-k teacher of ``dd_topk`` comes from float32 logits of the
    (bf16-valued) teacher; ``dense_topk`` also makes eager's dense form of it ([B, V] in
    ``dtype``, -inf outside the top-k). (``device`` is for the tests, which run on the CPU.)
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=dev, dtype=dtype).mul_(std)

    if case == "topk":
        x = Inputs(None, None)  # type: ignore[arg-type]
        x.th = normal((batch, teacher_dim), 1.0)
        x.tW = normal((classes, teacher_dim), TEACHER_STD / math.sqrt(teacher_dim))
        return x
    h = normal((batch, dim), 1.0).requires_grad_(True)
    W = normal((classes, dim), STUDENT_STD / math.sqrt(dim)).requires_grad_(True)
    x = Inputs(h, W)
    if KDFAST_KWARGS[case]["hard_weight"] > 0 and case != "pal":
        x.y = torch.randint(classes, (batch,), generator=g, device=dev)
    if case in TEACHER_CASES:
        th = normal((batch, teacher_dim), 1.0)
        tW = normal((classes, teacher_dim), TEACHER_STD / math.sqrt(teacher_dim))
        if case in ON_THE_FLY:
            x.th, x.tW = th, tW
        else:
            with torch.no_grad():
                s = th.float() @ tW.float().t()  # [B, V] float32, freed below
                del th, tW
                vals, idx = s.topk(min(TOPK, classes), dim=1)
                x.topk = (idx, vals.contiguous(), torch.logsumexp(s, dim=1))
                if dense_topk:
                    x.s_topk_dense = s.fill_(-math.inf).scatter_(1, idx, vals).to(dtype)
                del s
    if case == "pal":
        cpu_g = torch.Generator().manual_seed(seed)
        indptr, indices = _multi_target(batch, classes, POSITIVES_PER_ROW, cpu_g)
        x.indptr, x.indices = indptr.to(dev), indices.to(dev)
        x.rows = torch.repeat_interleave(torch.arange(batch, device=dev), x.indptr.diff())
    return x


def state_bytes(case: str, batch: int, classes: int, dim: int, teacher_dim: int, elem: int,
                positives: int = 0) -> tuple[int, int]:
    """``(inputs, gradients)`` in bytes: the weights and activations a step of ``case`` must read,
    in their compact form (the top-k teacher as indices, float32 logits and lse; not eager's
    dense [B, V] copy), and the gradients of h and W it returns. Their sum is the issue's
    "weights + gradients", the same for every implementation."""
    if case == "topk":
        return (batch + classes) * teacher_dim * elem, 0
    inputs = (batch + classes) * dim * elem
    if KDFAST_KWARGS[case]["hard_weight"] > 0 and case != "pal":
        inputs += batch * 8
    if case in ON_THE_FLY:
        inputs += (batch + classes) * teacher_dim * elem
    if case == "dd_topk":
        inputs += batch * TOPK * (8 + 4) + batch * 4
    if case == "pal":
        inputs += (batch + 1) * 8 + positives * 8  # indptr and indices (not eager's expanded row ids)
    return inputs, (batch + classes) * dim * elem


def cuda_floor_flops(case: str, batch: int, classes: int, dim: int, teacher_dim: int) -> float:
    """The floor's flops: :func:`floor_flops` (6 B d_s V, plus 2 B d_t V for a teacher on the fly;
    pick-all-labels counts one pass per row), and 2 B d_t V for teacher labeling."""
    if case == "topk":
        return 2.0 * batch * teacher_dim * classes
    return floor_flops(case, batch, classes, dim, teacher_dim)


# Eager steps as functions of tensors only, so that torch.compile can take the same function.
# Each is eager_loss() of the CPU benchmark for one case.

def _eager_ce_fn(h, W, y):
    return F.cross_entropy(F.linear(h, W), y)


def _eager_pal_fn(h, W, rows, labels):
    return F.cross_entropy(F.linear(h[rows], W), labels)


def _eager_ce_kd_fn(h, W, y, th, tW):
    with torch.no_grad():
        s = F.linear(th, tW)
    return _ce_kd(F.linear(h, W), y, s)


def _eager_dd_linear_fn(h, W, th, tW):
    with torch.no_grad():
        s = F.linear(th, tW)
    return _double(F.linear(h, W), s)


def _eager_dd_topk_fn(h, W, s_dense):
    return _double(F.linear(h, W), s_dense)


def _eager_topk_fn(th, tW):
    """What kdfast.teacher_topk returns, in eager: top-k of the logits, and the log-partition,
    entropy and covered mass of their softmax (statistics in float32)."""
    s = F.linear(th, tW).float()
    vals, idx = s.topk(TOPK, dim=1)
    logp = torch.log_softmax(s, dim=1)
    p = logp.exp()
    return idx, vals, torch.logsumexp(s, dim=1), -(p * logp).sum(1), p.gather(1, idx).sum(1)


def eager_parts(case: str, x: Inputs) -> tuple[Callable, tuple]:
    """``(fn, args)``: the eager step of ``case`` as a function of tensors, and its arguments."""
    if case == "ce":
        return _eager_ce_fn, (x.h, x.W, x.y)
    if case == "pal":
        return _eager_pal_fn, (x.h, x.W, x.rows, x.indices)
    if case == "ce_kd_linear":
        return _eager_ce_kd_fn, (x.h, x.W, x.y, x.th, x.tW)
    if case == "dd_linear":
        return _eager_dd_linear_fn, (x.h, x.W, x.th, x.tW)
    if case == "dd_topk":
        return _eager_dd_topk_fn, (x.h, x.W, x.s_topk_dense)
    if case == "topk":
        return _eager_topk_fn, (x.th, x.tW)
    raise ValueError(f"unknown case {case!r}")


def _liger_loss(case: str, x: Inputs) -> Callable[[], torch.Tensor]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
    except ImportError as exc:
        raise PeerUnavailable(f"not installed ({exc})") from exc
    ce = LigerFusedLinearCrossEntropyLoss()  # mean over rows; forward(weight, input, target)
    if case == "ce":
        return lambda: ce(x.W, x.h, x.y)
    if case == "pal":
        return lambda: ce(x.W, x.h[x.rows], x.indices)
    if case == "ce_kd_linear":
        T = TEMPERATURE
        # jsd_beta=0: forward KL(softmax(s/T) || softmax(f/T)), averaged over rows; forward(h, W, th, tW, labels)
        kl = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
        return lambda: HARD_WEIGHT_KD * ce(x.W, x.h, x.y) + SOFT_WEIGHT_KD * T * T * kl(x.h, x.W, x.th, x.tW, None)
    raise ValueError(f"Liger-Kernel has no {case!r} loss")


def _cce_loss(case: str, x: Inputs) -> Callable[[], torch.Tensor]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise PeerUnavailable(f"not installed ({exc})") from exc
    if case == "ce":
        return lambda: linear_cross_entropy(x.h, x.W, x.y)  # (embeddings, classifier, targets), mean
    if case == "pal":
        return lambda: linear_cross_entropy(x.h[x.rows], x.W, x.indices)
    raise ValueError(f"Cut Cross-Entropy has no {case!r} loss")


def cuda_loss_fn(impl: str, case: str, x: Inputs) -> Callable[[], torch.Tensor]:
    """A function running ``impl``'s forward of ``case`` and returning a scalar: the loss, or for
    teacher labeling the mean log-partition (so that every output is made and can be compared)."""
    if impl == "kdfast":
        import kdfast

        if case == "topk":
            return lambda: kdfast.teacher_topk(x.th, x.tW, k=TOPK).lse.float().mean()
        return lambda: kdfast_loss(case, x)
    if impl == "liger":
        return _liger_loss(case, x)
    if impl == "cce":
        return _cce_loss(case, x)
    fn, fn_args = eager_parts(case, x)
    if impl == "compile":
        fn = torch.compile(fn)
    if case == "topk":
        return lambda: fn(*fn_args)[2].float().mean()
    return lambda: fn(*fn_args)


def make_cuda_step(impl: str, case: str, x: Inputs) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(step, reset)`` as :func:`make_step`, for any CUDA implementation; teacher labeling has
    no backward."""
    loss_fn = cuda_loss_fn(impl, case, x)
    leaves = [t for t in (x.h, x.W) if t is not None and t.requires_grad]

    def step() -> torch.Tensor:
        loss = loss_fn()
        if leaves:
            loss.backward()
        return loss.detach()

    def reset() -> None:
        for t in leaves:
            t.grad = None

    return step, reset


def _sub_inputs(case: str, x: Inputs, rows: int) -> Inputs:
    """The first ``rows`` rows of ``x`` as new leaves (W copied, so its gradient is the sub-batch's)."""
    if case == "topk":
        xs = Inputs(None, None)  # type: ignore[arg-type]
        xs.th, xs.tW = x.th[:rows].contiguous(), x.tW
        return xs
    xs = Inputs(x.h[:rows].detach().clone().requires_grad_(True), x.W.detach().clone().requires_grad_(True))
    if x.y is not None:
        xs.y = x.y[:rows]
    if x.th is not None:
        xs.th, xs.tW = x.th[:rows].contiguous(), x.tW
    if x.topk is not None:
        xs.topk = tuple(t[:rows].contiguous() for t in x.topk)
    if x.s_topk_dense is not None:
        xs.s_topk_dense = x.s_topk_dense[:rows]
    if x.indptr is not None:
        end = int(x.indptr[rows])
        xs.indptr, xs.indices, xs.rows = x.indptr[: rows + 1], x.indices[:end], x.rows[:end]
    return xs


def _float32_reference(case: str, xs: Inputs) -> dict:
    """Eager in float32 (TF32 off) on the same values: the oracle of the check."""
    if case == "topk":
        s = xs.th.float() @ xs.tW.float().t()
        vals, idx = s.topk(TOPK, dim=1)
        logp = torch.log_softmax(s, dim=1)
        p = logp.exp()
        return {"logits": s, "vals": vals, "lse": torch.logsumexp(s, 1), "entropy": -(p * logp).sum(1),
                "covered": p.gather(1, idx).sum(1)}
    x32 = Inputs(xs.h.detach().float().requires_grad_(True), xs.W.detach().float().requires_grad_(True))
    x32.y, x32.indptr, x32.indices, x32.rows = xs.y, xs.indptr, xs.indices, xs.rows
    if xs.th is not None:
        x32.th, x32.tW = xs.th.float(), xs.tW.float()
    if xs.topk is not None:
        idx, vals, _ = xs.topk
        dense = torch.full((idx.shape[0], xs.W.shape[0]), -math.inf, device=idx.device)
        x32.s_topk_dense = dense.scatter_(1, idx, vals.float())
    loss = eager_loss(case, x32)
    loss.backward()
    return {"loss": loss.detach().double(), "grad_h": x32.h.grad.double(), "grad_W": x32.W.grad.double()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf when a has a non-finite entry)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cuda_check(case: str, impl: str, x: Inputs, rows: int, dtype_name: str) -> dict:
    """``impl`` on the first ``rows`` rows against eager in float32 (exact: no tf32) on the same
    values: relative error of the loss and of each gradient (teacher labeling: of lse, entropy and
    covered mass, and the true logits at the returned classes against the true top-k)."""
    kind = check_tol_kind(dtype_name)
    loss_tol, grad_tol = CHECK_TOL[kind]
    rows = min(rows, x.th.shape[0] if case == "topk" else x.h.shape[0])
    xs = _sub_inputs(case, x, rows)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = _float32_reference(case, xs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out: dict = {"rows": rows}
    if case == "topk":
        if impl == "kdfast":
            import kdfast

            t = kdfast.teacher_topk(xs.th, xs.tW, k=TOPK)
            idx, lse, ent, cov = t.indices, t.lse, t.entropy, t.covered
        else:
            idx, _, lse, ent, cov = _eager_topk_fn(xs.th, xs.tW)
        picked = ref["logits"].gather(1, idx)  # the true logits of the returned classes
        out.update(
            lse=_rel(lse, ref["lse"]), entropy=_rel(ent, ref["entropy"]), covered=_rel(cov, ref["covered"]),
            topk_logits=float((picked - ref["vals"]).abs().max()),
        )
        # A near-tie may come back swapped: the returned class's true logit then equals the one it
        # displaced up to the logits' rounding (bf16 logits, as eager's, round at 2^-8 relative).
        logit_tol = {"float32": 1e-4, "tf32": 2.0**-9, "low": 2.0**-7}[kind] * float(ref["vals"].abs().max())
        out["ok"] = max(out["lse"], out["entropy"], out["covered"]) <= grad_tol and out["topk_logits"] <= logit_tol
        return out
    step, reset = make_cuda_step(impl, case, xs)
    reset()
    loss = step()
    out.update(
        loss=float(loss), loss_ref=float(ref["loss"]), loss_rel=_rel(loss.reshape(1), ref["loss"].reshape(1)),
        grad_h_rel=_rel(xs.h.grad, ref["grad_h"]), grad_W_rel=_rel(xs.W.grad, ref["grad_W"]),
    )
    out["ok"] = out["loss_rel"] <= loss_tol and max(out["grad_h_rel"], out["grad_W_rel"]) <= grad_tol
    return out


def cuda_check_line(case: str, impl: str, c: dict) -> str:
    head = f"{case} / {impl} (first {c.get('rows', '?')} rows)"
    if "error" in c:
        return f"{head}: check failed to run: {c['error']}"
    if case == "topk":
        body = (f"lse {c['lse']:.1e}, entropy {c['entropy']:.1e}, covered {c['covered']:.1e} (relative); "
                f"max |true logit at returned class - true top-k logit| {c['topk_logits']:.2g}")
    else:
        body = (f"loss {c['loss']:.6f} vs float32 {c['loss_ref']:.6f} (rel {c['loss_rel']:.1e}); "
                f"grad h rel {c['grad_h_rel']:.1e}; grad W rel {c['grad_W_rel']:.1e}")
    return f"{head}: {body} -> {'OK' if c['ok'] else 'MISMATCH'}"


def cuda_worker(case: str, impl: str, args: argparse.Namespace) -> dict:
    """One (case, impl) on the GPU: inputs, warm-up, peak memory of one step, timed steps, check.

    Never raises for a failure of the implementation: the result says ``status`` "ok", "oom",
    "error" or "not installed" with a message (the traceback goes to stderr).
    """
    import traceback

    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"  # float32 means float32 otherwise
    dtype = DTYPES[args.dtype]
    dev = torch.device("cuda")
    result: dict = {"case": case, "impl": impl, "status": "ok", "message": ""}
    stage = "inputs"
    try:
        if impl == "kdfast":
            import kdfast  # noqa: F401  (load the extension before the inputs)
        x = make_inputs_cuda(case, args.batch, args.classes, args.dim, args.teacher_dim, dtype,
                             dense_topk=impl in ("eager", "compile"))
        result["positives"] = x.num_positives
        torch.cuda.synchronize(dev)
        result["inputs_mb"] = torch.cuda.memory_allocated(dev) / common.MB
        stage = "setup"
        step, reset = make_cuda_step(impl, case, x)
        stage = "warm-up"
        warm = []
        for i in range(max(args.warmup, 1)):  # at least one: torch.compile and Triton compile here
            reset()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize(dev)
            warm.append(time.perf_counter() - t0)
            if i >= 1 and warm[-1] > args.impl_seconds / 10:  # a slow step needs no more warming
                break
        result["first_step_s"] = warm[0]
        stage = "peak memory"
        reset()
        peak_mb, _, loss = common.peak_memory_growth_mb(step, device="cuda")
        result["peak_mb"], result["loss"] = peak_mb, float(loss)
        stage = "timing"
        estimate = warm[-1] if len(warm) > 1 else warm[0]
        repeats = args.repeats
        if estimate * args.repeats > args.impl_seconds:  # a slow implementation: fewer steps, said in the table
            repeats = max(MIN_CUDA_REPEATS, min(args.repeats, int(args.impl_seconds / max(estimate, 1e-9))))
        times = common.time_cuda(step, repeats=repeats, setup=reset)
        result.update(times=times, time_s=common.median(times), steps=len(times))
        reset()
        if not args.no_check:
            stage = "check"
            if impl == "compile":
                result["check"] = {"skipped": "compiles eager's function; a second shape would compile again"}
            else:
                try:
                    result["check"] = cuda_check(case, impl, x, args.check_rows, args.dtype)
                except Exception as exc:  # noqa: BLE001  (a failed check is reported, the timing stays)
                    traceback.print_exc()
                    result["check"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "ok": False}
    except PeerUnavailable as exc:
        result.update(status="not installed", message=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        result.update(status="oom", message=f"out of memory during {stage}: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # noqa: BLE001  (one failing implementation must not end the run)
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        result.update(status="error", message=f"{type(exc).__name__} during {stage}: {first}")
    try:  # after a kernel fault the CUDA context is dead: keep the error, not this number
        result["max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / common.MB
    except Exception as exc:  # noqa: BLE001
        result["max_allocated_mb"] = f"unavailable ({type(exc).__name__})"
    return result


def gemm_worker(args: argparse.Namespace) -> dict:
    """The GPU and the rate of a ``[N, N] @ [N, N]`` matmul in the benchmark's dtype (median of
    ``GEMM_REPEATS`` after 3 warm-ups, CUDA events, random data)."""
    dtype, dev = DTYPES[args.dtype], torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"
    g = torch.Generator(device=dev).manual_seed(SEED)
    a = torch.randn(GEMM_N, GEMM_N, generator=g, device=dev, dtype=dtype)
    b = torch.randn(GEMM_N, GEMM_N, generator=g, device=dev, dtype=dtype)
    c = torch.empty(GEMM_N, GEMM_N, device=dev, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = common.time_cuda(lambda: torch.mm(a, b, out=c), repeats=GEMM_REPEATS)
    flops = 2.0 * GEMM_N**3
    props = torch.cuda.get_device_properties(dev)
    return {
        "tflops": flops / common.median(times) / 1e12, "runs_tflops": [flops / t / 1e12 for t in times],
        "device": torch.cuda.get_device_name(dev), "sm_count": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30, "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "cuda": torch.version.cuda,
    }


def cuda_worker_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--device", "cuda", *extra,
        "--batch", str(args.batch), "--classes", str(args.classes), "--dim", str(args.dim),
        "--teacher-dim", str(args.teacher_dim), "--dtype", args.dtype, "--repeats", str(args.repeats),
        "--warmup", str(args.warmup), "--impl-seconds", str(args.impl_seconds), "--check-rows", str(args.check_rows),
    ] + (["--no-check"] if args.no_check else [])


def peer_version(impl: str) -> str | None:
    """The installed version of a peer library, or ``None`` if it is not installed (without importing it)."""
    import importlib.metadata
    import importlib.util

    if impl not in PEER_MODULES:
        return None
    if importlib.util.find_spec(PEER_MODULES[impl]) is None:
        return None
    try:
        return importlib.metadata.version(PEER_DISTRIBUTIONS[impl])
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def cuda_plan(cases: list[str], impls: list[str]) -> list[tuple[str, str]]:
    """The (case, impl) pairs to run, implementation by implementation (kdfast first), each only
    on the losses it has."""
    return [(case, impl) for impl in CUDA_IMPLS if impl in impls for case in cases if case in CUDA_SUPPORT[impl]]


def _gemm_rate(payload: dict) -> float | None:
    rates = [g["tflops"] for g in payload.get("gemm", {}).values() if g and g.get("tflops")]
    return max(rates) if rates else None


def summarize_cuda(payload: dict) -> dict:
    """Per result: the derived columns; per case: kdfast against its fastest peer and the goals."""
    a = payload["args"]
    B, V, d, dt = a["batch"], a["classes"], a["dim"], a["teacher_dim"]
    elem = DTYPES[a["dtype"]].itemsize
    tflops = _gemm_rate(payload)
    results = payload["results"]
    by = {(r["case"], r["impl"]): r for r in results}
    for r in results:
        inputs, grads = state_bytes(r["case"], B, V, d, dt, elem, r.get("positives", 0))
        r["state_mb"] = (inputs + grads) / common.MB
        r["floor_s"] = cuda_floor_flops(r["case"], B, V, d, dt) / (tflops * 1e12) if tflops else None
        if r.get("status") == "ok":
            r["extra_mb"] = r["peak_mb"] - grads / common.MB
            r["mem_ratio"] = (inputs / common.MB + r["peak_mb"]) / r["state_mb"] if r["state_mb"] else None
            r["x_floor"] = r["time_s"] / r["floor_s"] if r["floor_s"] else None
    cases = []
    for case in [c for c in CUDA_CASES if any(r["case"] == c for r in results)]:
        k = by.get((case, "kdfast"))
        k_ok = k if k and k.get("status") == "ok" else None
        peers = [by[(case, p)] for p in PEERS if by.get((case, p), {}).get("status") == "ok"]
        fastest = min(peers, key=lambda r: r["time_s"]) if peers else None
        speedup = fastest["time_s"] / k_ok["time_s"] if k_ok and fastest else None
        goals = []
        if case == "topk":
            rows_s = B / k_ok["time_s"] if k_ok else None
            goals.append(("throughput", None if rows_s is None else rows_s >= GOAL_TOPK_ROWS_PER_S,
                          "not measured" if rows_s is None else
                          f"{rows_s:,.0f} rows/s {'>=' if rows_s >= GOAL_TOPK_ROWS_PER_S else '<'} "
                          f"{GOAL_TOPK_ROWS_PER_S:,}"))
        else:
            goals.append(("speed", None if speedup is None else speedup >= GOAL_PEER_SPEEDUP,
                          "not measured" if speedup is None else
                          f"{speedup:.2f}x the fastest peer ({IMPL_TITLES[fastest['impl']]}) "
                          f"{'>=' if speedup >= GOAL_PEER_SPEEDUP else '<'} {GOAL_PEER_SPEEDUP:g}x"))
            ratio = k_ok.get("mem_ratio") if k_ok else None
            goals.append(("memory", None if ratio is None else ratio <= GOAL_MEMORY,
                          "not measured" if ratio is None else
                          f"peak {ratio:.3f}x weights + gradients {'<=' if ratio <= GOAL_MEMORY else '>'} "
                          f"{GOAL_MEMORY:g}x"))
            xf = k_ok.get("x_floor") if k_ok else None
            goals.append(("floor", None if xf is None else xf <= GOAL_FLOOR_CUDA,
                          "not measured" if xf is None else
                          f"time {xf:.2f}x the floor {'<=' if xf <= GOAL_FLOOR_CUDA else '>'} {GOAL_FLOOR_CUDA:g}x"))
        cases.append({"case": case, "kdfast": k_ok, "fastest": fastest, "speedup": speedup, "goals": goals})
    kd, dd = by.get(("ce_kd_linear", "kdfast")), by.get(("dd_linear", "kdfast"))
    dd_goal = None
    if kd and dd and kd.get("status") == "ok" and dd.get("status") == "ok":
        ratio = dd["time_s"] / kd["time_s"]
        detail = (f"double distillation {ratio:.2f}x kdfast's KD time "
                  f"{'<=' if ratio <= GOAL_DD_VS_KD else '>'} {GOAL_DD_VS_KD:g}x")
        dd_goal = (ratio <= GOAL_DD_VS_KD, detail)
    return {"tflops": tflops, "cases": cases, "dd_goal": dd_goal}


def _ms(x: float | None) -> str:
    return common.fmt(None if x is None else 1e3 * x, ".2f")


def cuda_table_rows(payload: dict) -> list[list[str]]:
    by_case_kdfast = {r["case"]: r for r in payload["results"] if r["impl"] == "kdfast" and r.get("status") == "ok"}
    rows = []
    for case in CUDA_CASES:
        for impl in CUDA_IMPLS:
            r = next((r for r in payload["results"] if r["case"] == case and r["impl"] == impl), None)
            if r is None:
                continue
            ok = r.get("status") == "ok"
            k = by_case_kdfast.get(case)
            vs = (r["time_s"] / k["time_s"]) if ok and k and impl != "kdfast" else None
            check = r.get("check") or {}
            check_s = ("-" if not check else "skipped" if "skipped" in check else "OK" if check.get("ok") else "MISMATCH")
            steps = f"{r.get('steps', '-')}" if ok else "-"
            rows.append([
                CUDA_CASE_TITLES[case], IMPL_TITLES[impl],
                "ok" if ok else f"{r.get('status')}: {r.get('message', '')}"[:90].replace("|", "/"),
                _ms(r.get("time_s") if ok else None), steps, common.fmt(r.get("x_floor"), ".2f"),
                common.fmt(vs, ".2f"), common.fmt(r.get("peak_mb") if ok else None, ".0f"),
                common.fmt(r.get("extra_mb"), ".0f"), common.fmt(r.get("mem_ratio"), ".3f"),
                common.fmt(r.get("loss") if ok else None, ".5f"), check_s,
            ])
    return rows


CUDA_HEADERS = ["case", "implementation", "status", "time ms", "steps", "x floor", "x kdfast time",
                "peak MB", "extra MB", "peak / (weights+grads)", "loss", "check"]
CUDA_ALIGN = "lllrrrrrrrrl"


def cuda_goal_lines(summary: dict) -> list[str]:
    lines = []
    for c in summary["cases"]:
        lines.append(f"{CUDA_CASE_TITLES[c['case']]}: "
                     + "; ".join(f"{name} {'-' if ok is None else _verdict(ok)} ({detail})"
                                 for name, ok, detail in c["goals"]))
    if summary["dd_goal"] is not None:
        ok, detail = summary["dd_goal"]
        lines.append(f"double distillation vs KD (both teacher on the fly): {_verdict(ok)} ({detail})")
    else:
        lines.append("double distillation vs KD: - (needs kdfast's ce_kd_linear and dd_linear)")
    return lines


def cuda_check_lines(payload: dict) -> list[str]:
    return [cuda_check_line(r["case"], r["impl"], r["check"]) for r in payload["results"]
            if r.get("status") == "ok" and r.get("check") and "skipped" not in r["check"]]


def cuda_speedup_lines(summary: dict) -> list[str]:
    lines = []
    for c in summary["cases"]:
        k, f = c["kdfast"], c["fastest"]
        if k and f:
            lines.append(f"{CUDA_CASE_TITLES[c['case']]}: kdfast {_ms(k['time_s'])} ms, fastest peer "
                         f"{IMPL_TITLES[f['impl']]} {_ms(f['time_s'])} ms: {c['speedup']:.2f}x")
        else:
            lines.append(f"{CUDA_CASE_TITLES[c['case']]}: no speedup (kdfast {'ok' if k else 'not measured'}, "
                         f"{'a peer ok' if f else 'no peer measured'})")
    return lines


def cuda_markdown(payload: dict, summary: dict) -> str:
    meta, a = payload["meta"], payload["args"]
    gemm = payload.get("gemm", {})
    rates = ", ".join(f"{w} {g['tflops']:.0f}" for w, g in gemm.items() if g and g.get("tflops"))
    peers = ", ".join(f"{IMPL_TITLES[p]} {v or 'not installed'}" for p, v in payload.get("peers", {}).items())
    tf = summary["tflops"]
    lines = [
        (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · torch {meta['torch']} "
         f"(CUDA {meta.get('cuda', '?')}) · kdfast {meta['kdfast']} · Python {meta['python']} · {peers}"),
        "",
        (f"B = {a['batch']:,}, d_s = {a['dim']}, V = {a['classes']:,}, d_t = {a['teacher_dim']} (teacher on the fly "
         f"and teacher labeling), top-{TOPK} teacher, {POSITIVES_PER_ROW} positives per row for pick-all-labels; "
         f"{a['dtype']}, forward + backward (gradients of h and W; labeling: forward only); time = median of the "
         f"timed steps (CUDA events; `steps` says how many: {a['repeats']} unless a step is so slow that "
         f"{a['impl_seconds']:g} s would not hold them, at least {MIN_CUDA_REPEATS}) after up to {a['warmup']} "
         f"warm-up steps; one fresh process per row. **peak MB** = growth of `torch.cuda.max_memory_allocated` "
         f"over one step after the warm-up (peak stats reset before), counted from the moment the inputs exist; "
         f"**extra MB** = peak MB minus the returned gradients; **peak / (weights+grads)** = (the inputs in compact "
         f"form + peak MB) / (those inputs + the gradients): weights, activations, labels and the top-k teacher, "
         f"not eager's dense top-k copy. **floor** = 6·B·d_s·V flops (+ 2·B·d_t·V for a teacher on the fly; "
         f"2·B·d_t·V for labeling) at the {GEMM_N}³ {a['dtype']} matmul rate measured in the same run "
         f"(TFLOP/s: {rates or 'not measured'}; the higher is used"
         + (f": {tf:.0f})." if tf else ").")
         + " Peers run with their defaults; for pick-all-labels eager, torch.compile, Liger-Kernel and Cut "
           "Cross-Entropy get the rows expanded to one per positive; Liger's KD is its fused linear CE plus "
           "its fused linear JSD with `jsd_beta=0` (forward KL) times T²."),
        "",
        common.markdown_table(CUDA_HEADERS, cuda_table_rows(payload), CUDA_ALIGN),
        "",
        "Speedup of kdfast over the fastest peer (eager, torch.compile, Liger-Kernel, Cut Cross-Entropy):",
        "",
    ]
    lines += [f"- {s}" for s in cuda_speedup_lines(summary)]
    checks = cuda_check_lines(payload)
    if checks:
        loss_tol, grad_tol = CHECK_TOL[check_tol_kind(a["dtype"])]
        lines += ["", (f"Each implementation against eager in float32 on the same values, first {a['check_rows']} "
                       f"rows (loss relative error <= {_e(loss_tol)}, ||g - g_ref|| / ||g_ref|| <= {_e(grad_tol)}; "
                       "torch.compile not checked):"), ""]
        lines += [f"- {c}" for c in checks]
    lines += ["", (f"Goals (issue 6: kdfast >= {GOAL_PEER_SPEEDUP:g}x faster than the fastest peer on every shared "
                   f"loss; double distillation within {GOAL_DD_VS_KD:g}x of kdfast's KD time; peak memory <= "
                   f"weights + gradients + {100 * (GOAL_MEMORY - 1):.0f}%; time within {GOAL_FLOOR_CUDA:g}x the "
                   f"floor; teacher labeling >= {GOAL_TOPK_ROWS_PER_S:,} rows/s):"), ""]
    lines += [f"- {g}" for g in cuda_goal_lines(summary)]
    return "\n".join(lines)


def _cell(x: float | None, spec: str) -> str:
    """A CSV cell: ``format(x, spec)``, empty for a missing value."""
    return "" if x is None else format(x, spec)


def cuda_csv_rows(payload: dict, summary: dict) -> list[dict]:
    meta, a = payload["meta"], payload["args"]
    speedups = {c["case"]: c["speedup"] for c in summary["cases"]}
    rows = []
    for r in payload["results"]:
        ok = r.get("status") == "ok"
        check = r.get("check") or {}
        rows.append({
            **{k: meta[k] for k in ("date", "commit", "device", "torch", "kdfast", "python")},
            "case": r["case"], "impl": r["impl"], "status": r.get("status"), "batch": a["batch"],
            "classes": a["classes"], "d": a["dim"],
            "d_t": a["teacher_dim"] if r["case"] in ON_THE_FLY + ("topk",) else "", "dtype": a["dtype"],
            "steps": r.get("steps", "") if ok else "", "time_s": f"{r['time_s']:.6f}" if ok else "",
            "floor_s": _cell(r.get("floor_s"), ".6f"), "x_floor": _cell(r.get("x_floor"), ".3f"),
            "speedup_vs_fastest_peer": _cell(speedups.get(r["case"]), ".3f") if r["impl"] == "kdfast" else "",
            "peak_mb": f"{r['peak_mb']:.1f}" if ok else "", "extra_mb": f"{r['extra_mb']:.1f}" if ok else "",
            "state_mb": f"{r['state_mb']:.1f}", "mem_ratio": _cell(r.get("mem_ratio"), ".4f"),
            "loss": f"{r['loss']:.6f}" if ok else "",
            "check": "" if not check or "skipped" in check else ("ok" if check.get("ok") else "mismatch"),
            "gemm_tflops": _cell(summary["tflops"], ".1f"), "message": r.get("message", ""),
        })
    return rows


def report_cuda(payload: dict, write: bool) -> int:
    """Print the tables and goals of a CUDA run; write the CSV rows and the BENCHMARKS.md section
    when ``write``. Returns 1 if a check found a mismatch, else 0."""
    summary = summarize_cuda(payload)
    print()
    common.print_table(CUDA_HEADERS, cuda_table_rows(payload))
    print("\nspeedup of kdfast over the fastest peer:")
    for s in cuda_speedup_lines(summary):
        print("  " + s)
    checks = cuda_check_lines(payload)
    if checks:
        print("\ncorrectness (each implementation vs eager in float32 on the same values):")
        for c in checks:
            print("  " + c)
    print(f"\nfloor at {common.fmt(summary['tflops'], '.0f')} TFLOP/s ({GEMM_N}^3 {payload['args']['dtype']} matmul)")
    print("\ngoals (issue 6):")
    for g in cuda_goal_lines(summary):
        print("  " + g)
    if write:
        common.append_csv(CSV_PATH_CUDA, cuda_csv_rows(payload, summary), CUDA_CSV_COLUMNS)
        common.update_markdown_section(common.BENCHMARKS_MD, MD_SECTION_CUDA, cuda_markdown(payload, summary))
        print(f"\nwrote {CSV_PATH_CUDA} and the {MD_SECTION_CUDA} section of {common.BENCHMARKS_MD}")
    bad = [r for r in payload["results"] if (r.get("check") or {}).get("ok") is False]
    return 1 if bad else 0


def merge_payloads(paths: list[str]) -> dict:
    """One payload from the JSON files of several runs (e.g. a run split across two device
    calls): a result of a later file replaces the earlier one of the same (case, impl), unless
    the later one was skipped for lack of time; the runs must share their shapes and dtype."""
    import json

    merged: dict | None = None
    for path in paths:
        p = json.loads(Path(path).read_text())
        if merged is None:
            merged = p
            continue
        keys = ("batch", "classes", "dim", "teacher_dim", "dtype")
        if any(p["args"][k] != merged["args"][k] for k in keys):
            raise ValueError(f"{path}: shapes/dtype {[p['args'][k] for k in keys]} differ from "
                             f"{[merged['args'][k] for k in keys]}")
        have = {(r["case"], r["impl"]) for r in merged["results"]}
        later = [r for r in p["results"] if r.get("status") != "skipped" or (r["case"], r["impl"]) not in have]
        new = {(r["case"], r["impl"]) for r in later}
        merged["results"] = [r for r in merged["results"] if (r["case"], r["impl"]) not in new] + later
        for when, g in p.get("gemm", {}).items():
            if g:
                merged.setdefault("gemm", {})[f"{when} ({Path(path).name})"] = g
        for name, version in p.get("peers", {}).items():
            merged.setdefault("peers", {})[name] = version or merged["peers"].get(name)
    if merged is None:
        raise ValueError("no JSON files given")
    return merged


def main_cuda(args: argparse.Namespace) -> int:
    """``--device cuda``: run every (case, impl) in its own process and report (see the module doc)."""
    if args._gemm:
        common.emit_worker_result(gemm_worker(args))
        return 0
    if args._cuda_worker:
        common.emit_worker_result(cuda_worker(*args._cuda_worker, args))
        return 0
    if args.merge_json:
        payload = merge_payloads(args.merge_json)
        payload["meta"]["commit"] = os.environ.get("KDFAST_COMMIT") or payload["meta"]["commit"]
        return report_cuda(payload, write=not args.no_write)
    if not torch.cuda.is_available():
        print(f"error: CUDA is not available (torch {torch.__version__}, built with CUDA {torch.version.cuda}): "
              "run --device cuda on a GPU machine; --merge-json renders a saved run's JSON without one",
              file=sys.stderr)
        return 2
    start = _clock()

    def left() -> float:
        return math.inf if not args.time_budget else args.time_budget - (_clock() - start)

    meta = common.env_metadata("cpu")
    # the GPU is named by the matmul worker: the parent never opens a CUDA context of its own
    meta.update(device="GPU (not named: the matmul worker failed)", cuda=torch.version.cuda)
    # the device machine's copy of the tree may have no .git: KDFAST_COMMIT names the commit there
    meta["commit"] = os.environ.get("KDFAST_COMMIT") or meta["commit"]
    if "kdfast" in args.impl_list:
        registered = False
        if meta["kdfast"] != "unavailable":
            registered = torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::fused_linear_loss_forward", "CUDA")
        if not registered:
            print("warning: kdfast is not importable or was built without its CUDA kernels "
                  "(build with a CUDA torch and nvcc); kdfast's rows will be errors", flush=True)
    peers = {p: peer_version(p) for p in ("liger", "cce") if p in args.impl_list}
    payload = {"meta": meta, "args": {k: getattr(args, k) for k in (
        "batch", "classes", "dim", "teacher_dim", "dtype", "repeats", "warmup", "impl_seconds", "check_rows")},
        "peers": peers, "gemm": {}, "results": []}

    def save() -> None:
        if args.json:
            common.write_json(args.json, payload)

    print(f"bench_fused_linear (cuda): B={args.batch} d_s={args.dim} V={args.classes:,} d_t={args.teacher_dim} "
          f"{args.dtype}; torch {meta['torch']} (CUDA {meta['cuda']}), kdfast {meta['kdfast']}, commit {meta['commit']}; "
          + ", ".join(f"{IMPL_TITLES[p]} {v or 'not installed'}" for p, v in peers.items()), flush=True)

    def gemm(when: str) -> None:
        r, problem = common.try_run_worker(cuda_worker_argv(args, "--_gemm"), timeout=max(10.0, min(120.0, left())))
        payload["gemm"][when] = r
        if r:
            meta["device"] = r["device"]
            print(f"  {GEMM_N}^3 {args.dtype} matmul ({when}): {r['tflops']:.0f} TFLOP/s on {r['device']} "
                  f"({r['sm_count']} SMs, {r['memory_gib']:.0f} GiB, sm_{r['capability'].replace('.', '')})", flush=True)
        else:
            print(f"  matmul rate ({when}) not measured: {problem}", flush=True)

    gemm("start")
    save()
    for case, impl in cuda_plan(args.case_list, args.impl_list):
        label = f"  {case:12s} {impl:7s}"
        if impl in PEER_MODULES and peers.get(impl) is None:
            r = {"case": case, "impl": impl, "status": "not installed",
                 "message": f"{PEER_MODULES[impl]} is not importable"}
        elif left() < 15:
            r = {"case": case, "impl": impl, "status": "skipped", "message": "time budget spent"}
        else:
            print(f"{label} ...", flush=True)
            r, problem = common.try_run_worker(cuda_worker_argv(args, "--_cuda_worker", case, impl),
                                               timeout=min(args.worker_timeout, max(left() - 5, 10)))
            if r is None:
                r = {"case": case, "impl": impl, "status": "error", "message": f"worker failed: {problem}"}
        payload["results"].append(r)
        save()
        if r.get("status") == "ok":
            check = r.get("check") or {}
            cs = "" if not check or "skipped" in check else ("  check OK" if check.get("ok") else "  check MISMATCH")
            print(f"{label} {1e3 * r['time_s']:.3f} ms (median of {r['steps']}; first step {r['first_step_s']:.1f} s)  "
                  f"peak +{r['peak_mb']:.0f} MB  loss {r['loss']:.6f}{cs}", flush=True)
        else:
            print(f"{label} {r['status']}: {r.get('message', '')}", flush=True)
    if left() > 40:
        gemm("end")
    save()
    return report_cuda(payload, write=not args.no_write)



# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): kdfast vs eager, float32; cuda: kdfast vs eager, torch.compile, "
                        "Liger-Kernel and Cut Cross-Entropy, bf16 (issue 6)")
    p.add_argument("--batch", type=int, default=None, help="rows B (default 256 on cpu, 4096 on cuda)")
    p.add_argument("--classes", type=int, default=670_091, help="classes V (default 670,091)")
    p.add_argument("--dim", type=int, default=64, help="student hidden size d_s (default 64)")
    p.add_argument("--teacher-dim", type=int, default=512, help="teacher hidden size d_t (default 512)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps; the median is reported (default 3 on cpu, 20 on cuda)")
    p.add_argument("--slow-repeats", type=int, default=2,
                   help=f"cpu: timed steps of eager in the slow cases {', '.join(SLOW_EAGER)} (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 1 on cpu, 3 on cuda)")
    p.add_argument("--cases", default="all",
                   help=f"comma-separated subset of {','.join(CASES)} (cuda also: topk), or all")
    p.add_argument("--impls", default="all",
                   help=f"comma-separated subset of {','.join(IMPLS)} (cuda: {','.join(CUDA_IMPLS)}), or all")
    p.add_argument("--threads", default="default", help="cpu: torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    g = p.add_argument_group("cuda only")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="input dtype (default bfloat16; cpu: float32)")
    g.add_argument("--impl-seconds", type=float, default=20.0,
                   help=f"time one (case, impl) may spend on timed steps: a slower one gets fewer than --repeats "
                        f"(at least {MIN_CUDA_REPEATS}) (default 20)")
    g.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds before one (case, impl) process is killed and reported as an error (default 300)")
    g.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run: (case, impl) pairs that would start later are reported as "
                        "skipped, and the report is still written (default 0: no limit)")
    g.add_argument("--check-rows", type=int, default=256,
                   help="rows of the correctness check against float32 eager (default 256)")
    g.add_argument("--json", metavar="PATH", help="also write the raw results here, after every (case, impl)")
    g.add_argument("--merge-json", nargs="+", metavar="PATH",
                   help="measure nothing: report (and unless --no-write, write the CSV rows and BENCHMARKS.md "
                        "section of) the runs saved by --json; needs no GPU")
    p.add_argument("--_worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--_sgemm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_cuda_worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--_gemm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    for name, value in (CUDA_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if cuda:
        args.dtype = args.dtype or "bfloat16"
        args.case_list = common.parse_subset(p, "--cases", args.cases, CUDA_CASES)
        args.impl_list = common.parse_subset(p, "--impls", args.impls, CUDA_IMPLS)
        if args.impl_seconds <= 0 or args.worker_timeout <= 0 or args.time_budget < 0 or args.check_rows < 1:
            p.error("--impl-seconds and --worker-timeout must be > 0, --time-budget >= 0, --check-rows >= 1")
    else:
        if args.dtype not in (None, "float32"):
            p.error("--dtype: the CPU benchmark runs in float32 only")
        if args.json or args.merge_json:
            p.error("--json and --merge-json belong to --device cuda")
        args.dtype = "float32"
        args.case_list = common.parse_subset(p, "--cases", args.cases, CASES)
        args.impl_list = common.parse_subset(p, "--impls", args.impls, IMPLS)
    if min(args.batch, args.classes, args.dim, args.teacher_dim, args.repeats, args.slow_repeats) < 1 \
            or args.warmup < 0:
        p.error("--batch, --classes, --dim, --teacher-dim, --repeats and --slow-repeats must be >= 1, --warmup >= 0")
    common.check_threads_arg(p, args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)
    if args._sgemm:
        common.emit_worker_result(sgemm_worker(args))
        return 0
    if args._worker:
        case, impl = args._worker
        common.emit_worker_result(worker(case, impl, args))
        return 0

    threads = common.set_threads(args.threads)
    meta = common.env_metadata("cpu", threads)
    if common.kdfast_missing(meta, args.impl_list):
        return 2
    print(f"bench_fused_linear: B={args.batch} d_s={args.dim} V={args.classes:,} d_t={args.teacher_dim} float32 "
          f"on {meta['device']}; torch {meta['torch']}, kdfast {meta['kdfast']}, commit {meta['commit']}")
    print(f"cases: {', '.join(args.case_list)}; impls: {', '.join(args.impl_list)}; "
          f"{args.warmup} warm-up + {args.repeats} timed steps each ({args.slow_repeats} for eager and compile in "
          f"{', '.join(c for c in args.case_list if c in SLOW_EAGER) or 'no case'}), one fresh process per (case, impl)")
    load_start = common.announce_load()
    sgemm = {"start": measure_sgemm(args, "start"), "end": None}
    results = common.run_cases(
        args.case_list, args.impl_list, lambda case, impl: worker_argv(case, impl, args),
        lambda r: (f"peak +{r['peak_mb']:.0f} MB, extra +{r['extra_peak_mb']:.1f} MB [{r['memory_method']}]  "
                   f"loss {r['loss']:.6f}"))
    sgemm["end"] = measure_sgemm(args, "end")
    gflops = max(sgemm.values())

    load_end = common.load_average()
    summary = summarize(results, args.case_list, args, gflops)
    positives = next((r["positives"] for (c, _), r in results.items() if c == "pal"), None)
    checks = [check_line(c, results[(c, impl)]["check"], positives or 0, impl)
              for impl in ("kdfast", "compile") for c in args.case_list if "check" in results.get((c, impl), {})]
    common.print_checks(checks)
    common.print_table(HEADERS, table_rows(summary))
    compiles = [f"{c} {r['compile_s']:.0f} s" for (c, impl), r in results.items() if impl == "compile"]
    if compiles:
        print("\ntorch.compile's first step (compiling, not timed): " + ", ".join(compiles))
    print(f"\nspeedup = eager time / kdfast time; vs compile = compile time / kdfast time; peak MB = growth of peak RSS over one forward+backward; "
          f"extra = peak minus the returned gradients ({(args.batch + args.classes) * args.dim * 4 / common.MB:.0f} MB); "
          f"extra ratio = kdfast extra / eager extra; floor at {gflops:.1f} GFLOP/s "
          f"(sgemm start {sgemm['start']:.1f}, end {sgemm['end']:.1f})")
    print("\ngoals (issue 3):")
    for r in summary:
        print(f"  {r['case']:12s} " + "; ".join(f"{name} {'-' if ok is None else _verdict(ok)} ({detail})"
                                               for name, ok, detail in r["goals"]))
    if load_end is not None:
        print(f"\nload average at end: {load_end:.2f} (1 min; {torch.get_num_threads()} threads used)")

    if not args.no_write:
        rows = []
        for (case, impl), r in results.items():
            eager_t = results.get((case, "eager"), {}).get("time_s")
            floor_s = next(s["floor_s"] for s in summary if s["case"] == case)
            rows.append({
                **meta, "case": case, "impl": impl, "batch": args.batch, "classes": args.classes,
                "d": args.dim, "d_t": args.teacher_dim if case in ON_THE_FLY else "", "dtype": "float32",
                "time_s": f"{r['time_s']:.4f}", "peak_mb": f"{r['peak_mb']:.1f}",
                "extra_peak_mb": f"{r['extra_peak_mb']:.1f}",
                "speedup_vs_eager": f"{eager_t / r['time_s']:.3f}" if eager_t else "",
                "floor_s": f"{floor_s:.4f}", "sgemm_gflops": f"{gflops:.1f}",
            })
        common.append_csv(CSV_PATH, rows, CSV_COLUMNS)
        method = next(iter(results.values()))["memory_method"] if results else "vmhwm"
        common.update_markdown_section(
            common.BENCHMARKS_MD, MD_SECTION,
            markdown_section(meta, args, summary, checks, method, sgemm, load_start, load_end, positives))
        print(f"\nwrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    failed = [c for c in checks if "MISMATCH" in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
