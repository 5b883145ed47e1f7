// CPU emulation of the CUDA device code kdfast's kernels use, for the tests
// (tests/cuda_emu/README.md). cuda_emulation.py puts this header before a kernel file's
// text and turns each `kernel<<<grid, block, shmem, stream>>>(args)` into
// `cuda_emu::Launch(grid, block, shmem, stream).named("kernel").run(kernel, args)`.
//
// A launch runs now, on the calling thread, one block after another. A block's
// threads are fibers that switch only at __syncthreads and warp shuffles, so
// code between two sync points runs as one step per thread. The order in which
// the fibers take their steps is shuffled per step (seeded by CUDA_EMU_SEED,
// default 1): a kernel whose result depends on that order (a race between sync
// points) gives results that move with the seed. A barrier or shuffle that not
// every thread of its block or warp reaches (some exited, or wait at a shuffle
// while others wait at a barrier) is an error, raised by the op's launch check.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time, so a block's shared arrays can be function statics
// (and `extern __shared__ T name[];`, dynamic shared memory, is rewritten by
// cuda_emulation.py into a pointer to the block's buffer: dynamic_shared below)
#define __shared__ static
// Device code may call __assert_fail itself (nvcc declares it for device code on
// Linux; <cassert>'s assert calls it): a failed launch, not an abort. <cassert> is
// included first, so that its declaration of __assert_fail is not rewritten.
#include <cassert>
#define __assert_fail(assertion, file, line, function) ::cuda_emu::device_assert(assertion, file, line, function)
#define __align__(n) alignas(n)

namespace cuda_emu {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// __syncthreads with an OR of pred over the block's threads.
int sync_block(int pred);
// The 8-byte slot exchange behind the warp shuffles: every lane of the warp
// puts its value, then takes lane (lane ^ partner_xor)'s.
uint64_t warp_exchange(unsigned mask, uint64_t value, int partner_xor);
// The same, each lane taking lane src_lane's value (__shfl_sync).
uint64_t warp_exchange_from(unsigned mask, uint64_t value, int src_lane);
// __ballot_sync: bit l set where lane l's pred is.
unsigned warp_ballot(unsigned mask, bool pred);
// __syncwarp: every lane of the warp arrives before any goes on.
void sync_warp(unsigned mask);
// The current block's dynamic shared memory (the launch's shmem bytes, filled
// with 0xff bytes, a NaN in every float, before each block).
void* dynamic_shared();
// The current thread's lane in its warp.
int lane_id();
// Fails the current launch with this message (the kernel's thread stops).
[[noreturn]] void fail(const char* message);
// A device-side assertion: fails the current launch with cudaErrorAssert and a
// message naming the assertion, its place, the block and the thread.
[[noreturn]] void device_assert(const char* assertion, const char* file, unsigned line, const char* function);

// Kernel launches so far in this process (tests check that an op ran kernels).
uint64_t launch_count();
// "name=count;" for each kernel name launched so far.
std::string kernel_launches();

// kernel: the launched function (for cudaFuncSetAttribute's opt-in above 48 KiB
// of dynamic shared memory); name: its name, for the launch counts per kernel.
void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body);

struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  const char* name = "?";
  Launch(dim3 g, dim3 b, size_t shmem = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(shmem) {}
  Launch& named(const char* kernel_name) {
    name = kernel_name;
    return *this;
  }
  // Kernel parameters are copied per thread, as CUDA passes them by value.
  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(reinterpret_cast<const void*>(kernel), name, grid, block, shared_bytes,
             [&] { std::apply(kernel, params); });
  }
};

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { cuda_emu::sync_block(0); }
inline int __syncthreads_or(int pred) { return cuda_emu::sync_block(pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::sync_warp(mask); }

namespace cuda_emu {
// value's bytes through one of the warp exchanges above (the shuffles move up to 8 bytes).
template <typename T, typename Exchange>
T shuffle_bytes(T value, const Exchange& exchange) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a value over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange(bits);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace cuda_emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return cuda_emu::shuffle_bytes(value, [&](uint64_t bits) { return cuda_emu::warp_exchange(mask, bits, lane_mask); });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  return cuda_emu::shuffle_bytes(value,
                                 [&](uint64_t bits) { return cuda_emu::warp_exchange_from(mask, bits, src_lane); });
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return cuda_emu::warp_ballot(mask, pred != 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// One block runs at a time on one thread, so an atomic needs no lock; it is still a
// compiler atomic (relaxed), so that the racecheck build's ThreadSanitizer sees it as one.
inline int atomicExch(int* address, int value) { return __atomic_exchange_n(address, value, __ATOMIC_RELAXED); }
inline int atomicOr(int* address, int value) { return __atomic_fetch_or(address, value, __ATOMIC_RELAXED); }
inline int __float_as_int(float x) {
  int bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline float __int_as_float(int bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

inline int atomicMax(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline float atomicAdd(float* address, float value) {
  float old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  float sum = old + value;
  while (!__atomic_compare_exchange(address, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) sum = old + value;
  return old;
}

// device maths: CUDA's overloads for float and double (and min/max for integers)
using std::exp;
using std::fabs;
using std::log;
using std::log1p;
using std::max;
using std::min;
