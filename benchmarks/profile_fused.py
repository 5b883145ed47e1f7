"""Where kdfast's fused loss spends its time: one forward and one backward of each case under
``torch.profiler``, the device time split by kind of kernel.

    python benchmarks/profile_fused.py --device cuda                 # B=4096, bf16, the CUDA cases
    python benchmarks/profile_fused.py --device cpu --batch 64 --classes 100000 --dtype float32

The same inputs as ``bench_fused_linear.py --device cuda`` (its ``make_inputs_cuda``). Each
phase (forward, backward) is profiled on its own after warm-up steps, so the split needs no
guesswork about which kernel belongs where. Kernels are grouped as

* ``gemm``: cuBLAS / CUTLASS matrix products (names with gemm, cutlass, xmma, cuBLAS, nvjet, or
  cuBLAS's ``sm90_`` / ``ampere_`` kernels), the tile GEMMs; on the CPU, the ``aten::mm`` /
  ``addmm`` calls of the tile loop;
* ``kdfast``: kdfast's own kernels (``kdfast::cuda::...``): the loss reductions and top-k; on
  the CPU, the self time of kdfast's ops (the loss arithmetic, and the bf16 GEMMs, which are
  called without the dispatcher);
* ``other``: the rest (copies, fills, conversions, masks, sums: glue between tiles).

What this is for: deciding what a fused GEMM + loss kernel must remove (issue 6). When
``kdfast`` and ``other`` outweigh ``gemm`` on CUDA, the tiles' trips through global memory
cost more than their products.

Prints one table per case and writes the numbers as JSON (``--json``, default
``benchmarks/results/profile_fused.json``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_linear as bfl
import common

DEFAULT_JSON = common.RESULTS_DIR / "profile_fused.json"
CASES = ("ce", "ce_kd_linear", "dd_linear", "dd_topk", "pal", "topk")
DEFAULT_CASES = "ce,ce_kd_linear,dd_linear,topk"
KINDS = ("gemm", "kdfast", "other")
TOP_KERNELS = 8
_GEMM = re.compile(r"gemm|cutlass|xmma|cublas|nvjet|^(void )?(sm\d+|ampere|volta|turing)_|^aten::(mm|addmm_?|bmm|matmul)$",
                   re.IGNORECASE)


def kernel_kind(name: str) -> str:
    """``gemm``, ``kdfast`` or ``other`` for a kernel (or, on the CPU, an op) name."""
    if "kdfast" in name:
        return "kdfast"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def profile_rows(prof, device: str) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every timed piece of one profiled phase: on CUDA the device
    events (kernels, memcpy, memset) by their own durations; on the CPU the ops by their self
    times (so nested ops are not counted twice)."""
    rows = []
    for event in prof.events():
        on_device = event.device_type != DeviceType.CPU
        if device == "cuda" and on_device:
            rows.append((event.name, float(event.time_range.elapsed_us())))
        elif device == "cpu" and not on_device and not event.name.startswith("ProfilerStep"):
            rows.append((event.name, float(event.self_cpu_time_total)))
    return rows


def summarize(rows: list[tuple[str, float]], wall_s: float) -> dict:
    """Time by kind, calls by kind, and the largest kernels (summed by name) of one phase."""
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    by_name: dict[str, float] = defaultdict(float)
    for name, us in rows:
        if us <= 0:
            continue
        kind = kernel_kind(name)
        by_kind[kind] += us
        count[kind] += 1
        by_name[name] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {
        "wall_s": wall_s,
        "profiled_s": sum(by_kind.values()) / 1e6,
        "by_kind_s": {k: by_kind.get(k, 0.0) / 1e6 for k in KINDS},
        "calls": {k: count.get(k, 0) for k in KINDS},
        "top": [{"name": name, "s": us / 1e6, "kind": kernel_kind(name)} for name, us in top],
    }


def profile_phase(fn: Callable[[], object], device: str) -> dict:
    """``fn`` once under the profiler, synchronized on both sides."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        wall = time.perf_counter() - start
    return summarize(profile_rows(prof, device), wall)


def profile_case(case: str, args: argparse.Namespace) -> dict:
    """Forward and backward of kdfast on ``case``, each profiled after ``args.warmup`` full steps."""
    dtype = bfl.DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"  # (float32 inputs, products in tf32)
    x = bfl.make_inputs_cuda(case, args.batch, args.classes, args.dim, args.teacher_dim, dtype, device=args.device)
    step, reset = bfl.make_cuda_step("kdfast", case, x)  # the benchmark's own step, to warm up
    for _ in range(args.warmup):
        step()
        reset()
    common.synchronize(args.device)
    loss_fn = bfl.cuda_loss_fn("kdfast", case, x)
    has_backward = x.h is not None  # teacher labeling (topk) has no student and no backward
    out: dict = {"case": case}
    holder: dict = {}

    def forward() -> None:
        holder["loss"] = loss_fn()

    out["forward"] = profile_phase(forward, args.device)
    if has_backward:
        out["backward"] = profile_phase(lambda: holder["loss"].backward(), args.device)
    out["loss"] = float(holder["loss"].detach().float())
    return out


def format_case(result: dict) -> str:
    lines = [f"{result['case']}: {bfl.CUDA_CASE_TITLES.get(result['case'], result['case'])}"]
    for phase in ("forward", "backward"):
        p = result.get(phase)
        if p is None:
            continue
        total = p["profiled_s"] or float("nan")
        kinds = ", ".join(
            f"{k} {p['by_kind_s'][k] * 1e3:.2f} ms ({p['by_kind_s'][k] / total:.0%}, {p['calls'][k]} calls)"
            for k in KINDS
        )
        lines.append(f"  {phase:8s} wall {p['wall_s'] * 1e3:.2f} ms, profiled {p['profiled_s'] * 1e3:.2f} ms: {kinds}")
        for row in p["top"]:
            lines.append(f"      {row['s'] * 1e3:9.3f} ms  {row['kind']:6s}  {row['name'][:110]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--batch", type=int, default=None, help="rows B (default 4096 on cuda, 256 on cpu)")
    parser.add_argument("--classes", type=int, default=670_091)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--teacher-dim", type=int, default=512)
    parser.add_argument("--dtype", choices=tuple(bfl.DTYPES), default=None,
                        help="input dtype (default bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--warmup", type=int, default=2, help="full steps before the profiled ones")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the numbers go")
    args = parser.parse_args(argv)
    args.cases = common.parse_subset(parser, "--cases", args.cases, CASES)
    if args.batch is None:
        args.batch = 4096 if args.device == "cuda" else 256
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    for flag in ("batch", "classes", "dim", "teacher_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = common.env_metadata(args.device)
    print(f"profile_fused: B={args.batch} d_s={args.dim} V={args.classes:,} d_t={args.teacher_dim} {args.dtype} "
          f"on {meta['device']}; torch {meta['torch']}, kdfast {meta['kdfast']}, commit {meta['commit']}")
    results = []
    for case in args.cases:
        result = profile_case(case, args)
        results.append(result)
        print(format_case(result), flush=True)
    common.write_json(args.json, {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()}, "cases": results})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
