// Kernels that test the emulator itself (tests/test_cuda_emulated.py, through
// selftest_ops.cpp): a block reduction by shuffles and shared memory, lane
// exchanges by index and ballots, a
// barrier some threads skip, a race between two sync points, and a warp's
// 16 x 16 x 16 tensor-core product in dynamic shared memory (with and without
// the __syncwarp between the store and a read of other lanes' elements), and a
// 16 x 16 x 8 tf32 one.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

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

// rotated[t] = x of lane (t + shift) % 32 of t's warp (__shfl_sync); ballot[w] =
// the lanes of warp w whose x > 0 (__ballot_sync).
__global__ void lane_exchange_kernel(const float* x, float* rotated, unsigned* ballot, int shift) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  rotated[t] = __shfl_sync(0xffffffffu, x[t], (threadIdx.x % 32 + shift) % 32);
  const unsigned bits = __ballot_sync(0xffffffffu, x[t] > 0);
  if (threadIdx.x % 32 == 0) ballot[t / 32] = bits;
}

// Threads above the first half leave before a barrier the others wait at, each
// having marked its slot of a global array first (the racecheck build: a later
// launch's writes there come after the stopped threads' ones).
__device__ int divergent_marks[1024];
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x >= blockDim.x / 2) return;
  divergent_marks[threadIdx.x] = 1;
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

// One warp: c = a b (bf16 16 x 16 inputs, row-major) through dynamic shared
// memory; with sync = false, lane 0 sums c from shared memory right after the
// store, without the __syncwarp that makes the other lanes' elements visible.
__global__ void wmma_product_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, float* sum, bool sync) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sb = sa + 256;
  float* sc = reinterpret_cast<float*>(sb + 256);
  for (int e = threadIdx.x; e < 256; e += 32) {
    sa[e] = a[e];
    sb[e] = b[e];
    sc[e] = 0.0f;
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(sc, fc, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  if (threadIdx.x == 0) {
    float total = 0;
    for (int e = 0; e < 256; ++e) total += sc[e];
    *sum = total;
  }
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += 32) c[e] = sc[e];
}

// One warp: c = a b in tf32 (a 16 x 8, b 8 x 16, float row-major in global memory),
// the fragments' elements rounded with __float_to_tf32 as the kernels do.
__global__ void tf32_product_kernel(const float* a, const float* b, float* c) {
  namespace wmma = nvcuda::wmma;
  __align__(32) __shared__ float sa[128], sb[128], sc[256];
  for (int e = threadIdx.x; e < 128; e += 32) {
    sa[e] = a[e];
    sb[e] = b[e];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, sa, 8);
  wmma::load_matrix_sync(fb, sb, 16);
  for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
  for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(sc, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += 32) c[e] = sc[e];
}

}  // namespace

void tf32_product(const float* a, const float* b, float* c, cudaStream_t stream) {
  tf32_product_kernel<<<1, 32, 0, stream>>>(a, b, c);
}

// shared_bytes of dynamic shared memory (at least 2 KiB), after opting in to opt_in_bytes (0: no opt-in).
void wmma_product(const void* a, const void* b, float* c, float* sum, bool sync, int shared_bytes, int opt_in_bytes,
                  cudaStream_t stream) {
  if (opt_in_bytes > 0) {
    cudaFuncSetAttribute(wmma_product_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes);
  }
  wmma_product_kernel<<<1, 32, shared_bytes, stream>>>(static_cast<const __nv_bfloat16*>(a),
                                                       static_cast<const __nv_bfloat16*>(b), c, sum, sync);
}

void block_sum(const float* x, float* out, float* out_xor, int blocks, int threads, cudaStream_t stream) {
  block_sum_kernel<<<blocks, threads, 0, stream>>>(x, out, out_xor);
}
void lane_exchange(const float* x, float* rotated, unsigned* ballot, int shift, int blocks, int threads,
                   cudaStream_t stream) {
  lane_exchange_kernel<<<blocks, threads, 0, stream>>>(x, rotated, ballot, shift);
}
void divergent_barrier(int* out, int threads, cudaStream_t stream) {
  divergent_barrier_kernel<<<1, threads, 0, stream>>>(out);
}
void racy_write(int* out, int threads, cudaStream_t stream) { racy_write_kernel<<<1, threads, 0, stream>>>(out); }

}  // namespace cuda_emu_selftest
