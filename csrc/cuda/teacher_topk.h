// CUDA kernels of teacher top-k labeling over class tiles (plain C++ interface,
// as loss_tiles.h). The glue makes each tile's logits x [B, n] (classes
// [c0, c0 + n)) with a GEMM and calls topk_tile; per row the running state is
// the k best (logit, class) pairs so far, best first, and the online softmax
// statistics of x / T; topk_finish writes the op's outputs. The fused kernel
// (fused_linear.h) keeps such states per class split and topk_merge_splits
// merges them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdfast::cuda {

// The largest k the kernels take: merging a chunk of candidates into a row's
// list moves up to k entries, so the cost of a row grows as k^2 / 32.
constexpr int64_t kMaxTopK = 2048;

// Per-row softmax statistics: max x, sum exp((x - max)/T), sum exp(..) (x - max)/T, has-NaN.
constexpr int kNumSoftmaxStats = 4;

// best_logit [B, k], best_index [B, k], count [B] (entries filled) and stats
// [B, kNumSoftmaxStats] <- empty.
template <typename acc_t>
void topk_init(acc_t* best_logit, int64_t* best_index, int64_t* count, acc_t* stats, int64_t B, int64_t k,
               cudaStream_t stream);

template <typename acc_t>
void topk_tile(const acc_t* x, int64_t B, int64_t n, int64_t c0, int64_t k, double temperature, acc_t* best_logit,
               int64_t* best_index, int64_t* count, acc_t* stats, cudaStream_t stream);

// The per-split states [splits, B, k] (logits, indices), [splits, B] (counts)
// and [splits, B, kNumSoftmaxStats] merged in split order into best_logit,
// best_index [B, k] and stats [B, kNumSoftmaxStats] (the rows' lists full).
void topk_merge_splits(const float* part_logit, const int64_t* part_index, const int64_t* part_count,
                       const float* part_stats, int64_t splits, int64_t B, int64_t k, double temperature,
                       float* best_logit, int64_t* best_index, float* stats, cudaStream_t stream);

// lse [B], entropy [B], covered [B] of softmax(x / T) from the state (the top-k
// themselves are best_logit / best_index, already in output order).
template <typename acc_t>
void topk_finish(const acc_t* best_logit, const acc_t* stats, int64_t B, int64_t k, double temperature, acc_t* lse,
                 acc_t* entropy, acc_t* covered, cudaStream_t stream);

}  // namespace kdfast::cuda
