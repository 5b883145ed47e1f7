"""Forward+backward time and peak memory of ``kdfast.distillation_loss`` against PyTorch eager.

Three cases on dense ``[B, V]`` float32 logits (default B=256, V=670,091: the
Amazon-670K student of ``shared/DESIGN.md`` section 3), loss and gradient of the
student logits only (no linear layer):

* ``ce``     hard cross-entropy:   eager ``F.cross_entropy(f, y)``;
* ``ce_kd``  0.5 * hard CE + 0.5 * T^2 * KL(softmax(s/T) || softmax(f/T)), T=2, dense teacher:
             eager ``F.cross_entropy`` + ``F.kl_div(log_softmax(f/T), log_softmax(s/T),
             log_target=True, reduction="batchmean")``;
* ``double`` double distillation (seed 003 eq. 13) with w = 1 - sigmoid(s) (a=1, b=0):
             eager ``logsumexp(f + log w) - sum(softmax(s) * f)`` in plain torch ops.

Each (case, implementation) runs in a fresh process: make the inputs, reset the peak
RSS (``/proc/self/clear_refs``), run one forward+backward and record the growth of the
peak RSS over it; then time ``--warmup`` + ``--repeats`` more steps (median reported).
The kdfast worker finally checks its loss and gradient against eager once.

Results are appended to ``benchmarks/results/losses.csv`` and written to the
``bench_losses`` section of ``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_losses.py                      # the full run (a few minutes on 2 cores)
    python benchmarks/bench_losses.py --cases ce_kd --repeats 5 --no-write
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CASES = ("ce", "ce_kd", "double")
IMPLS = ("eager", "kdfast")

CASE_TITLES = {
    "ce": "hard CE",
    "ce_kd": "hard CE + soft KD (T=2), dense teacher",
    "double": "double distillation (sigmoid w, a=1, b=0)",
}

# the loss parameters of each case
TEMPERATURE = 2.0
HARD_WEIGHT_KD = 0.5
SOFT_WEIGHT_KD = 0.5
NEG_SCALE = 1.0  # a
NEG_SHIFT = 0.0  # b

KDFAST_KWARGS = {
    "ce": {"hard_weight": 1.0},
    "ce_kd": {"hard_weight": HARD_WEIGHT_KD, "soft_weight": SOFT_WEIGHT_KD, "temperature": TEMPERATURE},
    "double": {
        "hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "sigmoid",
        "negative_scale": NEG_SCALE, "negative_shift": NEG_SHIFT,
    },
}

# the goal of issue 2, for the cases that have one: (min speedup, max kdfast/eager peak memory)
GOALS = {"ce_kd": (2.0, 0.5)}

CSV_COLUMNS = (
    "date", "commit", "device", "torch", "kdfast", "python",
    "case", "impl", "batch", "classes", "dtype", "time_s", "peak_mb", "speedup_vs_eager",
)
CSV_PATH = common.RESULTS_DIR / "losses.csv"
MD_SECTION = "bench_losses"

STUDENT_STD = 1.0  # student logits ~ N(0, 1)
TEACHER_STD = 2.0  # teacher logits ~ N(0, 4): a peakier distribution than the student's
SEED = 0


# ---------------------------------------------------------------------------
# inputs and the two implementations
# ---------------------------------------------------------------------------


def needs_teacher(case: str) -> bool:
    return case in ("ce_kd", "double")


def make_inputs(
    case: str, batch: int, classes: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(f, y, s)``: student logits (requires grad), labels, teacher logits (or ``None``).

    Made in place (``empty().normal_()``), so that no temporary raises the peak RSS before the
    measurement starts; the same seed gives the same inputs in every worker.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    f = torch.empty(batch, classes, dtype=dtype, device=device).normal_(0.0, STUDENT_STD, generator=g)
    f.requires_grad_(True)
    y = torch.randint(classes, (batch,), generator=g, device=device)
    s = None
    if needs_teacher(case):
        s = torch.empty(batch, classes, dtype=dtype, device=device).normal_(0.0, TEACHER_STD, generator=g)
    return f, y, s


def eager_loss(case: str, f: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch-eager baseline of each case (what a user writes without kdfast)."""
    if case == "ce":
        return F.cross_entropy(f, y)
    if case == "ce_kd":
        T = TEMPERATURE
        hard = F.cross_entropy(f, y)
        soft = F.kl_div(F.log_softmax(f / T, dim=-1), F.log_softmax(s / T, dim=-1),
                        reduction="batchmean", log_target=True)
        return HARD_WEIGHT_KD * hard + SOFT_WEIGHT_KD * T * T * soft
    if case == "double":
        # kdfast/reference.py double_loss: LSE(f + log w) - <softmax(s), f>, w = 1 - sigmoid(a (s - b))
        z = s if (NEG_SCALE, NEG_SHIFT) == (1.0, 0.0) else NEG_SCALE * (s - NEG_SHIFT)
        log_w = -F.softplus(z)  # log(1 - sigmoid(z))
        p = torch.softmax(s, dim=-1)
        return (torch.logsumexp(f + log_w, dim=-1) - (p * f).sum(-1)).mean()
    raise ValueError(f"unknown case {case!r}")


def kdfast_loss(case: str, f: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    import kdfast

    target = y if KDFAST_KWARGS[case]["hard_weight"] > 0 else None
    return kdfast.distillation_loss(f, target, s, **KDFAST_KWARGS[case])


LOSS_FNS: dict[str, Callable] = {"eager": eager_loss, "kdfast": kdfast_loss}


def make_step(impl: str, case: str, f, y, s) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(step, reset)``: ``step()`` runs forward+backward and returns the loss (detached);
    ``reset()`` drops the previous gradient so that every step allocates its own."""
    loss_fn = LOSS_FNS[impl]

    def step() -> torch.Tensor:
        loss = loss_fn(case, f, y, s)
        loss.backward()
        return loss.detach()

    def reset() -> None:
        f.grad = None

    return step, reset


def check_against_eager(case: str, f, y, s) -> dict:
    """kdfast's loss and gradient against eager's, on the same inputs."""
    step_k, reset = make_step("kdfast", case, f, y, s)
    reset()
    loss_k = step_k()
    grad_k, f.grad = f.grad, None
    step_e, _ = make_step("eager", case, f, y, s)
    loss_e = step_e()
    grad_e, f.grad = f.grad, None
    scale = grad_e.abs().max().item()
    diff = (grad_k - grad_e).abs().max().item()
    loss_ok = torch.allclose(loss_k, loss_e, rtol=1e-4, atol=1e-6)
    grad_ok = torch.allclose(grad_k, grad_e, rtol=1e-3, atol=1e-6 * scale)
    return {
        "loss_kdfast": loss_k.item(),
        "loss_eager": loss_e.item(),
        "loss_ok": bool(loss_ok),
        "grad_max_abs_diff": diff,
        "grad_max_abs": scale,
        "grad_ok": bool(grad_ok),
    }


# ---------------------------------------------------------------------------
# worker: one (case, impl) in a fresh process
# ---------------------------------------------------------------------------


def worker(case: str, impl: str, args: argparse.Namespace) -> dict:
    threads = common.set_threads(args.threads)
    common.hwm_reset_works()  # probe before the inputs exist, so it cannot raise a ru_maxrss fallback's peak
    if impl == "kdfast":
        import kdfast  # noqa: F401  (load the extension before the baseline RSS is taken)
    f, y, s = make_inputs(case, args.batch, args.classes, device=args.device)
    step, reset = make_step(impl, case, f, y, s)
    reset()
    gc.collect()
    peak_mb, method, loss = common.peak_memory_growth_mb(step, device=args.device)
    times = common.time_fn(step, repeats=args.repeats, warmup=args.warmup, setup=reset, device=args.device)
    result = {
        "case": case, "impl": impl, "threads": threads, "peak_mb": peak_mb, "memory_method": method,
        "times": times, "time_s": common.median(times), "loss": loss.item(),
    }
    reset()
    if impl == "kdfast" and not args.no_check:
        result["check"] = check_against_eager(case, f, y, s)
    return result


def worker_argv(case: str, impl: str, args: argparse.Namespace) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--_worker", case, impl,
        "--batch", str(args.batch), "--classes", str(args.classes),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--threads", str(args.threads), "--device", args.device,
    ] + (["--no-check"] if args.no_check else [])


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def goal_verdict(case: str, speedup: float | None, mem_ratio: float | None) -> str:
    if case not in GOALS:
        return "-"
    min_speedup, max_ratio = GOALS[case]
    if speedup is None or mem_ratio is None:
        return "not measured"
    t_ok, m_ok = speedup >= min_speedup, mem_ratio <= max_ratio
    verdict = "PASS" if t_ok and m_ok else "FAIL"
    return (f"{verdict} (speed {speedup:.2f}x {'>=' if t_ok else '<'} {min_speedup:g}x, "
            f"memory {mem_ratio:.2f} {'<=' if m_ok else '>'} {max_ratio:g})")


def summarize(results: dict[tuple[str, str], dict], cases: list[str]) -> list[dict]:
    """One summary per case: times, peaks, speedup (eager/kdfast), memory ratio (kdfast/eager), goal."""
    out = []
    for case in cases:
        e, k = results.get((case, "eager")), results.get((case, "kdfast"))
        speedup = e["time_s"] / k["time_s"] if e and k else None
        ratio = k["peak_mb"] / e["peak_mb"] if e and k and e["peak_mb"] > 0 else None
        out.append({
            "case": case, "eager": e, "kdfast": k, "speedup": speedup, "mem_ratio": ratio,
            "goal": goal_verdict(case, speedup, ratio),
        })
    return out


def table_rows(summary: list[dict]) -> list[list[str]]:
    rows = []
    for r in summary:
        e, k = r["eager"] or {}, r["kdfast"] or {}
        rows.append([
            CASE_TITLES[r["case"]],
            common.fmt(e.get("time_s"), ".3f"), common.fmt(k.get("time_s"), ".3f"), common.fmt(r["speedup"], ".2f"),
            common.fmt(e.get("peak_mb"), ".0f"), common.fmt(k.get("peak_mb"), ".0f"), common.fmt(r["mem_ratio"], ".2f"),
            r["goal"],
        ])
    return rows


HEADERS = ["case", "eager s", "kdfast s", "speedup", "eager peak MB", "kdfast peak MB", "mem ratio", "goal"]
ALIGN = "lrrrrrrl"


def check_line(case: str, check: dict) -> str:
    ok = "OK" if check["loss_ok"] and check["grad_ok"] else "MISMATCH"
    rel = check["grad_max_abs_diff"] / check["grad_max_abs"] if check["grad_max_abs"] else float("nan")
    return (f"{case}: loss kdfast {check['loss_kdfast']:.6f} vs eager {check['loss_eager']:.6f} "
            f"({'allclose' if check['loss_ok'] else 'NOT allclose'}); grad max|diff| "
            f"{check['grad_max_abs_diff']:.3g} = {rel:.2g} of max|grad| "
            f"({'allclose' if check['grad_ok'] else 'NOT allclose'}) -> {ok}")


def markdown_section(meta: dict, args: argparse.Namespace, summary: list[dict], checks: list[str],
                     memory_method: str, load: float | None = None) -> str:
    method = {
        "vmhwm": "growth of peak RSS over one step (`VmHWM` after resetting it via `/proc/self/clear_refs`, "
                 "minus `VmRSS` before)",
        "ru_maxrss": "growth of peak RSS over one step (`ru_maxrss` minus `VmRSS` before, in a fresh process)",
    }.get(memory_method, memory_method)
    busy_warning = []
    if load is not None and load > common.BUSY_LOAD:
        busy_warning = ["", (
            f"**Warning:** the machine was busy when this run started (1-minute load {load:.2f} on "
            f"{meta['device']}): other processes competed for the cores, so the times (eager's most, "
            "as its page faults and allocations suffer most) are disturbed; the peak-memory figures are not. "
            "Rerun on an idle machine for clean timings."
        )]
    lines = [
        (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · "
         f"torch {meta['torch']} · kdfast {meta['kdfast']} · Python {meta['python']}"),
        "",
        (f"B = {args.batch}, V = {args.classes:,}, float32, forward + backward (gradient of the logits); "
         f"time = median of {args.repeats} after {args.warmup} warm-up; peak MB = {method}; "
         "speedup = eager time / kdfast time; mem ratio = kdfast peak / eager peak."
         + (f" Load average at start: {load:.2f}." if load is not None else "")),
        *busy_warning,
        "",
        common.markdown_table(HEADERS, table_rows(summary), ALIGN),
    ]
    if checks:
        lines += ["", "kdfast vs eager on these inputs (loss rtol 1e-4; gradient rtol 1e-3, atol 1e-6·max|grad|):", ""]
        lines += [f"- {c}" for c in checks]
    goals = [f"{CASE_TITLES[r['case']]}: {r['goal']}" for r in summary if r["case"] in GOALS]
    if goals:
        lines += ["", "Goal (issue 2: at least 2x faster and at most half of eager's peak memory): "
                  + "; ".join(goals) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="rows B (default 256)")
    p.add_argument("--classes", type=int, default=670_091, help="classes V (default 670,091)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}, or all")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    p.add_argument("--threads", default="default", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="only cpu for now")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--no-check", action="store_true", help="skip the kdfast-vs-eager correctness check")
    p.add_argument("--_worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.case_list = common.parse_subset(p, "--cases", args.cases, CASES)
    args.impl_list = common.parse_subset(p, "--impls", args.impls, IMPLS)
    if args.batch < 1 or args.classes < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch, --classes and --repeats must be >= 1, --warmup >= 0")
    common.check_threads_arg(p, args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        case, impl = args._worker
        common.emit_worker_result(worker(case, impl, args))
        return 0

    threads = common.set_threads(args.threads)
    meta = common.env_metadata(args.device, threads)
    if common.kdfast_missing(meta, args.impl_list):
        return 2
    print(f"bench_losses: B={args.batch} V={args.classes:,} float32 on {meta['device']}; "
          f"torch {meta['torch']}, kdfast {meta['kdfast']}, commit {meta['commit']}")
    print(f"cases: {', '.join(args.case_list)}; impls: {', '.join(args.impl_list)}; "
          f"{args.warmup} warm-up + {args.repeats} timed steps each, one fresh process per (case, impl)")
    load_start = common.announce_load()
    results = common.run_cases(
        args.case_list, args.impl_list, lambda case, impl: worker_argv(case, impl, args),
        lambda r: f"peak +{r['peak_mb']:.0f} MB [{r['memory_method']}]  loss {r['loss']:.6f}")

    load_end = common.load_average()
    summary = summarize(results, args.case_list)
    checks = [check_line(c, results[(c, "kdfast")]["check"]) for c in args.case_list
              if "check" in results.get((c, "kdfast"), {})]
    common.print_checks(checks)
    common.print_table(HEADERS, table_rows(summary))
    print("\nspeedup = eager time / kdfast time; mem ratio = kdfast peak / eager peak; "
          "peak MB = growth of peak RSS over one forward+backward")
    if load_end is not None:
        print(f"load average at end: {load_end:.2f} (1 min; {torch.get_num_threads()} threads used)")

    if not args.no_write:
        rows = []
        for (case, impl), r in results.items():
            eager_t = results.get((case, "eager"), {}).get("time_s")
            rows.append({
                **meta, "case": case, "impl": impl, "batch": args.batch, "classes": args.classes,
                "dtype": "float32", "time_s": f"{r['time_s']:.4f}", "peak_mb": f"{r['peak_mb']:.1f}",
                "speedup_vs_eager": f"{eager_t / r['time_s']:.3f}" if eager_t else "",
            })
        common.append_csv(CSV_PATH, rows, CSV_COLUMNS)
        method = next(iter(results.values()))["memory_method"] if results else "vmhwm"
        common.update_markdown_section(common.BENCHMARKS_MD, MD_SECTION,
                                       markdown_section(meta, args, summary, checks, method, load_start))
        print(f"\nwrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    failed = [c for c in checks if not c.endswith("-> OK")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
