"""CPU labeling throughput of ``kdfast.teacher_topk`` against PyTorch eager and the GEMM floor.

The teacher's output layer at the Amazon-670K shape (default d = 512, V = 670,091, float32,
with a bias), k = 32, temperature 1; per row the top-k logits and classes, the log-partition,
the entropy and the covered mass:

* ``kdfast``  ``kdfast.teacher_topk(hidden, weight, bias, k=k, temperature=T)``: class tiles,
              never the ``[B, V]`` logits;
* ``eager``   ``f = F.linear(h, W, b)``, ``torch.topk(f, k)``, ``torch.logsumexp(f / T)``, the entropy
              ``-sum(p * log p)`` from ``log_softmax(f / T)`` and ``covered = p.gather(topk).sum()``, on
              the full logits, ``--eager-batch`` rows at a time (default: the whole batch; at
              B = 256 the logits are 686 MB, which fits);
* ``linear``  ``F.linear(h, W, b)`` alone: eager's GEMM at this shape, for reference.

The GEMM floor is ``2·B·d·V / rate`` with ``rate`` the median GFLOP/s of a 4096³ float32 matmul
measured in the same run (before and after the other timings). The goal of issue 4: kdfast
within 1.5x of that floor and at least 2x faster than eager. The script also checks once that
kdfast's indices equal eager's (near ties apart) and that lse / entropy / covered match, and
compares both with float64 on the first rows.

Results are appended to ``benchmarks/results/labeling.csv`` and written to the
``bench_labeling`` section of ``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_labeling.py                 # the full run (about a minute on 2 cores)
    python benchmarks/bench_labeling.py --batch 64 --classes 100000 --no-write
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

IMPLS = ("kdfast", "eager", "linear")
IMPL_TITLES = {
    "kdfast": "kdfast.teacher_topk",
    "eager": "eager (F.linear + topk + logsumexp + entropy)",
    "linear": "F.linear alone (eager's GEMM)",
}

GOAL_FLOOR_MULTIPLE = 1.5  # kdfast time <= 1.5x the GEMM floor
GOAL_SPEEDUP = 2.0  # kdfast at least 2x faster than eager

CSV_COLUMNS = (
    "date", "commit", "device", "torch", "kdfast", "python",
    "impl", "batch", "eager_batch", "classes", "dim", "k", "temperature", "dtype",
    "time_s", "rows_per_s", "sgemm_gflops", "floor_s", "floor_multiple", "speedup_vs_eager", "load_avg",
)
CSV_PATH = common.RESULTS_DIR / "labeling.csv"
MD_SECTION = "bench_labeling"

SGEMM_N = 4096
LOGIT_STD = 2.0  # teacher logits ~ N(0, 4) before the bias: a peaky teacher
BIAS_STD = 0.5
SEED = 0
CHECK_ROWS_F64 = 8  # rows recomputed in float64 for the accuracy check

MD_INTRO = """## Teacher labeling: fused top-k (CPU)

`benchmarks/bench_labeling.py` times `kdfast.teacher_topk` (fused GEMM + per-row top-k, log-partition,
entropy and covered mass over class tiles, never the `[B, V]` logits) against the same outputs in
PyTorch eager (`F.linear`, then `torch.topk`, `torch.logsumexp` and the entropy of `log_softmax` on
the full logits), at the teacher shape d = 512, V = 670,091, k = 32, T = 1, float32, with a bias.
Eager runs on the whole batch at once (at B = 256 its logits take 686 MB = 654 MiB). Throughput is rows/s =
B / median time. The **GEMM floor** is 2·B·d·V flops at the float32 GEMM rate measured in the same
run (median of 4096³ matmuls before and after the other timings); kdfast's time is reported as a
multiple of it. The goal (issue 4): within 1.5× of the floor and at least 2× faster than eager. The
script checks once that kdfast's indices equal eager's and that lse, entropy and covered agree, and
compares both with float64 on the first rows. Timings on a machine shared with other processes are
noisy: the load average is recorded with each run.

Reproduce:

```sh
.venv/bin/python benchmarks/bench_labeling.py   # --batch 256 --classes 670091 --dim 512 --k 32
                                                # --repeats 3 --warmup 1 --threads default --no-write
```

Latest run:
"""


# ---------------------------------------------------------------------------
# inputs and implementations
# ---------------------------------------------------------------------------


def make_inputs(batch: int, classes: int, dim: int, seed: int = SEED):
    """``(hidden [B, d], weight [V, d], bias [V])`` float32, made in place; logits ~ N(0, LOGIT_STD²)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.empty(batch, dim).normal_(0.0, 1.0, generator=g)
    w = torch.empty(classes, dim).normal_(0.0, LOGIT_STD / math.sqrt(dim), generator=g)
    b = torch.empty(classes).normal_(0.0, BIAS_STD, generator=g)
    return h, w, b


def eager_label(h, w, b, k: int, temperature: float, chunk: int):
    """``(indices, logits, lse, entropy, covered)`` on the full logits, ``chunk`` rows at a time."""
    outs = []
    for h_c in h.split(chunk):
        f = F.linear(h_c, w, b)
        values, indices = torch.topk(f, k, dim=-1)
        s = f if temperature == 1.0 else f / temperature
        del f
        lse = torch.logsumexp(s, dim=-1)
        log_p = torch.log_softmax(s, dim=-1)
        del s
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1)
        del log_p
        covered = p.gather(-1, indices).sum(-1)
        del p
        outs.append((indices, values, lse, entropy, covered))
    return tuple(torch.cat(parts) for parts in zip(*outs))


def kdfast_label(h, w, b, k: int, temperature: float):
    import kdfast

    # the five tensors eager_label returns, in its order (TopK also carries its temperature)
    r = kdfast.teacher_topk(h, w, b, k=k, temperature=temperature)
    return r.indices, r.logits, r.lse, r.entropy, r.covered


def sgemm_gflops(repeats: int, warmup: int = 1) -> list[float]:
    """GFLOP/s of ``repeats`` float32 ``4096 x 4096 @ 4096 x 4096`` matmuls (after ``warmup``)."""
    g = torch.Generator().manual_seed(SEED + 1)
    a = torch.empty(SGEMM_N, SGEMM_N).normal_(generator=g)
    c = torch.empty(SGEMM_N, SGEMM_N).normal_(generator=g)
    out = torch.empty(SGEMM_N, SGEMM_N)
    times = common.time_fn(lambda: torch.mm(a, c, out=out), repeats=repeats, warmup=warmup)
    return [2 * SGEMM_N**3 / t / 1e9 for t in times]


# ---------------------------------------------------------------------------
# correctness check
# ---------------------------------------------------------------------------


def check(h, w, b, k: int, temperature: float, chunk: int, kd=None) -> dict:
    """kdfast against eager on the same inputs, and both against float64 on the first rows."""
    kd = kdfast_label(h, w, b, k, temperature) if kd is None else kd
    ea = eager_label(h, w, b, k, temperature, chunk)
    k_idx, k_val, k_lse, k_ent, k_cov = kd
    e_idx, e_val, e_lse, e_ent, e_cov = ea
    same = k_idx == e_idx
    out = {
        "indices_equal_fraction": float(same.double().mean()),
        "rows_all_equal_fraction": float(same.all(-1).double().mean()),
        "values_max_abs_diff": float((k_val - e_val).abs().max()),
        "lse_max_abs_diff": float((k_lse - e_lse).abs().max()),
        "entropy_max_abs_diff": float((k_ent - e_ent).abs().max()),
        "covered_max_abs_diff": float((k_cov - e_cov).abs().max()),
    }
    # where the indices differ: eager's logits of kdfast's classes against eager's top-k values
    # (a near tie reordered by GEMM rounding leaves them equal to rounding)
    n = min(CHECK_ROWS_F64, h.shape[0])
    if not bool(same.all()):
        rows = (~same).any(-1).nonzero().flatten()
        f_rows = F.linear(h[rows], w, b)
        out["mismatch_rows"] = int(rows.numel())
        out["mismatch_value_gap"] = float((f_rows.gather(-1, k_idx[rows]) - e_val[rows]).abs().max())
    # float64 on the first n rows: who is closer to the exact values
    f64 = F.linear(h[:n].double(), w.double(), b.double()) / temperature
    lse64 = torch.logsumexp(f64, dim=-1)
    log_p = f64 - lse64[:, None]
    ent64 = -(log_p.exp() * log_p).sum(-1)
    for name, lse, ent in (("kdfast", k_lse, k_ent), ("eager", e_lse, e_ent)):
        out[f"{name}_lse_err_f64"] = float((lse[:n].double() - lse64).abs().max())
        out[f"{name}_entropy_err_f64"] = float((ent[:n].double() - ent64).abs().max())
    top64 = torch.topk(f64, k, dim=-1).values * temperature
    out["kdfast_values_err_f64"] = float((k_val[:n].double() - top64).abs().max())
    out["ok"] = bool(
        torch.allclose(k_lse, e_lse, rtol=1e-4, atol=1e-4)
        and torch.allclose(k_ent, e_ent, rtol=1e-4, atol=1e-4)
        and torch.allclose(k_cov, e_cov, rtol=1e-4, atol=1e-4)
        and torch.allclose(k_val, e_val, rtol=1e-5, atol=1e-5)
        and (bool(same.all()) or out["mismatch_value_gap"] <= 1e-4)
    )
    return out


def check_lines(c: dict) -> list[str]:
    lines = [
        f"indices equal to eager's: {c['indices_equal_fraction']:.4%} of entries, "
        f"{c['rows_all_equal_fraction']:.2%} of rows"
        + ("" if "mismatch_rows" not in c else
           f" ({c['mismatch_rows']} rows differ, all near ties: eager's logits of kdfast's classes are within "
           f"{c['mismatch_value_gap']:.2g} of eager's top-k values)"),
        (f"max |kdfast - eager|: top-k logits {c['values_max_abs_diff']:.2g}, lse {c['lse_max_abs_diff']:.2g}, "
         f"entropy {c['entropy_max_abs_diff']:.2g}, covered {c['covered_max_abs_diff']:.2g}"),
        (f"max error against float64 (first {CHECK_ROWS_F64} rows): lse kdfast {c['kdfast_lse_err_f64']:.2g} / "
         f"eager {c['eager_lse_err_f64']:.2g}, entropy kdfast {c['kdfast_entropy_err_f64']:.2g} / eager "
         f"{c['eager_entropy_err_f64']:.2g}, kdfast top-k logits {c['kdfast_values_err_f64']:.2g}"),
        "verdict: " + ("OK" if c["ok"] else "MISMATCH")
        + " (lse/entropy/covered rtol = atol = 1e-4, logits 1e-5; differing indices only at near ties)",
    ]
    return lines


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def goal_verdict(floor_multiple: float | None, speedup: float | None) -> str:
    if floor_multiple is None or speedup is None:
        return "not measured"
    f_ok, s_ok = floor_multiple <= GOAL_FLOOR_MULTIPLE, speedup >= GOAL_SPEEDUP
    return ("PASS" if f_ok and s_ok else "FAIL") + (
        f" ({floor_multiple:.2f}x the GEMM floor {'<=' if f_ok else '>'} {GOAL_FLOOR_MULTIPLE:g}x; "
        f"{speedup:.2f}x eager {'>=' if s_ok else '<'} {GOAL_SPEEDUP:g}x)"
    )


def summarize(args, times: dict[str, list[float]], rate: float) -> dict[str, dict]:
    flops = 2.0 * args.batch * args.dim * args.classes
    floor_s = flops / (rate * 1e9)
    eager_t = common.median(times["eager"]) if "eager" in times else None
    out = {}
    for impl in IMPLS:
        if impl not in times:
            continue
        t = common.median(times[impl])
        out[impl] = {
            "time_s": t,
            "times": times[impl],
            "rows_per_s": args.batch / t,
            "gflops": flops / t / 1e9,
            "floor_multiple": t / floor_s,
            "speedup_vs_eager": eager_t / t if eager_t else None,
        }
    return {"impls": out, "floor_s": floor_s, "flops": flops}


HEADERS = ["implementation", "batch", "median s", "rows/s", "effective GFLOP/s", "x GEMM floor", "speedup vs eager"]
ALIGN = "lrrrrrr"


def table_rows(args, summary: dict) -> list[list[str]]:
    rows = []
    for impl, r in summary["impls"].items():
        rows.append([
            IMPL_TITLES[impl], str(args.eager_batch if impl == "eager" else args.batch),
            common.fmt(r["time_s"], ".3f"), common.fmt(r["rows_per_s"], ",.0f"), common.fmt(r["gflops"], ".1f"),
            common.fmt(r["floor_multiple"], ".2f"), common.fmt(r["speedup_vs_eager"], ".2f"),
        ])
    return rows


def markdown_section(meta, args, summary, rates, verdict, checks, loads) -> str:
    rate = common.median(rates)
    busy = max((x for x in loads if x is not None), default=0.0) > common.BUSY_LOAD
    lines = [
        (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · "
         f"torch {meta['torch']} · kdfast {meta['kdfast']} · Python {meta['python']}"),
        "",
        (f"B = {args.batch} (eager: {args.eager_batch} rows at a time), d = {args.dim}, V = {args.classes:,}, "
         f"k = {args.k}, T = {args.temperature:g}, float32 with bias; time = median of {args.repeats} after "
         f"{args.warmup} warm-up. Float32 GEMM rate (4096³ matmul, median of {len(rates)}: "
         f"{', '.join(f'{r:.0f}' for r in rates)}): **{rate:.1f} GFLOP/s**, so the GEMM floor "
         f"2·B·d·V = {summary['flops'] / 1e9:.1f} GFLOP takes **{summary['floor_s']:.3f} s**. "
         f"Load average (1 min) at start {common.fmt(loads[0], '.2f')}, at end {common.fmt(loads[1], '.2f')}"
         + (" — the machine was shared with other processes, so the timings are noisy." if busy else ".")),
        "",
        common.markdown_table(HEADERS, table_rows(args, summary), ALIGN),
        "",
        (f"Goal (issue 4: within {GOAL_FLOOR_MULTIPLE:g}x of the GEMM floor and at least {GOAL_SPEEDUP:g}x "
         f"eager): **{verdict}**."),
    ]
    if checks:
        lines += ["", "kdfast vs eager on these inputs:", ""] + [f"- {c}" for c in checks]
    return "\n".join(lines)


def write_markdown(content: str) -> None:
    """Append the intro and the marked section at the end of BENCHMARKS.md the first time; later,
    rewrite only what lies between the markers. The file is re-read right before writing."""
    path = common.BENCHMARKS_MD
    begin, _ = common.section_markers(MD_SECTION)
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + MD_INTRO.strip() + "\n")
    common.update_markdown_section(path, MD_SECTION, content)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="rows B (default 256)")
    p.add_argument("--classes", type=int, default=670_091, help="classes V (default 670,091)")
    p.add_argument("--dim", type=int, default=512, help="hidden size d (default 512)")
    p.add_argument("--k", type=int, default=32, help="entries kept per row (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of lse/entropy (default 1)")
    p.add_argument("--eager-batch", type=int, default=None,
                   help="rows per eager chunk (default: the whole batch, as eager can afford it)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    p.add_argument("--threads", default="default", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--no-check", action="store_true", help="skip the kdfast-vs-eager correctness check")
    args = p.parse_args(argv)
    args.impl_list = common.parse_subset(p, "--impls", args.impls, IMPLS)
    if min(args.batch, args.classes, args.dim, args.k, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch, --classes, --dim, --k and --repeats must be >= 1, --warmup >= 0")
    if args.k > args.classes:
        p.error("--k must be <= --classes")
    if not args.temperature > 0:
        p.error("--temperature must be > 0")
    args.eager_batch = args.batch if args.eager_batch is None else min(args.eager_batch, args.batch)
    if args.eager_batch < 1:
        p.error("--eager-batch must be >= 1")
    common.check_threads_arg(p, args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    meta = common.env_metadata("cpu", threads)
    if meta["kdfast"] == "unavailable" and "kdfast" in args.impl_list:
        print("error: kdfast does not import (build it with `make`), or run the baselines alone with "
              "--impls eager,linear", file=sys.stderr)
        return 2
    print(f"bench_labeling: B={args.batch} d={args.dim} V={args.classes:,} k={args.k} T={args.temperature:g} "
          f"float32 on {meta['device']}; torch {meta['torch']}, kdfast {meta['kdfast']}, commit {meta['commit']}")
    print(f"impls: {', '.join(args.impl_list)}; {args.warmup} warm-up + {args.repeats} timed runs each; "
          f"eager in chunks of {args.eager_batch} rows ({args.eager_batch * args.classes * 4 / common.MB:,.0f} MiB "
          "of logits per chunk)")
    load_start = common.announce_load()

    rates = sgemm_gflops(max(args.repeats, 3), args.warmup)
    print(f"  sgemm 4096^3: {', '.join(f'{r:.1f}' for r in rates)} GFLOP/s", flush=True)

    h, w, b = make_inputs(args.batch, args.classes, args.dim)
    fns = {
        "kdfast": lambda: kdfast_label(h, w, b, args.k, args.temperature),
        "eager": lambda: eager_label(h, w, b, args.k, args.temperature, args.eager_batch),
        "linear": lambda: F.linear(h, w, b),
    }
    times: dict[str, list[float]] = {}
    for impl in args.impl_list:
        gc.collect()
        times[impl] = common.time_fn(fns[impl], repeats=args.repeats, warmup=args.warmup)
        print(f"  {impl:7s} median {common.median(times[impl]):.3f} s (runs: "
              f"{', '.join(f'{t:.3f}' for t in times[impl])})", flush=True)

    more = sgemm_gflops(max(args.repeats, 3), 0)
    print(f"  sgemm 4096^3 again: {', '.join(f'{r:.1f}' for r in more)} GFLOP/s", flush=True)
    rates += more
    rate = common.median(rates)
    load_end = common.load_average()

    checks, check_ok = [], True
    if not args.no_check and "kdfast" in args.impl_list:
        c = check(h, w, b, args.k, args.temperature, args.eager_batch)
        checks, check_ok = check_lines(c), c["ok"]

    summary = summarize(args, times, rate)
    k_r, e_r = summary["impls"].get("kdfast"), summary["impls"].get("eager")
    verdict = goal_verdict(k_r["floor_multiple"] if k_r else None, k_r["speedup_vs_eager"] if k_r and e_r else None)

    common.print_checks(checks)
    print(f"sgemm rate (median of {len(rates)}): {rate:.1f} GFLOP/s; GEMM floor 2*B*d*V = "
          f"{summary['flops'] / 1e9:.1f} GFLOP -> {summary['floor_s']:.3f} s\n")
    common.print_table(HEADERS, table_rows(args, summary))
    print(f"\ngoal (issue 4): {verdict}")
    if load_end is not None:
        print(f"load average at end: {load_end:.2f} (1 min; {torch.get_num_threads()} threads used)")

    if not args.no_write:
        rows = []
        for impl, r in summary["impls"].items():
            rows.append({
                **meta, "impl": impl, "batch": args.batch,
                "eager_batch": args.eager_batch if impl == "eager" else "",
                "classes": args.classes, "dim": args.dim, "k": args.k, "temperature": args.temperature,
                "dtype": "float32", "time_s": f"{r['time_s']:.4f}", "rows_per_s": f"{r['rows_per_s']:.1f}",
                "sgemm_gflops": f"{rate:.2f}", "floor_s": f"{summary['floor_s']:.4f}",
                "floor_multiple": f"{r['floor_multiple']:.3f}",
                "speedup_vs_eager": "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.3f}",
                "load_avg": "" if load_start is None else f"{load_start:.2f}",
            })
        common.append_csv(CSV_PATH, rows, CSV_COLUMNS)
        write_markdown(markdown_section(meta, args, summary, rates, verdict, checks, (load_start, load_end)))
        print(f"\nwrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    return 0 if check_ok else 1


if __name__ == "__main__":
    sys.exit(main())
