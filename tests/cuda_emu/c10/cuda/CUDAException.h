// CPU stand-in for c10/cuda/CUDAException.h (tests/cuda_emu): a launch check
// that raises the emulator's error as torch would raise a CUDA error.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                  \
  do {                                                                                  \
    const char* cuda_emu_message = nullptr;                                             \
    const cudaError_t cuda_emu_code = ::cuda_emu::take_last_error(&cuda_emu_message);   \
    TORCH_CHECK(cuda_emu_code == cudaSuccess, "CUDA error (emulated): ", cuda_emu_message); \
  } while (0)
