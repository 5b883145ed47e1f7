// CUDA kernels of the loss family over class tiles, callable from plain C++:
// raw pointers, sizes and a stream only (no torch types), so this header and
// loss_tiles.cu build with nvcc alone and csrc/cuda_ops.cpp (the torch glue)
// includes it.
//
// A tile is a [B, n] block of student logits f (and teacher logits s) for the
// classes [c0, c0 + n), in acc_t (float or double), rows n apart. The glue makes
// each tile (a GEMM, or a slice of dense logits) and calls:
//   forward:  init_row_state, then accumulate_tile per tile (online maxima and
//             sums per row, as RowAccumulator in csrc/cpu/loss_math.h), then
//             finish_rows -> per-row losses and the [B, 8] statistics;
//   backward: gradient_tile per tile -> dL/df of the tile, [B, n].
// Tiles run one after another on the stream, so each row's running state is
// read and written by one block at a time: no atomics, and the result does not
// depend on scheduling.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdfast::cuda {

constexpr int kWeightSigmoid = 0;       // w = 1 - sigmoid(a (s - b))
constexpr int kWeightOneMinusProb = 1;  // w = 1 - softmax(s)

// The loss keywords (shared/DESIGN.md section 2), checked by the caller.
struct LossTerms {
  double hard_weight = 1.0, soft_weight = 0.0, double_weight = 0.0;
  double temperature = 1.0;
  int negative_weighting = kWeightSigmoid;
  double negative_scale = 1.0, negative_shift = 0.0;
  double label_smoothing = 0.0;
  int64_t num_classes = 0;
};

// Hard labels on the device: an int target [B] (ignore_index rows skipped), CSR
// positives (indptr [B + 1], indices; rows without positives skipped), or none.
// Class indices outside [0, V) never match a tile, and indptr is clamped to
// [0, num_indices]: bad values (which index_checks.h stops, asynchronously, on
// the same stream) give a wrong loss, never a read out of bounds.
struct Targets {
  const int64_t* target = nullptr;
  const int64_t* indptr = nullptr;
  const int64_t* indices = nullptr;
  int64_t num_indices = 0;  // entries of indices
  int64_t ignore_index = -100;
};

// Per-row statistics, in the order of RowStat in csrc/cpu/loss_math.h.
constexpr int kNumRowStats = 8;
// Per-row running state of the forward (RowAccumulator's members).
constexpr int kNumRowState = 12;

// state [B, kNumRowState] <- empty (maxima -inf, sums 0).
template <typename acc_t>
void init_row_state(acc_t* state, int64_t B, cudaStream_t stream);

// Folds the tile into each row's state. s: teacher logits of the tile or null
// (no teacher terms). lse_w: [B, 2] (max, log-sum) of the teacher's log-partition
// that one_minus_prob weights are computed against, or null for sigmoid weights.
template <typename acc_t>
void accumulate_tile(const LossTerms& terms, const Targets& targets, const acc_t* f, const acc_t* s,
                     const acc_t* lse_w, int64_t B, int64_t n, int64_t c0, acc_t* state, cudaStream_t stream);

// losses [B] and stats [B, kNumRowStats] from the finished state (zeros for
// skipped rows).
template <typename acc_t>
void finish_rows(const LossTerms& terms, const Targets& targets, const acc_t* state, int64_t B, acc_t* losses,
                 acc_t* stats, cudaStream_t stream);

// Log-partition of the teacher logits alone (the one_minus_prob pre-pass):
// lse [B, 2] running (max, sum exp(s - max)), initialised by init_lse and turned
// into (max, log sum) by finish_lse.
template <typename acc_t>
void init_lse(acc_t* lse, int64_t B, cudaStream_t stream);
template <typename acc_t>
void accumulate_lse_tile(const acc_t* s, int64_t B, int64_t n, acc_t* lse, cudaStream_t stream);
template <typename acc_t>
void finish_lse(acc_t* lse, int64_t B, cudaStream_t stream);

// grad [B, n] <- dL/df of the tile times each row's upstream gradient
// grad_losses [B], from the forward's stats; lse_w as for accumulate_tile.
// keep_flag (or null: no filter test): set to 1 when an entry of a row that
// contributes is not below filter_eps * |its upstream gradient|, or is NaN;
// left as it is otherwise (the caller zeroes it before the tile).
template <typename acc_t>
void gradient_tile(const LossTerms& terms, const Targets& targets, const acc_t* stats, const acc_t* lse_w,
                   const acc_t* f, const acc_t* s, const acc_t* grad_losses, int64_t B, int64_t n, int64_t c0,
                   acc_t* grad, double filter_eps, int* keep_flag, cudaStream_t stream);

// A stored top-k teacher as a tile: s [B, n] <- its logits at its classes inside
// [c0, c0 + n), -inf elsewhere (so q = 0 and w = 1 there).
template <typename acc_t>
void topk_teacher_tile(const int64_t* indices, const acc_t* logits, int64_t B, int64_t k, int64_t c0, int64_t n,
                       acc_t* s, cudaStream_t stream);

}  // namespace kdfast::cuda
