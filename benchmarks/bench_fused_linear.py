"""Forward+backward time and peak memory of ``kdfast.fused_linear_distillation_loss`` against PyTorch eager.

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

Each (case, implementation) runs in a fresh process: make the inputs, reset the peak RSS
(``/proc/self/clear_refs``), run one forward+backward and record the growth of the peak RSS
over it; then time ``--warmup`` + ``--repeats`` more steps (median reported; ``--slow-repeats``
for eager in the cases where its step takes 5-30 s). "Extra" peak
is that growth minus the bytes of the gradients the step returns ((B + V) * d_s * 4): the
memory beyond the inputs and the outputs. The kdfast worker finally checks its loss and
gradients against eager once. A separate worker measures the sgemm rate (4096^3 float32
matmul, same threads) at the start and the end of the run; each case's floor is
``(6 B d_s V [+ 2 B d_t V for an on-the-fly teacher]) / rate`` at the higher of the two rates.

Results are appended to ``benchmarks/results/fused_linear.csv`` and written to the
``bench_fused_linear`` section of ``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_fused_linear.py                     # the full run (~10 minutes on 2 cores)
    python benchmarks/bench_fused_linear.py --cases ce,pal --repeats 5 --slow-repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CASES = ("ce", "ce_kd_linear", "dd_linear", "dd_topk", "pal")
IMPLS = ("eager", "kdfast")

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
BUSY_LOAD = 0.5  # 1-minute load average above which the timings are flagged as disturbed
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


def make_step(impl: str, case: str, x: Inputs) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(step, reset)``: ``step()`` runs forward+backward and returns the loss (detached);
    ``reset()`` drops the previous gradients so that every step allocates its own."""
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


def check_against_eager(case: str, x: Inputs) -> dict:
    """kdfast's loss and gradients (of h and W) against eager's, on the same inputs."""
    step_k, reset = make_step("kdfast", case, x)
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
    gc.collect()
    peak_mb, method, loss = common.peak_memory_growth_mb(step)
    times = common.time_fn(step, repeats=args.repeats, warmup=args.warmup, setup=reset)
    gbytes = grad_bytes(x)
    result = {
        "case": case, "impl": impl, "threads": threads, "peak_mb": peak_mb, "memory_method": method,
        "grad_mb": gbytes / common.MB, "extra_peak_mb": peak_mb - gbytes / common.MB,
        "times": times, "time_s": common.median(times), "loss": loss.item(), "positives": x.num_positives,
    }
    reset()
    if impl == "kdfast" and not args.no_check:
        result["check"] = check_against_eager(case, x)
    return result


def repeats_for(case: str, impl: str, args: argparse.Namespace) -> int:
    """Timed steps of ``(case, impl)``: ``--slow-repeats`` for eager in the slow cases, else ``--repeats``."""
    return args.slow_repeats if impl == "eager" and case in SLOW_EAGER else args.repeats


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
    """One summary per case: times, peaks, extra peaks, speedup, extra ratio, floor, goals."""
    out = []
    for case in cases:
        e, k = results.get((case, "eager")), results.get((case, "kdfast"))
        speedup = e["time_s"] / k["time_s"] if e and k else None
        extra_ratio = (k["extra_peak_mb"] / e["extra_peak_mb"] if e and k and e["extra_peak_mb"] > 0 else None)
        floor_s = (floor_flops(case, args.batch, args.classes, args.dim, args.teacher_dim) / (gflops * 1e9)
                   if gflops else None)
        floor_ratio = k["time_s"] / floor_s if k and floor_s else None
        gemm_s = (kdfast_gemm_flops(case, args.batch, args.classes, args.dim, args.teacher_dim) / (gflops * 1e9)
                  if gflops else None)
        goals = goal_checks(case, speedup, extra_ratio, floor_ratio)
        out.append({
            "case": case, "eager": e, "kdfast": k, "speedup": speedup, "extra_ratio": extra_ratio,
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
        e, k = r["eager"] or {}, r["kdfast"] or {}
        rows.append([
            CASE_TITLES[r["case"]],
            common.fmt(e.get("time_s"), ".3f"), common.fmt(k.get("time_s"), ".3f"), common.fmt(r["speedup"], ".2f"),
            common.fmt(e.get("peak_mb"), ".0f"), common.fmt(k.get("peak_mb"), ".0f"),
            common.fmt(e.get("extra_peak_mb"), ".0f"), common.fmt(k.get("extra_peak_mb"), ".1f"), common.fmt(r["extra_ratio"], ".3f"),
            common.fmt(r["floor_s"], ".3f"), common.fmt(r["floor_ratio"], ".2f"),
            common.fmt(r["gemm_s"], ".3f"), common.fmt(r["gemm_ratio"], ".2f"), _goals_short(r["goals"]),
        ])
    return rows


HEADERS = ["case", "eager s", "kdfast s", "speedup", "eager peak MB", "kdfast peak MB", "eager extra MB",
           "kdfast extra MB", "extra ratio", "floor s", "kdfast/floor", "kdfast GEMMs s", "kdfast/GEMMs", "goals"]
ALIGN = "lrrrrrrrrrrrrl"


def check_line(case: str, check: dict, positives: int = 0) -> str:
    ok = check["loss_ok"] and check["grad_h_ok"] and check["grad_W_ok"]
    parts = [(f"{case}: loss kdfast {check['loss_kdfast']:.6f} vs eager {check['loss_eager']:.6f} "
              f"({'allclose' if check['loss_ok'] else 'NOT allclose'})")]
    for name in ("h", "W"):
        diff, scale = check[f"grad_{name}_max_abs_diff"], check[f"grad_{name}_max_abs"]
        rel = diff / scale if scale else float("nan")
        parts.append(f"grad {name} max|diff| {diff:.3g} = {rel:.2g} of max|grad| "
                     f"({'allclose' if check[f'grad_{name}_ok'] else 'NOT allclose'})")
    if case == "pal":
        parts[0] += f" [{positives} positives; eager = {positives} expanded rows]"
    verdict = "OK: kdfast equals eager" if ok and case == "pal" else ("OK" if ok else "MISMATCH")
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
    lines = [
        (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · "
         f"torch {meta['torch']} · kdfast {meta['kdfast']} · Python {meta['python']}"),
        "",
        (f"B = {args.batch}, d_s = {args.dim}, V = {args.classes:,}, d_t = {args.teacher_dim} (on-the-fly teacher), "
         f"top-{TOPK} teacher, {POSITIVES_PER_ROW} positives per row for pick-all-labels{pos}; float32, forward + "
         f"backward (gradients of h and W); time = median of {args.repeats} ({args.slow_repeats} for eager in the "
         f"slow cases {', '.join(SLOW_EAGER)}) after {args.warmup} warm-up; "
         f"peak MB = {method}; extra MB = peak MB minus the {gmb:.0f} MB of returned gradients; "
         "speedup = eager time / kdfast time; extra ratio = kdfast extra / eager extra; "
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
        lines += ["", (f"kdfast vs eager on these inputs (loss rtol {_e(LOSS_RTOL)}, atol {_e(LOSS_ATOL)}; gradients "
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
# main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="rows B (default 256)")
    p.add_argument("--classes", type=int, default=670_091, help="classes V (default 670,091)")
    p.add_argument("--dim", type=int, default=64, help="student hidden size d_s (default 64)")
    p.add_argument("--teacher-dim", type=int, default=512, help="teacher hidden size d_t (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported (default 3)")
    p.add_argument("--slow-repeats", type=int, default=2,
                   help=f"timed steps of eager in the slow cases {', '.join(SLOW_EAGER)} (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}, or all")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    p.add_argument("--threads", default="default", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--no-check", action="store_true", help="skip the kdfast-vs-eager correctness check")
    p.add_argument("--_worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--_sgemm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.case_list = common.parse_subset(p, "--cases", args.cases, CASES)
    args.impl_list = common.parse_subset(p, "--impls", args.impls, IMPLS)
    if min(args.batch, args.classes, args.dim, args.teacher_dim, args.repeats, args.slow_repeats) < 1 \
            or args.warmup < 0:
        p.error("--batch, --classes, --dim, --teacher-dim, --repeats and --slow-repeats must be >= 1, --warmup >= 0")
    common.check_threads_arg(p, args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._sgemm:
        common.emit_worker_result(sgemm_worker(args))
        return 0
    if args._worker:
        case, impl = args._worker
        common.emit_worker_result(worker(case, impl, args))
        return 0

    threads = common.set_threads(args.threads)
    meta = common.env_metadata("cpu", threads)
    if "kdfast" in args.impl_list and meta["kdfast"] == "unavailable":
        print("error: kdfast does not import (build it with `make` or `pip install --no-build-isolation -e .`), "
              "or run the eager baselines alone with --impls eager", file=sys.stderr)
        return 2
    print(f"bench_fused_linear: B={args.batch} d_s={args.dim} V={args.classes:,} d_t={args.teacher_dim} float32 "
          f"on {meta['device']}; torch {meta['torch']}, kdfast {meta['kdfast']}, commit {meta['commit']}")
    print(f"cases: {', '.join(args.case_list)}; impls: {', '.join(args.impl_list)}; "
          f"{args.warmup} warm-up + {args.repeats} timed steps each ({args.slow_repeats} for eager in "
          f"{', '.join(c for c in args.case_list if c in SLOW_EAGER) or 'no case'}), one fresh process per (case, impl)")
    load_start = common.load_average()
    print(f"load average at start: {load_start:.2f}\n" if load_start is not None else "")
    if load_start is not None and load_start > BUSY_LOAD:
        print(f"warning: the machine is busy (load {load_start:.2f}); other processes will distort the timings\n")

    sgemm = {"start": measure_sgemm(args, "start"), "end": None}
    results: dict[tuple[str, str], dict] = {}
    for case in args.case_list:
        for impl in args.impl_list:
            print(f"  {case:12s} {impl:7s} ...", flush=True)
            r = common.run_worker(worker_argv(case, impl, args))
            results[(case, impl)] = r
            times = ", ".join(f"{t:.3f}" for t in r["times"])
            print(f"  {case:12s} {impl:7s} time {r['time_s']:.3f} s (runs: {times})  peak +{r['peak_mb']:.0f} MB, "
                  f"extra +{r['extra_peak_mb']:.1f} MB [{r['memory_method']}]  loss {r['loss']:.6f}", flush=True)
    sgemm["end"] = measure_sgemm(args, "end")
    gflops = max(sgemm.values())

    load_end = common.load_average()
    summary = summarize(results, args.case_list, args, gflops)
    positives = next((r["positives"] for (c, _), r in results.items() if c == "pal"), None)
    checks = [check_line(c, results[(c, "kdfast")]["check"], positives or 0) for c in args.case_list
              if "check" in results.get((c, "kdfast"), {})]
    print()
    if checks:
        print("correctness (kdfast vs eager, same inputs):")
        for c in checks:
            print("  " + c)
        print()
    common.print_table(HEADERS, table_rows(summary))
    print(f"\nspeedup = eager time / kdfast time; peak MB = growth of peak RSS over one forward+backward; "
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
