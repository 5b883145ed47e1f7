// CUDA kernels of teacher top-k labeling (declared in teacher_topk.h); the
// maths and the order of candidates are csrc/cpu/teacher_topk.cpp's: larger
// logit first, ties to the lower class, NaN above every number.
//
// A warp per row (topk_row.cuh): each tile's softmax statistics are folded into
// the row's, then the tile's logits are offered to the row's list 32 at a time;
// only those that beat the list's last entry are sorted and merged in.
#include "teacher_topk.h"

#include <cmath>

#include "topk_row.cuh"

namespace kdfast::cuda {
namespace {

using namespace topk_row;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // a warp per row

template <typename T>
__global__ void topk_init_kernel(T* best_logit, int64_t* best_index, int64_t* count, T* stats, int64_t B, int64_t k) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < B * k) {
    best_logit[i] = T(0);
    best_index[i] = -1;
  }
  if (i < B) {
    count[i] = 0;
    store_stats(empty_stats<T>(), stats + i * kNumSoftmaxStats);
  }
}

// Warp w of block b takes row 8 b + w of the tile x [B, n] (classes [c0, c0 + n)).
template <typename T>
__global__ void __launch_bounds__(kThreads) topk_tile_kernel(const T* x_all, int64_t B, int64_t n, int64_t c0,
                                                             int64_t k, T inv_t, T* best_logit, int64_t* best_index,
                                                             int64_t* count, T* stats) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= B) return;  // (the whole warp)
  const T* x = x_all + row * n;
  SoftmaxStats<T> st = load_stats(stats + row * kNumSoftmaxStats);
  merge_stats(st, warp_stats(x, n, inv_t), inv_t);
  const RowList<T> list{best_logit + row * k, best_index + row * k, k};
  const int64_t filled =
      warp_select<T>(n, [&](int64_t j) { return Candidate<T>{x[j], c0 + j}; }, list, count[row]);
  __syncwarp();  // every lane has read the old count and statistics
  if (lane() == 0) {
    count[row] = filled;
    store_stats(st, stats + row * kNumSoftmaxStats);
  }
}

// A warp per row: split 0's list and statistics, then split 1's merged in, and so on.
__global__ void __launch_bounds__(kThreads) topk_merge_splits_kernel(const float* part_logit,
                                                                     const int64_t* part_index,
                                                                     const int64_t* part_count,
                                                                     const float* part_stats, int64_t splits,
                                                                     int64_t B, int64_t k, float inv_t,
                                                                     float* best_logit, int64_t* best_index,
                                                                     float* stats) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= B) return;
  const RowList<float> list{best_logit + row * k, best_index + row * k, k};
  int64_t count = part_count[row];
  for (int64_t e = lane(); e < count; e += 32) {
    list.logit[e] = part_logit[row * k + e];
    list.index[e] = part_index[row * k + e];
  }
  __syncwarp();
  SoftmaxStats<float> st = load_stats(part_stats + row * kNumSoftmaxStats);
  for (int64_t b = 1; b < splits; ++b) {
    const int64_t at = b * B + row;
    merge_stats(st, load_stats(part_stats + at * kNumSoftmaxStats), inv_t);
    const float* logit = part_logit + at * k;
    const int64_t* index = part_index + at * k;
    count = warp_select<float>(
        part_count[at], [&](int64_t j) { return Candidate<float>{logit[j], index[j]}; }, list, count, true);
  }
  if (lane() == 0) store_stats(st, stats + row * kNumSoftmaxStats);
}

template <typename T>
__global__ void topk_finish_kernel(const T* best_logit, const T* stats, int64_t B, int64_t k, T inv_t, T* lse,
                                   T* entropy, T* covered) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  const T* st = stats + i * kNumSoftmaxStats;
  const T max = st[0], sum = st[1], dot = st[2];
  if (st[3] != T(0) || max == T(INFINITY)) {  // as torch.logsumexp: NaN for a NaN logit, +inf for +inf
    lse[i] = st[3] != T(0) ? T(NAN) : max;
    entropy[i] = covered[i] = T(NAN);
    return;
  }
  const T log_sum = d_log(sum);
  lse[i] = max * inv_t + log_sum;
  entropy[i] = log_sum - dot / sum;
  const T shift = max == -T(INFINITY) ? T(0) : max;
  T mass = 0;
  for (int64_t j = 0; j < k; ++j) mass += d_exp((best_logit[i * k + j] - shift) * inv_t - log_sum);
  covered[i] = mass > T(1) ? T(1) : mass;  // as std::min on the CPU: a NaN mass (a row of -inf logits) stays NaN
}

}  // namespace

template <typename acc_t>
void topk_init(acc_t* best_logit, int64_t* best_index, int64_t* count, acc_t* stats, int64_t B, int64_t k,
               cudaStream_t stream) {
  const int64_t total = B * k > B ? B * k : B;
  if (total > 0) {
    topk_init_kernel<acc_t><<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        best_logit, best_index, count, stats, B, k);
  }
}

template <typename acc_t>
void topk_tile(const acc_t* x, int64_t B, int64_t n, int64_t c0, int64_t k, double temperature, acc_t* best_logit,
               int64_t* best_index, int64_t* count, acc_t* stats, cudaStream_t stream) {
  if (B > 0 && n > 0) {
    topk_tile_kernel<acc_t><<<static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock), kThreads, 0, stream>>>(
        x, B, n, c0, k, acc_t(1) / acc_t(temperature), best_logit, best_index, count, stats);
  }
}

void topk_merge_splits(const float* part_logit, const int64_t* part_index, const int64_t* part_count,
                       const float* part_stats, int64_t splits, int64_t B, int64_t k, double temperature,
                       float* best_logit, int64_t* best_index, float* stats, cudaStream_t stream) {
  if (B > 0) {
    topk_merge_splits_kernel<<<static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock), kThreads, 0,
                               stream>>>(part_logit, part_index, part_count, part_stats, splits, B, k,
                                         1.0f / float(temperature), best_logit, best_index, stats);
  }
}

template <typename acc_t>
void topk_finish(const acc_t* best_logit, const acc_t* stats, int64_t B, int64_t k, double temperature, acc_t* lse,
                 acc_t* entropy, acc_t* covered, cudaStream_t stream) {
  if (B > 0) {
    topk_finish_kernel<acc_t><<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        best_logit, stats, B, k, acc_t(1) / acc_t(temperature), lse, entropy, covered);
  }
}

#define KDFAST_INSTANTIATE(T)                                                                                   \
  template void topk_init<T>(T*, int64_t*, int64_t*, T*, int64_t, int64_t, cudaStream_t);                      \
  template void topk_tile<T>(const T*, int64_t, int64_t, int64_t, int64_t, double, T*, int64_t*, int64_t*, T*, \
                             cudaStream_t);                                                                    \
  template void topk_finish<T>(const T*, const T*, int64_t, int64_t, double, T*, T*, T*, cudaStream_t);
KDFAST_INSTANTIATE(float)
KDFAST_INSTANTIATE(double)
#undef KDFAST_INSTANTIATE

}  // namespace kdfast::cuda
