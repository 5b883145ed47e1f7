// Device-side checks of index values (declared in index_checks.h). Every thread
// checks its entries and reports each bad one (so a line per bad entry, in no
// fixed order), then stops: the first report is not singled out, as the
// kernel's threads run in no fixed order.
#include "index_checks.h"

#include <algorithm>
#include <cassert>  // __assert_fail
#include <cstdio>

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // grid-stride loops beyond

int blocks_for(int64_t n) { return int(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)); }

// A device-side assertion whatever NDEBUG says: __assert_fail is what <cassert>'s
// assert calls, and nvcc declares it for device code on Linux.
__device__ void stop(const char* what) { __assert_fail(what, __FILE__, __LINE__, __func__); }

__global__ void check_target_values_kernel(const int64_t* target, int64_t n, int64_t num_classes,
                                           int64_t ignore_index) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = target[i];
    if (t == ignore_index || (t >= 0 && t < num_classes)) continue;
    printf("kdfast: target[%lld] = %lld is outside [0, %lld) and is not ignore_index (%lld)\n", (long long)i,
           (long long)t, (long long)num_classes, (long long)ignore_index);
    stop("kdfast: a target value is outside [0, V) and is not ignore_index (see the line printed above)");
  }
}

// One thread per row; row 0's thread also checks indptr's ends (also when
// B = 0). Only entries inside [0, num_indices) are read, whatever indptr says.
__global__ void check_csr_targets_kernel(const int64_t* indptr, const int64_t* indices, int64_t B,
                                         int64_t num_indices, int64_t V) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < (B > 0 ? B : 1); i += int64_t(gridDim.x) * blockDim.x) {
    bool bad = false;
    if (i == 0 && indptr[0] != 0) {
      printf("kdfast: target.indptr[0] must be 0, got %lld\n", (long long)indptr[0]);
      bad = true;
    }
    if (i == 0 && indptr[B] != num_indices) {
      printf("kdfast: target.indptr[-1] = %lld but target.indices has %lld entries\n", (long long)indptr[B],
             (long long)num_indices);
      bad = true;
    }
    const int64_t p0 = indptr[i], p1 = i < B ? indptr[i + 1] : p0;
    if (p1 < p0) {
      printf("kdfast: target.indptr must be non-decreasing; indptr[%lld] = %lld < indptr[%lld] = %lld\n",
             (long long)(i + 1), (long long)p1, (long long)i, (long long)p0);
      bad = true;
    }
    const int64_t begin = p0 > 0 ? p0 : 0, end = p1 < num_indices ? p1 : num_indices;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t c = indices[j];
      if (c < 0 || c >= V) {
        printf("kdfast: target.indices[%lld] = %lld (row %lld) is outside [0, %lld)\n", (long long)j, (long long)c,
               (long long)i, (long long)V);
        bad = true;
      }
      if (j > begin && c < indices[j - 1]) {
        printf("kdfast: target.indices of row %lld must be sorted ascending; got %lld before %lld\n", (long long)i,
               (long long)indices[j - 1], (long long)c);
        bad = true;
      }
    }
    if (bad) stop("kdfast: target (a MultiTarget) is malformed (see the lines printed above)");
  }
}

// One thread per entry; a repeated class is reported by its later occurrences
// (each compares itself with the row's earlier entries: k^2 / 2 reads a row,
// from L1 as the row's threads share them).
__global__ void check_topk_indices_kernel(const int64_t* indices, int64_t B, int64_t k, int64_t V) {
  const int64_t n = B * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, j = e % k, c = indices[e];
    bool bad = false;
    if (c < 0 || c >= V) {
      printf("kdfast: teacher_topk.indices[%lld, %lld] = %lld is outside [0, %lld)\n", (long long)row, (long long)j,
             (long long)c, (long long)V);
      bad = true;
    }
    const int64_t* r = indices + row * k;
    for (int64_t i = 0; i < j; ++i) {
      if (r[i] == c) {
        printf("kdfast: teacher_topk.indices[%lld] holds class %lld more than once\n", (long long)row, (long long)c);
        bad = true;
        break;
      }
    }
    if (bad) stop("kdfast: teacher_topk.indices holds a bad class (see the line printed above)");
  }
}

}  // namespace

void check_target_values(const int64_t* target, int64_t n, int64_t num_classes, int64_t ignore_index,
                         cudaStream_t stream) {
  if (n <= 0) return;
  check_target_values_kernel<<<blocks_for(n), kThreads, 0, stream>>>(target, n, num_classes, ignore_index);
}

void check_csr_targets(const int64_t* indptr, const int64_t* indices, int64_t B, int64_t num_indices, int64_t V,
                       cudaStream_t stream) {
  check_csr_targets_kernel<<<blocks_for(std::max<int64_t>(B, 1)), kThreads, 0, stream>>>(indptr, indices, B,
                                                                                        num_indices, V);
}

void check_topk_indices(const int64_t* indices, int64_t B, int64_t k, int64_t V, cudaStream_t stream) {
  if (B * k <= 0) return;
  check_topk_indices_kernel<<<blocks_for(B * k), kThreads, 0, stream>>>(indices, B, k, V);
}

}  // namespace kdfast::cuda
