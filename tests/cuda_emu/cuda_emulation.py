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
import subprocess
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# CUDA_EMU_SANITIZE=address (or 1): an AddressSanitizer build, for a process started with libasan
# preloaded; CUDA_EMU_SANITIZE=thread: the racecheck build (ThreadSanitizer), for a process started
# with libtsan preloaded (README.md). Each in its own folder.
_SANITIZERS = {"": None, "0": None, "1": "address", "address": "address", "thread": "thread"}
if os.environ.get("CUDA_EMU_SANITIZE", "") not in _SANITIZERS:
    raise ValueError(
        f"CUDA_EMU_SANITIZE={os.environ['CUDA_EMU_SANITIZE']!r}: expected one of 'address' (or 1), 'thread', or unset"
    )
SANITIZE = _SANITIZERS[os.environ.get("CUDA_EMU_SANITIZE", "")]
BUILD_DIR = ROOT / "build" / {None: "cuda-emu", "address": "cuda-emu-asan", "thread": "cuda-emu-tsan"}[SANITIZE]
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
    shmem, stream).named("k").run(k<T>, args)``, for every launch in a kernel file's text."""
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
        name = re.sub(r"<.*", "", kernel).split("::")[-1]  # (counted per name: kernel_launches)
        call = f'::cuda_emu::Launch({config}).named("{name}").run({kernel}{", " + args if args else ""})'
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


def _scheduler_object() -> Path:
    """The racecheck build's ``cuda_emu.cpp``, compiled apart, without ThreadSanitizer: the
    scheduler's bookkeeping, shared by the emulated threads, is not what is checked; it tells
    ThreadSanitizer what orders the threads instead (CUDA_EMU_RACECHECK). Rebuilt when its
    sources change, and then the library is relinked."""
    obj = BUILD_DIR / "cuda_emu_scheduler.o"
    sources = [HERE / "cuda_emu.cpp", HERE / "cuda_emu.h", HERE / "cuda_runtime.h"]
    if obj.exists() and obj.stat().st_mtime >= max(src.stat().st_mtime for src in sources):
        return obj
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    subprocess.run(
        [compiler, "-O1", "-g", "-fPIC", "-std=c++17", "-DCUDA_EMU_RACECHECK", f"-I{HERE}", "-c",
         str(HERE / "cuda_emu.cpp"), "-o", str(obj)],
        check=True,
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},  # (as install's build)
    )
    (BUILD_DIR / f"{NAME}.so").unlink(missing_ok=True)  # ninja does not see the object: relink
    return obj


_LOADED: ctypes.CDLL | None = None


def install(verbose: bool = False) -> None:
    """Builds (incrementally) and loads the emulation library: from now on, in this process, the
    CUDA ops of ``torch.ops.kdfast`` on CPU tensors run kdfast's CUDA glue and kernels."""
    global _LOADED
    if _LOADED is not None:
        return
    from torch.utils.cpp_extension import load

    import kdfast  # noqa: F401  (the op schemas, and the CPU kernels the library replaces)

    sources = [CSRC / "cuda_ops.cpp", HERE / "selftest_ops.cpp", *_translate_kernels()]
    flags = ["-O1", "-DKDFAST_CUDA_DISPATCH_KEY=CPU"]
    ldflags: list[str] = []
    if SANITIZE == "address":  # the kernels' loads and stores checked by AddressSanitizer (README.md)
        sources.append(HERE / "cuda_emu.cpp")
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    elif SANITIZE == "thread":  # the kernels' accesses checked for races by ThreadSanitizer (README.md)
        flags += ["-fsanitize=thread", "-g"]
        ldflags += ["-fsanitize=thread", str(_scheduler_object())]
    else:
        sources.append(HERE / "cuda_emu.cpp")
    # the compilers run without the sanitizer this process was started with (under a preloaded
    # libtsan they fail)
    preload = os.environ.pop("LD_PRELOAD", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load(
                name=NAME,
                sources=[str(s) for s in sources],
                extra_include_paths=[str(HERE), str(CSRC), str(CSRC / "cuda")],
                extra_cflags=flags,
                extra_ldflags=ldflags,
                build_directory=str(BUILD_DIR),
                is_python_module=False,
                verbose=verbose,
            )
        finally:
            if preload is not None:
                os.environ["LD_PRELOAD"] = preload
    _register_mixed_precision_mm()
    _LOADED = ctypes.CDLL(str(BUILD_DIR / f"{NAME}.so"))  # the same handle torch loaded
    _LOADED.cuda_emu_launch_count.restype = ctypes.c_uint64
    _LOADED.cuda_emu_kernel_launches.restype = ctypes.c_char_p
    _LOADED.cuda_emu_seed.argtypes = [ctypes.c_uint64]


def launch_count() -> int:
    """Kernel launches the emulator has run in this process."""
    install()
    return int(_LOADED.cuda_emu_launch_count())


def kernel_launches() -> dict[str, int]:
    """Launches so far in this process, per kernel name (template arguments left out)."""
    install()
    text = _LOADED.cuda_emu_kernel_launches().decode()
    return {name: int(count) for name, count in (item.split("=") for item in text.split(";") if item)}


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
