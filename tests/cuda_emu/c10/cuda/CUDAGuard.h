// CPU stand-in for c10/cuda/CUDAGuard.h (tests/cuda_emu): one "device", the host.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
