// Kernels that test the emulator itself (tests/test_cuda_emulated.py, through
// selftest_ops.cpp): a block reduction by shuffles and shared memory, a
// barrier some threads skip, and a race between two sync points.
#include <cuda_runtime.h>

#include <cstdint>

namespace cuda_emu_selftest {
namespace {

// out[block] = sum of x over the block's threads; also out_xor[t] = x of lane t ^ 1.
__global__ void block_sum_kernel(const float* x, float* out, float* out_xor) {
  __shared__ float partial[32];
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  float v = x[t];
  out_xor[t] = __shfl_xor_sync(0xffffffffu, v, 1);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

// Threads above the first half leave before a barrier the others wait at.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x >= blockDim.x / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Every thread writes its index to one shared word, with no barrier between
// the writes: which one lands depends on the order the threads run in.
__global__ void racy_write_kernel(int* out) {
  __shared__ int word;
  word = threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) *out = word;
}

}  // namespace

void block_sum(const float* x, float* out, float* out_xor, int blocks, int threads, cudaStream_t stream) {
  block_sum_kernel<<<blocks, threads, 0, stream>>>(x, out, out_xor);
}
void divergent_barrier(int* out, int threads, cudaStream_t stream) {
  divergent_barrier_kernel<<<1, threads, 0, stream>>>(out);
}
void racy_write(int* out, int threads, cudaStream_t stream) { racy_write_kernel<<<1, threads, 0, stream>>>(out); }

}  // namespace cuda_emu_selftest
