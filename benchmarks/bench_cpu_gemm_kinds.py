"""Which CPU GEMM the tile loops should use for half-precision inputs: MKL's bf16 and fp16 GEMMs
against float32 sgemm, at the fused loss's tile shapes, with MKL allowed less and less of the CPU.

kdfast's CPU tile GEMMs take MKL's ``cblas_gemm_bf16bf16f32`` for bf16 inputs only where the CPU
has AMX-BF16 (``csrc/cpu/gemm.h``), and upcast fp16 inputs to float32. This script measures why:
one thread, ``C[256, n] = A[256, K] B[n, K]^T`` (the student's K = 64 and the teacher's K = 512,
n = 1344, the CPU tile at B = 256), GFLOP/s of

* ``bf16``: ``cblas_gemm_bf16bf16f32`` (bf16 inputs, float32 result);
* ``fp16``: ``cblas_gemm_f16f16f32`` (fp16 inputs, float32 result);
* ``fp32``: ``torch.mm`` on float32 (MKL sgemm).

Each row is a fresh process with ``MKL_ENABLE_INSTRUCTIONS`` set (``all`` leaves it unset):
``AVX512_E3`` stops MKL at AVX512-BF16 (no AMX), ``AVX512`` at AVX-512 without the BF16
instructions, ``AVX2`` at AVX2. On one CPU this stands in for CPUs of those kinds; it is not one
of them. Each GEMM's result is checked against float64 on the same (rounded) inputs. Rows go to
``benchmarks/results/cpu_gemm_kinds.csv`` and the ``bench_cpu_gemm_kinds`` section of
``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_cpu_gemm_kinds.py            # ~1 minute
    python benchmarks/bench_cpu_gemm_kinds.py --isas all,AVX512_E3 --no-write
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ISAS = ("all", "AVX512_E3", "AVX512", "AVX2")
ISA_TITLES = {
    "all": "all (AMX-BF16 where the CPU has it)",
    "AVX512_E3": "`AVX512_E3` (AVX512-BF16, no AMX)",
    "AVX512": "`AVX512` (no BF16 instructions)",
    "AVX2": "`AVX2`",
}
KINDS = ("bf16", "fp16", "fp32")
ROWS, TILE = 256, 1344
DEPTHS = (64, 512)
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112
CSV_COLUMNS = ("date", "commit", "device", "torch", "kdfast", "python", "isa", "kind", "m", "n", "k", "gflops",
               "max_rel_err")
CSV_PATH = common.RESULTS_DIR / "cpu_gemm_kinds.csv"
MD_SECTION = "bench_cpu_gemm_kinds"


def mkl_gemm(kind: str):
    """MKL's ``cblas_gemm_bf16bf16f32`` / ``cblas_gemm_f16f16f32`` from libtorch_cpu, or None."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    name = {"bf16": "cblas_gemm_bf16bf16f32", "fp16": "cblas_gemm_f16f16f32"}[kind]
    fn = getattr(lib, name, None)
    if fn is None:
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return fn


def gemm_fn(kind: str, m: int, n: int, k: int, seed: int = 0):
    """``(run, result, reference)``: ``run()`` computes ``C = A B^T`` of the ``kind``; ``result`` is C
    and ``reference`` the float64 product of the same rounded inputs. None if MKL lacks the GEMM."""
    g = torch.Generator().manual_seed(seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype)
    c = torch.empty(m, n)
    reference = a.double() @ b.double().t()
    if kind == "fp32":
        return (lambda: torch.mm(a, b.t(), out=c)), c, reference
    fn = mkl_gemm(kind)
    if fn is None:
        return None

    def run():  # (takes a, b, c from the closure: their memory must outlive the raw pointers)
        fn(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, m, n, k, 1.0, a.data_ptr(), k, b.data_ptr(), k, 0.0,
           c.data_ptr(), n)

    return run, c, reference


def measure(kind: str, m: int, n: int, k: int, min_seconds: float) -> dict | None:
    """GFLOP/s of one GEMM kind (median of 5 timings of enough calls to last ``min_seconds``)."""
    made = gemm_fn(kind, m, n, k)
    if made is None:
        return None
    run, c, reference = made
    run()
    err = ((c.double() - reference).abs().max() / reference.abs().max()).item()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / 5 or calls < 3:
        run()
        calls += 1
    times = common.time_fn(lambda: [run() for _ in range(calls)], repeats=5, warmup=0)
    return {"gflops": 2.0 * m * n * k * calls / common.median(times) / 1e9, "max_rel_err": err}


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    out = {}
    for k in DEPTHS:
        for kind in KINDS:
            out[f"{kind}_{k}"] = measure(kind, ROWS, TILE, k, args.seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isas", default="all", help=f"comma-separated subset of {','.join(ISAS)}, or all (default)")
    p.add_argument("--seconds", type=float, default=0.5, help="time per GEMM measurement (default 0.5 s)")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    if args._worker:
        common.emit_worker_result(worker(args))
        return 0
    isas = common.parse_subset(p, "--isas", args.isas, ISAS)
    meta = common.env_metadata("cpu", 1)
    print(f"bench_cpu_gemm_kinds: C[{ROWS}, {TILE}] = A[{ROWS}, K] B[{TILE}, K]^T, K in {DEPTHS}, one thread, "
          f"on {meta['device']}; torch {meta['torch']}, commit {meta['commit']}")
    results = {}
    for isa in isas:
        env = {} if isa == "all" else {"MKL_ENABLE_INSTRUCTIONS": isa}
        results[isa] = common.run_worker([str(Path(__file__).resolve()), "--_worker", "--seconds", str(args.seconds)],
                                         env=env, timeout=600)
        cells = []
        for k in DEPTHS:
            for kind in KINDS:
                r = results[isa][f"{kind}_{k}"]
                cells.append(f"{kind}/K={k} " + ("-" if r is None else f"{r['gflops']:.0f}"))
        print(f"  {isa:10s} GFLOP/s: {', '.join(cells)}", flush=True)
    worst = max((r["max_rel_err"] for res in results.values() for r in res.values() if r), default=0.0)
    ok = worst < 1e-5
    print(f"  results vs float64 on the same inputs: max relative error {worst:.1e} -> {'OK' if ok else 'WRONG'}")

    def cell(isa: str, kind: str) -> str:
        rs = [results[isa][f"{kind}_{k}"] for k in DEPTHS]
        return " / ".join("-" if r is None else f"{r['gflops']:.0f}" for r in rs)

    if not args.no_write:
        common.append_csv(CSV_PATH, [
            {**meta, "isa": isa, "kind": kind, "m": ROWS, "n": TILE, "k": k, "gflops": f"{r['gflops']:.1f}",
             "max_rel_err": f"{r['max_rel_err']:.2e}"}
            for isa, res in results.items() for kind in KINDS for k in DEPTHS
            if (r := res[f"{kind}_{k}"]) is not None], CSV_COLUMNS)
        rows = [[ISA_TITLES[isa]] + [cell(isa, kind) for kind in KINDS] for isa in results]
        lines = [
            (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · torch {meta['torch']} · "
             f"kdfast {meta['kdfast']} · Python {meta['python']}"),
            "",
            (f"One thread, C[{ROWS}, {TILE}] = A B^T with K = {DEPTHS[0]} / K = {DEPTHS[1]}, GFLOP/s (median of 5); "
             f"every result within {worst:.1e} (relative) of float64 on the same inputs."),
            "",
            common.markdown_table(["MKL allowed", "bf16 GEMM", "fp16 GEMM (`cblas_gemm_f16f16f32`)", "float32 sgemm"],
                                  rows, "lrrr"),
        ]
        common.update_markdown_section(common.BENCHMARKS_MD, MD_SECTION, "\n".join(lines))
        print(f"wrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
