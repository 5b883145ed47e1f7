"""Builds kdfast's CUDA glue and kernels as CPU code and puts them in place of kdfast's CPU
kernels of the same ops, for the tests (README.md here).

``install()`` compiles ``csrc/cuda_ops.cpp`` (the torch glue, registered for the CPU key by
``-DKDFAST_CUDA_DISPATCH_KEY=CPU``) and ``csrc/cuda/*.cu`` (the kernels, each launch
rewritten for the emulator of ``cuda_emu.h``) into ``build/cuda-emu/kdfast_cuda_emu.so`` and
loads it after ``kdfast._C``: from then on, in this process, ``torch.ops.kdfast``'s five
CUDA ops (``kdfast.ops.CUDA_OPS``) on CPU tensors run the code a CUDA build runs.
``python tests/cuda_emu/cuda_emulation.py`` builds it verbosely.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# CUDA_EMU_SANITIZE=1: an AddressSanitizer build (its own folder), for a process started with
# libasan preloaded (README.md)
SANITIZE = os.environ.get("CUDA_EMU_SANITIZE") == "1"
BUILD_DIR = ROOT / "build" / ("cuda-emu-asan" if SANITIZE else "cuda-emu")
NAME = "kdfast_cuda_emu"

_IDENT = re.compile(r"[A-Za-z0-9_:]")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (``name`` or ``name<args>``) that ends at ``end``."""
    i = end
    if text[i - 1] == ">":  # template arguments, balanced
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and _IDENT.match(text[i - 1]):
        i -= 1
    if i == end:
        raise ValueError("a kernel launch '<<<' with no kernel name before it")
    return i


def _closing_paren(text: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses after a kernel launch")


def rewrite_launches(text: str) -> str:
    """``k<T><<<grid, block, shmem, stream>>>(args)`` -> ``::cuda_emu::Launch(grid, block,
    shmem, stream).run(k<T>, args)``, for every launch in a kernel file's text."""
    out = text
    while (start := out.find("<<<")) >= 0:
        stop = out.find(">>>", start)
        if stop < 0:
            raise ValueError("a kernel launch '<<<' without its '>>>'")
        kernel_at = _kernel_start(out, start)
        kernel = out[kernel_at:start].strip()
        config = out[start + 3 : stop]
        paren = stop + 3
        while paren < len(out) and out[paren].isspace():
            paren += 1
        if paren == len(out) or out[paren] != "(":
            raise ValueError(f"a kernel launch of {kernel} without its arguments")
        close = _closing_paren(out, paren)
        args = out[paren + 1 : close].strip()
        call = f"::cuda_emu::Launch({config}).run({kernel}{', ' + args if args else ''})"
        out = out[:kernel_at] + call + out[close + 1 :]
    return out


_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+(\w+)\s*\[\s*\]\s*;"
)


def rewrite_dynamic_shared(text: str) -> str:
    """``extern __shared__ [__align__(n)] T name[];`` (dynamic shared memory) -> ``T* name =
    static_cast<T*>(::cuda_emu::dynamic_shared());``, the block's buffer in the emulator."""
    return _DYNAMIC_SHARED.sub(r"\1* \2 = static_cast<\1*>(::cuda_emu::dynamic_shared());", text)


def _translate_kernels() -> list[Path]:
    """csrc/cuda/*.cu (and selftest.cu here) -> build/cuda-emu/src/*.cpp, the emulator first."""
    src_dir = BUILD_DIR / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for cu in [*sorted((CSRC / "cuda").glob("*.cu")), HERE / "selftest.cu"]:
        text = f'#include "cuda_emu.h"\n#line 1 "{cu}"\n' + rewrite_launches(rewrite_dynamic_shared(cu.read_text()))
        out = src_dir / f"{cu.stem}.cpp"
        if not out.exists() or out.read_text() != text:  # an unchanged file keeps ninja's object
            out.write_text(text)
        outputs.append(out)
    return outputs


_ATEN_LIBRARY = None
_MIXED_MM_CALLS = 0


def _register_mixed_precision_mm() -> None:
    """CPU kernels for ``aten::mm.dtype`` / ``mm.dtype_out`` (bf16/fp16 inputs, float32 output), which
    the CUDA glue calls and torch has on CUDA only: the inputs upcast, then a float32 GEMM, as cuBLAS
    computes (products of bf16/fp16 values are exact in float32; the sums are float32). Registered
    only where torch has no CPU kernel of its own."""
    global _ATEN_LIBRARY
    if _ATEN_LIBRARY is not None or torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CPU"):
        return

    def mm_dtype(a, b, out_dtype):
        global _MIXED_MM_CALLS
        _MIXED_MM_CALLS += 1
        return torch.mm(a.to(out_dtype), b.to(out_dtype))

    def mm_dtype_out(a, b, out_dtype, *, out):
        global _MIXED_MM_CALLS
        _MIXED_MM_CALLS += 1
        return torch.mm(a.to(out_dtype), b.to(out_dtype), out=out)

    _ATEN_LIBRARY = torch.library.Library("aten", "IMPL")
    _ATEN_LIBRARY.impl("mm.dtype", mm_dtype, "CPU")
    _ATEN_LIBRARY.impl("mm.dtype_out", mm_dtype_out, "CPU")


_LOADED: ctypes.CDLL | None = None


def install(verbose: bool = False) -> None:
    """Builds (incrementally) and loads the emulation library: from now on, in this process, the
    CUDA ops of ``torch.ops.kdfast`` on CPU tensors run kdfast's CUDA glue and kernels."""
    global _LOADED
    if _LOADED is not None:
        return
    from torch.utils.cpp_extension import load

    import kdfast  # noqa: F401  (the op schemas, and the CPU kernels the library replaces)

    sources = [CSRC / "cuda_ops.cpp", HERE / "cuda_emu.cpp", HERE / "selftest_ops.cpp", *_translate_kernels()]
    flags = ["-O1", "-DKDFAST_CUDA_DISPATCH_KEY=CPU"]
    if SANITIZE:  # the kernels' loads and stores checked by AddressSanitizer (README.md)
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(
            name=NAME,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(HERE), str(CSRC), str(CSRC / "cuda")],
            extra_cflags=flags,
            extra_ldflags=["-fsanitize=address"] if SANITIZE else [],
            build_directory=str(BUILD_DIR),
            is_python_module=False,
            verbose=verbose,
        )
    _register_mixed_precision_mm()
    _LOADED = ctypes.CDLL(str(BUILD_DIR / f"{NAME}.so"))  # the same handle torch loaded
    _LOADED.cuda_emu_launch_count.restype = ctypes.c_uint64
    _LOADED.cuda_emu_seed.argtypes = [ctypes.c_uint64]


def launch_count() -> int:
    """Kernel launches the emulator has run in this process."""
    install()
    return int(_LOADED.cuda_emu_launch_count())


def mixed_mm_calls() -> int:
    """Calls of the CPU ``aten::mm.dtype`` kernels registered here so far: the bf16/fp16 GEMMs of
    the CUDA glue's tiled path (the fused kernels make their logits themselves)."""
    return _MIXED_MM_CALLS


def set_seed(seed: int) -> None:
    """Reseeds the order in which the calling thread's emulated threads take their steps."""
    install()
    _LOADED.cuda_emu_seed(seed)


if __name__ == "__main__":
    install(verbose=True)
    print("built and loaded", BUILD_DIR / f"{NAME}.so")
