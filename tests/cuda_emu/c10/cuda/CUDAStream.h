// CPU stand-in for c10/cuda/CUDAStream.h (tests/cuda_emu): the one stream,
// on which launches run at once.
#pragma once

#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
