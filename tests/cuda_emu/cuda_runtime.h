// CPU stand-in for <cuda_runtime.h>, for the CUDA emulation build of the tests
// (tests/cuda_emu/README.md): the few runtime types kdfast's kernel headers name.
#pragma once

#include <cstddef>

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719
};

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace cuda_emu {
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
// The first error since the last call (a bad launch, a kernel that broke the
// emulator's rules), and its message; clears it, as cudaGetLastError would.
cudaError_t take_last_error(const char** message);
}  // namespace cuda_emu

// A kernel's opt-in to more than 48 KiB of dynamic shared memory (the only attribute emulated).
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cuda_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
