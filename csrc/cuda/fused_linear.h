// The fused linear loss on the device in one pass per direction, as Cut
// Cross-Entropy does it: a block computes a tile of logits (kFusedRows rows by
// kFusedClasses classes) with tensor cores (WMMA, bf16/fp16 inputs, float
// accumulators) into shared memory and reduces it there, so no logits, student's
// or teacher's, reach global memory. Raw pointers, sizes and a stream only, as
// loss_tiles.h; csrc/cuda_ops.cpp takes this path for bf16 / fp16 inputs with
// d (and a linear teacher's d_t) fitting (fused_linear_supported), and the
// tile-by-tile cuBLAS path otherwise.
//
//   forward:  fused_linear_forward -> per-row running states (each block folds
//             its classes into its own partial states, then a merge in block
//             order: deterministic), then loss_tiles.h's finish_rows;
//   teacher top-k labeling: fused_teacher_topk -> per-row top-k lists and
//             softmax statistics per class split, merged in split order
//             (teacher_topk.h's topk_merge_splits), then topk_finish;
//   backward: fused_linear_backward -> grad_hidden (float, added to with
//             atomics: its summation order varies from run to run),
//             grad_weight and grad_bias (each class tile's written once, by the
//             block that owns it: deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "loss_tiles.h"
#include "teacher_topk.h"

namespace kdfast::cuda {

constexpr int kFusedRows = 64;      // rows of a logit tile
constexpr int kFusedClasses = 128;  // classes of a logit tile
constexpr int kFusedMaxDim = 128;   // the student's d the fused kernels take
constexpr int kFusedTeacherChunk = 64;  // a linear teacher's d_t, staged in chunks of this many (float: half)

// The dtype of hidden, weight (and teacher): float runs its products in tf32
// (cuda_ops.cpp takes this path for float only where torch allows TF32).
enum class FusedInput { BFloat16, Float16, Float32 };
enum class FusedTeacher { None, Dense, Linear, TopK };

struct FusedLinearArgs {
  FusedInput input = FusedInput::BFloat16;
  int64_t B = 0, V = 0, d = 0;
  const void* hidden = nullptr;  // [B, d], row-major, input dtype
  const void* weight = nullptr;  // [V, d]
  const float* bias = nullptr;   // [V] or null
  FusedTeacher teacher = FusedTeacher::None;
  const void* teacher_logits = nullptr;  // Dense: [B, V], input dtype
  int64_t d_t = 0;                       // Linear: hidden [B, d_t], weight [V, d_t], bias [V] or null
  const void* teacher_hidden = nullptr;
  const void* teacher_weight = nullptr;
  const float* teacher_bias = nullptr;
  int64_t k = 0;  // TopK: indices and logits [B, k]
  const int64_t* topk_indices = nullptr;
  const float* topk_logits = nullptr;
  const float* lse_w = nullptr;  // [B, 2] (max, log-sum) for one_minus_prob weights, or null
};

// Whether the fused kernels take these inputs, forward and backward alike:
// d <= kFusedMaxDim and the backward block's shared memory (the larger: its
// gradient tile) within 160 KiB. One answer for both directions, since a
// forward fused over a tiled backward would meet its log-partitions with other
// logits there (float: cuBLAS's tf32 products, not the kernels'). (The fp16
// backward scales each row block's dL/df tile by a power of two before rounding
// it, so fp16's range keeps its small entries.)
bool fused_linear_supported(const FusedLinearArgs& args);

// The number of class splits of the forward for these sizes: each split (a
// column of blocks, one per group of rows) has its own partial states
// [B, kNumRowState], together at most 16 MiB. max_splits > 0 caps them (the
// glue's KDFAST_CUDA_MAX_SPLITS, for tests: several class tiles per split).
int64_t fused_forward_splits(int64_t B, int64_t V, int64_t max_splits = 0);

// partial [splits, B, kNumRowState] (scratch) -> state [B, kNumRowState], the
// running state of every row over all classes.
void fused_linear_forward(const LossTerms& terms, const Targets& targets, const FusedLinearArgs& args,
                          int64_t splits, float* partial, float* state, cudaStream_t stream);

// lse [B, 2] <- (max, log sum exp(s - max)) of a dense or linear teacher's
// logits s (the log-partition one_minus_prob weights take), computed as the
// forward computes them; partial [splits, B, 2] scratch.
void fused_teacher_lse(const FusedLinearArgs& args, int64_t splits, float* partial, float* lse, cudaStream_t stream);

// The top-k pass's per-split states (scratch, allocated by the caller for
// fused_topk_splits splits): logit, index [splits, B, k], count [splits, B] and
// stats [splits, B, kNumSoftmaxStats]; k and inv_t are set by fused_teacher_topk.
struct FusedTopkPartial {
  float* logit = nullptr;
  int64_t* index = nullptr;
  int64_t* count = nullptr;
  float* stats = nullptr;
  int64_t k = 0;
  float inv_t = 1.0f;
};

// Whether fused_teacher_topk takes these inputs: the logits are a linear
// teacher's (teacher_hidden [B, d_t] teacher_weight^T + teacher_bias, any d_t;
// args.d unused), 1 <= k <= kMaxTopK.
bool fused_topk_supported(const FusedLinearArgs& args, int64_t k);

// The number of class splits of the top-k pass: its partial states together at
// most 64 MiB (max_splits as fused_forward_splits').
int64_t fused_topk_splits(int64_t B, int64_t V, int64_t k, int64_t max_splits = 0);

// best_logit, best_index [B, k] <- each row's k largest teacher logits and their
// classes (teacher_topk.cu's order), stats [B, kNumSoftmaxStats] <- the softmax
// statistics of logits / temperature, for topk_finish.
void fused_teacher_topk(const FusedLinearArgs& args, int64_t k, double temperature, int64_t splits,
                        FusedTopkPartial partial, float* best_logit, int64_t* best_index, float* stats,
                        cudaStream_t stream);

// grad_hidden [B, d] float, zeroed by the caller, += dL/dhidden; grad_weight
// [V, d] (input dtype) and grad_bias [V] (float, or null) <- dL/dweight, dL/dbias.
// stats [B, kNumRowStats] from the forward, grad_losses [B]. filter_eps > 0:
// within each block's kFusedRows rows, a group of filter_group classes (groups
// counted from class 0) whose every |dL/df| entry is at most filter_eps times its
// row's |upstream gradient| adds nothing (the CPU's gradient filter, per group of
// rows as well as of classes).
void fused_linear_backward(const LossTerms& terms, const Targets& targets, const FusedLinearArgs& args,
                           const float* stats, const float* grad_losses, double filter_eps, int64_t filter_group,
                           float* grad_hidden, void* grad_weight, float* grad_bias, cudaStream_t stream);

}  // namespace kdfast::cuda
