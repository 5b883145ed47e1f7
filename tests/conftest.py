"""Shared fixtures of the kdfast tests: the devices to run on and hypothesis settings."""

from __future__ import annotations

import os
import tempfile

# A fresh inductor cache per session: a cached graph bakes in the fake kernels'
# output shapes, and must not outlive a change to them.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kdfast-inductor-"))

import pytest
import torch
from hypothesis import HealthCheck, settings


def _cuda_kernels_built() -> bool:
    """True when a CUDA device is usable and kdfast was built with its CUDA kernels."""
    if not (torch.cuda.is_available() and torch.version.cuda):
        return False
    try:
        import kdfast  # noqa: F401  (registers the ops)

        return torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::distillation_loss_forward", "CUDA")
    except (ImportError, RuntimeError):  # an import error shows up in the tests themselves
        return False


DEVICES = ["cpu"] + (["cuda"] if _cuda_kernels_built() else [])

# KDFAST_CUDA_EMU=1 (make test-cuda-emu): the CPU kernels of kdfast's CUDA ops are replaced by
# its CUDA glue and kernels built as CPU code (tests/cuda_emu/README.md), so the CPU tests run
# the code a CUDA build runs. test_cuda_emulated.py (the emulator's own tests) runs only then.
CUDA_EMU = os.environ.get("KDFAST_CUDA_EMU") == "1"
if CUDA_EMU:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import cuda_emulation

    cuda_emulation.install()
collect_ignore = [] if CUDA_EMU else ["test_cuda_emulated.py"]
# the device-side index checks run under the emulation or on a GPU
if not CUDA_EMU and "cuda" not in DEVICES:
    collect_ignore.append("test_cuda_index_checks.py")

@pytest.fixture
def set_tf32():
    """A setter of ``torch.backends.cuda.matmul.allow_tf32`` (whether CUDA's float32 matmuls, and
    kdfast's fused CUDA kernels, may use tf32), put back as it was after the test. (Not
    monkeypatch.setattr: under torch 2.11 its undo fails on that module.)"""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_to(on: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = on

    yield set_to
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> str:
    """Every device kdfast has kernels for (session-scoped so hypothesis tests may use it)."""
    return request.param


@pytest.fixture
def runs_cuda_code(device) -> bool:
    """Whether kdfast's CUDA ops run its CUDA code on this device: on CUDA, and on the CPU under
    the emulation (KDFAST_CUDA_EMU=1). For tests whose expectation differs between the two paths."""
    return device == "cuda" or CUDA_EMU


@pytest.fixture
def host_index_checks(monkeypatch) -> None:
    """The CUDA ops check index values on the host too (KDFAST_CUDA_HOST_CHECKS=1), so that a bad
    one raises a ValueError there, as on the CPU, instead of their default device-side assertion,
    which ends the process's CUDA context (tests/test_cuda_index_checks.py tests that one). For
    tests of the error messages; the CPU kernels always check on the host."""
    monkeypatch.setenv("KDFAST_CUDA_HOST_CHECKS", "1")


@pytest.fixture(params=["0", "1"], ids=["fp32_gemm", "bf16_gemm"])
def cpu_bf16_gemm(request, monkeypatch) -> str:
    """Both ways the CPU kernels multiply bf16 inputs (csrc/cpu/gemm.h): upcast to float32 GEMMs
    (KDFAST_CPU_BF16_GEMM=0) and MKL's bf16 GEMM, forced on whatever the CPU
    (KDFAST_CPU_BF16_GEMM=1; skipped only where this torch does not export it). CUDA ignores it."""
    import kdfast

    params = getattr(request.node, "callspec", None)
    on_cuda = params is not None and params.params.get("device") == "cuda"
    if request.param == "1" and on_cuda:
        pytest.skip("CUDA ignores KDFAST_CPU_BF16_GEMM: the fp32_gemm case already ran this")
    monkeypatch.setenv("KDFAST_CPU_BF16_GEMM", request.param)
    status = kdfast.ops.cpu_bf16_gemm_status()
    if request.param == "1" and not status.startswith("on"):
        pytest.skip(f"the CPU bf16 GEMM is not available: {status}")
    assert status.startswith("on" if request.param == "1" else "off"), status
    return request.param


settings.register_profile(
    "kdfast",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# a longer search for a one-off run: pytest --hypothesis-profile=kdfast-thorough
settings.register_profile("kdfast-thorough", parent=settings.get_profile("kdfast"), max_examples=3000)
settings.load_profile("kdfast")
