"""bf16 inputs on the CPU: kdfast's bf16 tile GEMMs against its float32 ones and PyTorch eager in bf16.

With bf16 inputs the CPU kernels either upcast each weight tile and run float32 GEMMs
(``KDFAST_CPU_BF16_GEMM=0``, the path before 2026-12-02) or run MKL's bf16 x bf16 -> float32
GEMM (``=1``; the default where the CPU has AMX-BF16; ``csrc/cpu/gemm.h``). Both make the same
logits, since a product of two bf16 values is exact in float32. This script times, at the
Amazon-670K shapes in bf16 (B = 256, d_s = 64, V = 670,091, teacher d_t = 512):

* ``ce``        hard cross-entropy, fused linear, forward + backward (gradients of h and W);
* ``kd_linear`` 0.5 CE + 0.5 T^2 KL at T = 2 with the teacher's logits made on the fly, forward +
                backward;
* ``topk``      teacher labeling, ``kdfast.teacher_topk`` (k = 32, d = 512, with a bias), forward;

each with three implementations, each (case, impl) in a fresh process:

* ``bf16gemm``  kdfast with ``KDFAST_CPU_BF16_GEMM=1``;
* ``fp32gemm``  kdfast with ``KDFAST_CPU_BF16_GEMM=0``;
* ``eager``     PyTorch on the bf16 tensors, as a bf16 model runs it: ``F.linear`` in bf16 (oneDNN,
                AMX where the CPU has it), then the loss on the bf16 logits (for labeling: ``topk``,
                ``logsumexp`` and the entropy of the logits upcast to float32).

Time is the median of ``--repeats`` after a warm-up; peak MB the growth of peak RSS over one step
(with the gradients it returns).
The script checks that the two kdfast paths agree (loss, and gradients within one bf16 rounding in
all but a few entries; labeling: equal indices, float32-close statistics). Rows go to
``benchmarks/results/cpu_bf16.csv`` and the ``bench_cpu_bf16`` section of ``BENCHMARKS.md``.

    python benchmarks/bench_cpu_bf16.py                  # ~3 minutes on 2 cores
    python benchmarks/bench_cpu_bf16.py --classes 100000 --cases ce --no-write
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CASES = ("ce", "kd_linear", "topk")
IMPLS = ("bf16gemm", "fp32gemm", "eager")
CASE_TITLES = {
    "ce": "hard CE (fused linear, fwd + bwd)",
    "kd_linear": "CE + KD (T=2), teacher on the fly (fwd + bwd)",
    "topk": "teacher labeling, top-32 (fwd)",
}
IMPL_ENV = {"bf16gemm": "1", "fp32gemm": "0", "eager": "0"}
TEMPERATURE, TOPK, SEED = 2.0, 32, 0
CSV_COLUMNS = ("date", "commit", "device", "torch", "kdfast", "python", "gemm_status", "case", "impl", "batch",
               "classes", "dim", "d_t", "time_s", "peak_mb", "load_avg")
CSV_PATH = common.RESULTS_DIR / "cpu_bf16.csv"
MD_SECTION = "bench_cpu_bf16"


def make_inputs(case: str, batch: int, classes: int, dim: int, teacher_dim: int) -> dict:
    """bf16 inputs: student logits ~ N(0, 1), teacher logits ~ N(0, 4), uniform labels (fixed seed)."""
    g = torch.Generator().manual_seed(SEED)

    def normal(shape, std):
        return torch.empty(shape).normal_(0.0, std, generator=g).bfloat16()

    x = {"y": torch.randint(0, classes, (batch,), generator=g)}
    if case == "topk":
        x["th"], x["tW"] = normal((batch, teacher_dim), 1.0), normal((classes, teacher_dim), 2.0 / math.sqrt(teacher_dim))
        x["tb"] = normal((classes,), 0.5)
        return x
    x["h"] = normal((batch, dim), 1.0).requires_grad_(True)
    x["W"] = normal((classes, dim), 1.0 / math.sqrt(dim)).requires_grad_(True)
    if case == "kd_linear":
        x["th"], x["tW"] = normal((batch, teacher_dim), 1.0), normal((classes, teacher_dim), 2.0 / math.sqrt(teacher_dim))
    return x


def step_fn(case: str, impl: str, x: dict):
    """One step of (case, impl); returns what the check compares."""
    import kdfast

    if case == "topk":
        if impl == "eager":
            def label():
                f = F.linear(x["th"], x["tW"], x["tb"]).float()
                vals, idx = torch.topk(f, TOPK, dim=-1)
                logp = torch.log_softmax(f, dim=-1)
                return idx, vals, torch.logsumexp(f, dim=-1), -(logp.exp() * logp).sum(-1)
            return label
        return lambda: kdfast.teacher_topk(x["th"], x["tW"], x["tb"], k=TOPK)

    h, W, y = x["h"], x["W"], x["y"]
    kd = case == "kd_linear"

    def backward(loss):
        loss.backward()
        return loss.detach(), h.grad, W.grad

    def clear():  # each step makes (and its peak counts) its own gradients
        h.grad = W.grad = None

    if impl == "eager":
        def eager():
            clear()
            f = F.linear(h, W)
            loss = F.cross_entropy(f, y)
            if kd:
                with torch.no_grad():
                    s = F.linear(x["th"], x["tW"])
                kl = F.kl_div(torch.log_softmax(f / TEMPERATURE, -1), torch.log_softmax(s / TEMPERATURE, -1),
                              log_target=True, reduction="batchmean")
                loss = 0.5 * loss + 0.5 * TEMPERATURE**2 * kl
            return backward(loss)
        return eager
    teacher = {"teacher_hidden": x["th"], "teacher_weight": x["tW"]} if kd else {}
    terms = {"hard_weight": 0.5, "soft_weight": 0.5, "temperature": TEMPERATURE} if kd else {}

    def fused():
        clear()
        return backward(kdfast.fused_linear_distillation_loss(h, W, y, **teacher, **terms))
    return fused


def worker(args) -> int:
    import kdfast

    common.set_threads(args.threads)
    x = make_inputs(args.case, args.batch, args.classes, args.dim, args.teacher_dim)
    fn = step_fn(args.case, args.impl, x)
    out = fn()  # warm-up (thread pools, per-thread buffers)
    del out
    if args.case != "topk":  # else the measured step would reuse the memory of the warm-up's gradients
        x["h"].grad = x["W"].grad = None
        kdfast.ops.empty_cpu_cache()  # nor the grad_weight block kdfast keeps for reuse (csrc/cpu/grad_buffers.h)
    peak, method, out = common.peak_memory_growth_mb(fn)
    times = common.time_fn(fn, repeats=args.repeats, warmup=args.warmup)
    result = {"time_s": common.median(times), "times": times, "peak_mb": peak, "peak_method": method,
              "gemm_status": kdfast.ops.cpu_bf16_gemm_status()}
    if args.save:
        torch.save(tuple(out) if args.case != "topk" else (out.indices, out.logits, out.lse, out.entropy), args.save)
    common.emit_worker_result(result)
    return 0


def check(case: str, a_path: Path, b_path: Path) -> str:
    """The bf16-GEMM kdfast result against the float32-GEMM one."""
    a, b = torch.load(a_path), torch.load(b_path)
    if case == "topk":
        same_idx = (a[0] == b[0]).double().mean().item()
        stats = max((x.double() - y.double()).abs().max().item() for x, y in zip(a[1:], b[1:]))
        ok = same_idx >= 0.999 and stats <= 1e-4
        return (f"{case}: indices equal in {same_idx:.4%} of entries, max |difference| of logits/lse/entropy "
                f"{stats:.2g} -> {'OK' if ok else 'DIFFER'}")
    eps = torch.finfo(torch.bfloat16).eps
    parts, ok = [f"loss {a[0].item():.6f} vs {b[0].item():.6f}"], abs(a[0].item() - b[0].item()) <= eps * abs(b[0].item())
    for name, x, y in (("grad h", a[1], b[1]), ("grad W", a[2], b[2])):
        x, y = x.double(), y.double()
        far = ((x - y).abs() > eps * y.abs() + 2.0**-16 * y.abs().max()).sum().item()
        differ = (x != y).double().mean().item()
        ok = ok and far == 0 and differ <= 0.01
        parts.append(f"{name}: {differ:.3%} of entries differ, {far} by more than one rounding")
    return f"{case}: " + "; ".join(parts) + f" -> {'OK' if ok else 'DIFFER'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=670_091)
    p.add_argument("--dim", type=int, default=64, help="student hidden size d_s")
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}, or all")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    p.add_argument("--threads", default="default")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.case, args.impl = args.worker
        return worker(args)
    common.check_threads_arg(p, args.threads)
    cases = common.parse_subset(p, "--cases", args.cases, CASES)
    impls = common.parse_subset(p, "--impls", args.impls, IMPLS)
    threads = common.set_threads(args.threads)
    meta = common.env_metadata("cpu", threads)
    load = common.announce_load()
    print(f"bench_cpu_bf16: B = {args.batch}, d_s = {args.dim}, V = {args.classes:,}, d_t = {args.teacher_dim}, "
          f"bf16, on {meta['device']}; commit {meta['commit']}")
    results, checks, status = {}, [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for impl in impls:
                save = Path(tmp) / f"{case}-{impl}.pt"
                argv_w = [__file__, "--worker", case, impl, "--batch", str(args.batch), "--classes", str(args.classes),
                          "--dim", str(args.dim), "--teacher-dim", str(args.teacher_dim), "--repeats",
                          str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
                if impl != "eager":
                    argv_w += ["--save", str(save)]
                print(f"  {case:9s} {impl:8s} ...", flush=True)
                r = common.run_worker(argv_w, env={"KDFAST_CPU_BF16_GEMM": IMPL_ENV[impl]})
                results[(case, impl)] = r
                if impl == "bf16gemm":
                    status = r["gemm_status"]
                print(f"  {case:9s} {impl:8s} time {r['time_s']:.3f} s (runs: "
                      f"{', '.join(f'{t:.3f}' for t in r['times'])}), peak {r['peak_mb']:.0f} MB", flush=True)
            if {"bf16gemm", "fp32gemm"} <= set(impls):
                checks.append(check(case, Path(tmp) / f"{case}-bf16gemm.pt", Path(tmp) / f"{case}-fp32gemm.pt"))
    print(f"\nbf16 GEMM: {status or '(not run)'}")
    headers = ["case"] + [f"{i} s" for i in impls] + [f"{i} peak MB" for i in impls]
    ratios = [("bf16gemm", "fp32gemm"), ("bf16gemm", "eager"), ("fp32gemm", "eager")]
    ratios = [(a, b) for a, b in ratios if a in impls and b in impls]
    headers += [f"{b} / {a}" for a, b in ratios]
    rows = []
    for case in cases:
        row = [CASE_TITLES[case]] + [f"{results[(case, i)]['time_s']:.3f}" for i in impls]
        row += [f"{results[(case, i)]['peak_mb']:.0f}" for i in impls]
        row += [f"{results[(case, b)]['time_s'] / results[(case, a)]['time_s']:.2f}" for a, b in ratios]
        rows.append(row)
    common.print_table(headers, rows)
    print()
    for c in checks:
        print("check (bf16 GEMM vs float32 GEMM): " + c)
    bad = any(c.endswith("DIFFER") for c in checks)
    if not args.no_write:
        common.append_csv(CSV_PATH, [
            {**meta, "gemm_status": r["gemm_status"], "case": case, "impl": impl, "batch": args.batch, "classes": args.classes,
             "dim": args.dim, "d_t": args.teacher_dim, "time_s": f"{r['time_s']:.4f}", "peak_mb": f"{r['peak_mb']:.1f}",
             "load_avg": common.fmt(load, ".2f")} for (case, impl), r in results.items()], CSV_COLUMNS)
        lines = [
            (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · torch {meta['torch']} · "
             f"kdfast {meta['kdfast']} · Python {meta['python']} · load average at start {common.fmt(load, '.2f')}"),
            "",
            (f"B = {args.batch}, d_s = {args.dim}, V = {args.classes:,}, d_t = {args.teacher_dim}, bf16; time = median "
             f"of {args.repeats} after {args.warmup} warm-up; peak MB = growth of peak RSS over one step after a first "
             f"one (it includes the gradients the step returns: {args.batch * args.dim * 2 / 2**20 + args.classes * args.dim * 2 / 2**20:.0f} MB "
             f"for fwd + bwd). bf16 GEMM: {status}."),
            "",
            common.markdown_table(headers, rows, "l" + "r" * (len(headers) - 1)),
            "",
        ] + [f"- {c}" for c in checks]
        common.update_markdown_section(common.BENCHMARKS_MD, MD_SECTION, "\n".join(lines))
        print(f"wrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
