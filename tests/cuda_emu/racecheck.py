"""Racecheck of kdfast's CUDA kernels on the CPU: the emulation built with ThreadSanitizer
(``CUDA_EMU_SANITIZE=thread``, README.md here) runs a small case of each kernel, and every race
it reports is printed: two emulated threads of a block that touch the same address, one of them
writing, with no ``__syncthreads`` or ``__syncwarp`` between (shared memory, as
compute-sanitizer's racecheck checks it, and global memory within a block too).

    python tests/cuda_emu/racecheck.py             # kdfast's kernels: exit 0 when no race is reported
    python tests/cuda_emu/racecheck.py --selftest  # the emulator's racy self-test kernels: exit 0 when
                                                   # both of their races are reported
    python tests/cuda_emu/racecheck.py --logs DIR  # keep ThreadSanitizer's reports in DIR

The script starts itself again with libtsan preloaded (the child does the work); the compilers of
the build run without it. tests/test_cuda_racecheck.py runs both modes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHILD_FLAG = "KDFAST_RACECHECK_CHILD"


def tsan_runtime() -> Path | None:
    """The compiler's libtsan.so, or None where it has none."""
    compiler = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([compiler, "-print-file-name=libtsan.so"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return path if path.is_absolute() and path.exists() else None


# ---------------------------------------------------------------------------- the child: the cases


def _cases(selftest: bool):
    """(name, callable) pairs: small inputs, one or more launches of each kernel."""
    import torch

    import kdfast

    if selftest:
        ops = torch.ops.cuda_emu_selftest
        a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
        return [
            ("racy_write (threads write one word between sync points)", lambda: ops.racy_write(64)),
            ("wmma_product without __syncwarp", lambda: ops.wmma_product(a, b, False, 2048, 0)),
        ]

    g = torch.Generator().manual_seed(0)
    B, V, d, d_t, k = 70, 300, 24, 40, 7

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    def int_target():
        y = torch.randint(0, V, (B,), generator=g)
        y[::9] = -100  # ignore_index rows
        return y

    def multi_target():
        counts = torch.randint(0, 4, (B,), generator=g)  # some rows without positives
        indptr = torch.zeros(B + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        indices = torch.cat([torch.randperm(V, generator=g)[: int(c)].sort().values for c in counts])
        return kdfast.MultiTarget(indptr, indices)

    def fused(dtype, teacher, target, weighting="sigmoid", **options):
        def run():
            h = randn(B, d, dtype=dtype).requires_grad_(True)
            w = randn(V, d, dtype=dtype, scale=d**-0.5).requires_grad_(True)
            bias = randn(V, dtype=dtype, scale=0.1).requires_grad_(True)
            th, tw, tb = randn(B, d_t, dtype=dtype), randn(V, d_t, dtype=dtype, scale=2 * d_t**-0.5), randn(V, dtype=dtype)
            forms = {
                "none": {},
                "dense": {"teacher_logits": randn(B, V, dtype=dtype, scale=2.0)},
                "linear": {"teacher_hidden": th, "teacher_weight": tw, "teacher_bias": tb},
                "topk": {"teacher_topk": kdfast.teacher_topk(th, tw, tb, k=k)},
            }
            terms = {"hard_weight": 1.0} if teacher == "none" else {
                "hard_weight": 0.5, "soft_weight": 0.3, "double_weight": 0.2, "temperature": 2.0,
                "negative_weighting": weighting,
            }
            loss = kdfast.fused_linear_distillation_loss(
                h, w, int_target() if target == "int" else multi_target(), student_bias=bias,
                **forms[teacher], **terms, **options,
            )
            (2.0 * loss).backward()

        return run

    def dense(dtype, weighting):
        def run():
            f = randn(B, V, dtype=dtype).requires_grad_(True)
            loss = kdfast.distillation_loss(
                f, int_target(), randn(B, V, dtype=dtype, scale=2.0), hard_weight=0.5, soft_weight=0.3,
                double_weight=0.2, temperature=2.0, negative_weighting=weighting,
            )
            (2.0 * loss).backward()

        return run

    def topk(dtype):
        return lambda: kdfast.teacher_topk(randn(B, d_t, dtype=dtype), randn(V, d_t, dtype=dtype), k=k)

    def failed_launch_then_fused():
        # launches whose threads stop midway, after a write (their fibers are replaced; what they
        # did comes before the next launch's writes at the same place)
        for _ in range(2):
            try:
                torch.ops.cuda_emu_selftest.divergent_barrier(64)
            except RuntimeError:
                pass
        fused(torch.bfloat16, "linear", "int")()

    def with_env(name, value, run):
        def wrapped():
            before = os.environ.get(name)
            os.environ[name] = value
            try:
                run()
            finally:
                if before is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = before

        return wrapped

    def with_tf32(run):
        def wrapped():
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                run()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False

        return wrapped

    bf16, fp16 = torch.bfloat16, torch.float16
    cases = []
    for teacher in ("none", "dense", "linear", "topk"):
        for target in ("int", "multi"):
            cases.append((f"fused bf16, {teacher} teacher, {target} target", fused(bf16, teacher, target)))
    cases += [
        ("fused bf16, linear teacher, one_minus_prob weights", fused(bf16, "linear", "multi", "one_minus_prob")),
        ("fused bf16, dense teacher, one_minus_prob weights", fused(bf16, "dense", "int", "one_minus_prob")),
        ("fused bf16, gradient filter skipping class groups",
         fused(bf16, "linear", "int", exact=False, filter_eps=0.05, tile_size=64)),
        ("fused bf16, exact", fused(bf16, "topk", "multi", exact=True)),
        ("fused fp16 (scaled backward), linear teacher", fused(fp16, "linear", "multi", "one_minus_prob")),
        ("fused fp16, topk teacher", fused(fp16, "topk", "int")),
        ("fused tf32, linear teacher", with_tf32(fused(torch.float32, "linear", "multi", "one_minus_prob"))),
        ("fused bf16, 3 class splits", with_env("KDFAST_CUDA_MAX_SPLITS", "3", fused(bf16, "linear", "multi"))),
        ("tiled float32, linear teacher", fused(torch.float32, "linear", "multi", "one_minus_prob")),
        ("tiled float32, topk teacher, gradient filter", fused(torch.float32, "topk", "int", filter_eps=0.05)),
        ("tiled bf16, dense teacher", with_env("KDFAST_CUDA_FUSED", "0", fused(bf16, "dense", "multi"))),
        ("dense loss float32", dense(torch.float32, "sigmoid")),
        ("dense loss bf16, one_minus_prob weights", dense(bf16, "one_minus_prob")),
        ("teacher top-k, fused bf16", topk(bf16)),
        ("teacher top-k, fused bf16, 3 splits", with_env("KDFAST_CUDA_MAX_SPLITS", "3", topk(bf16))),
        ("teacher top-k, float32 (tiled)", topk(torch.float32)),
        ("failed launches, then fused bf16", failed_launch_then_fused),
    ]
    return cases


def kdfast_kernels() -> set[str]:
    """The names of the kernels (``__global__`` functions) in csrc/cuda."""
    names = set()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu*")):
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    return names


def child(selftest: bool) -> int:
    sys.path.insert(0, str(HERE))
    import cuda_emulation
    import torch

    torch.set_num_threads(1)  # torch's own threads synchronize where ThreadSanitizer cannot see
    cuda_emulation.install()
    for name, run in _cases(selftest):
        launches, gemms = cuda_emulation.launch_count(), cuda_emulation.mixed_mm_calls()
        run()
        launches, gemms = cuda_emulation.launch_count() - launches, cuda_emulation.mixed_mm_calls() - gemms
        # (the tiled path's bf16 / fp16 GEMMs are torch's, outside the check; the fused kernels call none)
        print(f"case: {name}: {launches} launches, {gemms} bf16/fp16 GEMMs", flush=True)
    counts = cuda_emulation.kernel_launches()
    print("launches per kernel: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    missed = set() if selftest else kdfast_kernels() - set(counts)
    if missed:
        print("racecheck: kernels no case launched: " + ", ".join(sorted(missed)), file=sys.stderr)
        return 4
    return 0


# ---------------------------------------------------------------------------- the parent: the reports


def parse_reports(log_dir: Path) -> list[str]:
    """ThreadSanitizer's reports in log_dir, each shortened to its kind, the two accesses' top
    frames and its summary."""
    reports = []
    for path in sorted(log_dir.glob("tsan*")):
        for block in path.read_text(errors="replace").split("==================")[1:]:
            if "WARNING: ThreadSanitizer" not in block:
                continue
            lines = block.strip().splitlines()
            keep = [lines[0]]
            for i, line in enumerate(lines):
                if re.match(r"\s+(Previous )?(atomic )?(write|read|Write|Read|Atomic)", line) and i + 1 < len(lines):
                    keep += [line.strip(), "    " + re.sub(r"\(.*?\)", "(...)", lines[i + 1].strip())[:200]]
                elif line.startswith("SUMMARY"):
                    keep.append(line[:240])
            reports.append("\n".join(keep))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selftest", action="store_true", help="run the emulator's racy self-test kernels instead")
    parser.add_argument("--logs", type=Path, default=None, help="keep ThreadSanitizer's reports in this folder")
    args = parser.parse_args(argv)
    if os.environ.get(CHILD_FLAG) == "1":
        return child(args.selftest)

    runtime = tsan_runtime()
    if runtime is None:
        print("racecheck: the C++ compiler has no libtsan.so (ThreadSanitizer's runtime)", file=sys.stderr)
        return 2
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="kdfast-racecheck-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("tsan*"):
        old.unlink()
    env = dict(os.environ)
    env.update({
        CHILD_FLAG: "1",
        "CUDA_EMU_SANITIZE": "thread",
        "LD_PRELOAD": str(runtime),
        "OMP_NUM_THREADS": "1",
        # reports to files (the child's own exit status stays its own); no lock-order checks of
        # torch's mutexes
        "TSAN_OPTIONS": f"log_path={log_dir / 'tsan'} exitcode=0 detect_deadlocks=0 report_signal_unsafe=0",
    })
    mode = ["--selftest"] if args.selftest else []
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *mode], check=False, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"racecheck: the cases failed to run or missed a kernel (exit status {proc.returncode})",
              file=sys.stderr)
        return 3
    reports = parse_reports(log_dir)
    for report in reports:
        print(report, end="\n\n")
    print(f"racecheck: {len(reports)} race(s) reported; ThreadSanitizer's logs in {log_dir}")
    if args.selftest:
        found = {kernel: any(kernel in r for r in reports) for kernel in ("racy_write_kernel", "wmma_product_kernel")}
        print("racecheck: self-test races found: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in found.items()))
        return 0 if all(found.values()) else 1
    return 0 if not reports else 1


if __name__ == "__main__":
    sys.exit(main())
