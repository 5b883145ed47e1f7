"""Build of the kdfast._C extension.

The CPU kernels are always built. The CUDA kernels are built when the installed
torch is a CUDA build (``torch.version.cuda``) and nvcc is found — never decided
by a visible GPU. ``KDFAST_SKIP_CUDA=1`` / ``KDFAST_FORCE_CUDA=1`` override.
``KDFAST_CPU_ARCH`` picks the CPU kernels' instruction set (default: this machine's).
Install with ``pip install --no-build-isolation -e .`` so that the build uses
the torch already installed.
"""

from __future__ import annotations

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _cpu_flags() -> list[str]:
    """at::vec picks its implementation from CPU_CAPABILITY_*: use AVX-512 or else
    AVX2 when the building machine has it (the editable build runs where it is
    used); otherwise the portable scalar-loop Vectorized. On the 2-core AMD EPYC
    (Zen 4) AVX-512 cuts the fused losses' elementwise time by ~10-20%.
    ``KDFAST_CPU_ARCH=avx512|avx2|generic`` builds for another machine instead
    (benchmarks/prepare_device.sh builds the GPU machine's with avx2)."""
    arch = os.environ.get("KDFAST_CPU_ARCH", "native").lower()
    choices = {"avx512": _AVX512_FLAGS, "avx2": _AVX2_FLAGS, "generic": []}
    if arch in choices:
        return choices[arch]
    if arch != "native":
        raise ValueError(f"KDFAST_CPU_ARCH must be native, avx512, avx2 or generic, got {arch!r}")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return _AVX512_FLAGS
    if {"avx2", "fma", "f16c"} <= flags:
        return _AVX2_FLAGS
    return []


def _want_cuda() -> bool:
    if _env_flag("KDFAST_SKIP_CUDA"):
        return False
    if _env_flag("KDFAST_FORCE_CUDA"):
        return True
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _extension():
    # csrc/cuda_ops.cpp is the torch glue of the CUDA kernels: built only for a CUDA torch
    sources = sorted(s for s in glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") if not s.endswith("cuda_ops.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fdiagnostics-color=always"] + _cpu_flags()
    link = ["-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + glob.glob("csrc/cuda_ops.cpp")
    if _want_cuda() and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        return CUDAExtension(
            "kdfast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DKDFAST_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link,
        )
    return CppExtension("kdfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
