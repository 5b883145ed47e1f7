// CUDA kernels of the loss family over class tiles (declared in loss_tiles.h).
// The maths is csrc/cpu/loss_math.h's, element for element: one block per row,
// each thread strides over the tile's classes, block reductions in a fixed
// order (so results are deterministic). Every thread of a block keeps the same
// copy of the row's running state in registers; thread 0 writes it back.
#include "loss_tiles.h"

#include <cmath>

#include "row_math.cuh"

namespace kdfast::cuda {
namespace {

using namespace row_math;
constexpr int kThreads = kBlockThreads;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void init_row_state_kernel(T* state, int64_t B) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  empty_row_state(state + i * kNumRowState);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) accumulate_tile_kernel(LossTerms p, Targets targets, const T* f_all,
                                                                   const T* s_all, const T* lse_w_all, int64_t n,
                                                                   int64_t c0, T* state) {
  __shared__ T smem[kWarps];
  const int64_t row = blockIdx.x;
  RowTarget y;
  if (!row_target(targets, row, y)) return;  // the whole block leaves together
  const T* f = f_all + row * n;
  const T* s = s_all ? s_all + row * n : nullptr;
  const T* lse_w = lse_w_all ? lse_w_all + 2 * row : nullptr;
  T st[kNumRowState];
  for (int j = 0; j < kNumRowState; ++j) st[j] = state[row * kNumRowState + j];
  accumulate_row(p, y, f, s, lse_w, n, c0, st, BlockGroup<T>{smem});
  if (threadIdx.x == 0) {
    for (int j = 0; j < kNumRowState; ++j) state[row * kNumRowState + j] = st[j];
  }
}

// One thread per row: RowAccumulator::finish_stats and ::loss.
template <typename T>
__global__ void finish_rows_kernel(LossTerms p, Targets targets, const T* state, int64_t B, T* losses, T* stats) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= B) return;
  T* out = stats + row * kNumRowStats;
  RowTarget y;
  if (!row_target(targets, row, y)) {
    for (int j = 0; j < kNumRowStats; ++j) out[j] = T(0);
    losses[row] = T(0);
    return;
  }
  const T* st = state + row * kNumRowState;
  out[kStatMaxF] = st[kMaxF];
  out[kStatLogSumF] = d_log(st[kSumF]);
  out[kStatLogSumFT] = d_log(st[kSumFT]);
  out[kStatMaxFW] = st[kMaxFW];
  out[kStatLogSumFW] = d_log(st[kSumFW]);
  out[kStatMaxS] = st[kMaxS];
  out[kStatLogSumST] = d_log(st[kSumST]);
  out[kStatLogSumS] = d_log(st[kSumS]);
  const T T_ = T(p.temperature);
  const T m = T(y.multiplicity);
  T total = 0;
  if (p.hard_weight > 0) {
    const T eps = T(p.label_smoothing);
    T hard = (m * out[kStatMaxF] - (T(1) - eps) * st[kTargetLogit]) + m * out[kStatLogSumF];
    if (eps > 0) hard -= m * eps / T(p.num_classes) * st[kSumLogits];
    total += T(p.hard_weight) * hard;
  }
  if (p.soft_weight > 0) {
    const T kl = (out[kStatMaxF] - out[kStatMaxS]) / T_ + (out[kStatLogSumFT] - out[kStatLogSumST]) -
                 st[kDotST] / st[kSumST] / T_;
    total += T(p.soft_weight) * T_ * T_ * m * kl;
  }
  if (p.double_weight > 0) {
    const T lse_fw = out[kStatMaxFW] + out[kStatLogSumFW];
    total += T(p.double_weight) * m * (lse_fw - st[kDotS] / st[kSumS]);
  }
  losses[row] = total;
}

template <typename T>
__global__ void init_lse_kernel(T* lse, int64_t B) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  lse[2 * i] = neg_inf<T>();
  lse[2 * i + 1] = T(0);
}

// loss_math.h's LogSumExp::update for one row of the tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) accumulate_lse_tile_kernel(const T* s_all, int64_t n, T* lse) {
  __shared__ T smem[kWarps];
  const int64_t row = blockIdx.x;
  const T* s = s_all + row * n;
  T max = lse[2 * row], sum = lse[2 * row + 1];
  lse_row(s, n, max, sum, BlockGroup<T>{smem});
  if (threadIdx.x == 0) {
    lse[2 * row] = max;
    lse[2 * row + 1] = sum;
  }
}

template <typename T>
__global__ void finish_lse_kernel(T* lse, int64_t B) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < B) lse[2 * i + 1] = d_log(lse[2 * i + 1]);
}

// loss_math.h's gradient_chunk for one row of the tile. With keep_flag, a row
// with an entry above filter_eps * |its upstream gradient| (or NaN) sets it to 1:
// fused_linear_loss.cpp's filter test, on the finished entries.
template <typename T>
__global__ void __launch_bounds__(kThreads) gradient_tile_kernel(LossTerms p, Targets targets, const T* stats_all,
                                                                 const T* lse_w_all, const T* f_all, const T* s_all,
                                                                 const T* grad_losses, int64_t n, int64_t c0,
                                                                 T* grad_all, double filter_eps, int* keep_flag) {
  const int64_t row = blockIdx.x;
  T* grad = grad_all + row * n;
  RowTarget y;
  if (!row_target(targets, row, y)) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) grad[j] = T(0);
    return;
  }
  const T* f = f_all + row * n;
  const T* s = s_all ? s_all + row * n : nullptr;
  const T* lse_w = lse_w_all ? lse_w_all + 2 * row : nullptr;
  const T* st = stats_all + row * kNumRowStats;
  const T scale = grad_losses[row];
  __shared__ T smem[kWarps];
  gradient_row(p, y, st, lse_w, f, s, scale, n, c0, grad, BlockGroup<T>{smem});
  if (keep_flag) {
    __syncthreads();  // thread 0's corrections land before the test
    const T limit = T(filter_eps) * fabs(scale);
    bool keep = false;
    for (int64_t j = threadIdx.x; j < n && !keep; j += kThreads) keep = !(fabs(grad[j]) <= limit);  // NaN keeps
    if (__syncthreads_or(keep) && threadIdx.x == 0) atomicExch(keep_flag, 1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_teacher_tile_kernel(const int64_t* indices, const T* logits,
                                                                     int64_t k, int64_t c0, int64_t n, T* s_all) {
  const int64_t row = blockIdx.x;
  T* s = s_all + row * n;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) s[j] = neg_inf<T>();
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t c = indices[row * k + j];
    if (c >= c0 && c < c0 + n) s[c - c0] = logits[row * k + j];
  }
}

unsigned row_blocks(int64_t B) { return static_cast<unsigned>((B + kThreads - 1) / kThreads); }

}  // namespace

template <typename acc_t>
void init_row_state(acc_t* state, int64_t B, cudaStream_t stream) {
  if (B > 0) init_row_state_kernel<acc_t><<<row_blocks(B), kThreads, 0, stream>>>(state, B);
}

template <typename acc_t>
void accumulate_tile(const LossTerms& terms, const Targets& targets, const acc_t* f, const acc_t* s,
                     const acc_t* lse_w, int64_t B, int64_t n, int64_t c0, acc_t* state, cudaStream_t stream) {
  if (B > 0 && n > 0) {
    accumulate_tile_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(terms, targets, f, s, lse_w, n,
                                                                                      c0, state);
  }
}

template <typename acc_t>
void finish_rows(const LossTerms& terms, const Targets& targets, const acc_t* state, int64_t B, acc_t* losses,
                 acc_t* stats, cudaStream_t stream) {
  if (B > 0) finish_rows_kernel<acc_t><<<row_blocks(B), kThreads, 0, stream>>>(terms, targets, state, B, losses, stats);
}

template <typename acc_t>
void init_lse(acc_t* lse, int64_t B, cudaStream_t stream) {
  if (B > 0) init_lse_kernel<acc_t><<<row_blocks(B), kThreads, 0, stream>>>(lse, B);
}

template <typename acc_t>
void accumulate_lse_tile(const acc_t* s, int64_t B, int64_t n, acc_t* lse, cudaStream_t stream) {
  if (B > 0 && n > 0) accumulate_lse_tile_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(s, n, lse);
}

template <typename acc_t>
void finish_lse(acc_t* lse, int64_t B, cudaStream_t stream) {
  if (B > 0) finish_lse_kernel<acc_t><<<row_blocks(B), kThreads, 0, stream>>>(lse, B);
}

template <typename acc_t>
void gradient_tile(const LossTerms& terms, const Targets& targets, const acc_t* stats, const acc_t* lse_w,
                   const acc_t* f, const acc_t* s, const acc_t* grad_losses, int64_t B, int64_t n, int64_t c0,
                   acc_t* grad, double filter_eps, int* keep_flag, cudaStream_t stream) {
  if (B > 0 && n > 0) {
    gradient_tile_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        terms, targets, stats, lse_w, f, s, grad_losses, n, c0, grad, filter_eps, keep_flag);
  }
}

template <typename acc_t>
void topk_teacher_tile(const int64_t* indices, const acc_t* logits, int64_t B, int64_t k, int64_t c0, int64_t n,
                       acc_t* s, cudaStream_t stream) {
  if (B > 0 && n > 0) {
    topk_teacher_tile_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(indices, logits, k, c0, n, s);
  }
}

#define KDFAST_INSTANTIATE(T)                                                                                    \
  template void init_row_state<T>(T*, int64_t, cudaStream_t);                                                   \
  template void accumulate_tile<T>(const LossTerms&, const Targets&, const T*, const T*, const T*, int64_t,     \
                                   int64_t, int64_t, T*, cudaStream_t);                                         \
  template void finish_rows<T>(const LossTerms&, const Targets&, const T*, int64_t, T*, T*, cudaStream_t);      \
  template void init_lse<T>(T*, int64_t, cudaStream_t);                                                         \
  template void accumulate_lse_tile<T>(const T*, int64_t, int64_t, T*, cudaStream_t);                           \
  template void finish_lse<T>(T*, int64_t, cudaStream_t);                                                       \
  template void gradient_tile<T>(const LossTerms&, const Targets&, const T*, const T*, const T*, const T*,      \
                                 const T*, int64_t, int64_t, int64_t, T*, double, int*, cudaStream_t);          \
  template void topk_teacher_tile<T>(const int64_t*, const T*, int64_t, int64_t, int64_t, int64_t, T*,          \
                                     cudaStream_t);
KDFAST_INSTANTIATE(float)
KDFAST_INSTANTIATE(double)
#undef KDFAST_INSTANTIATE

}  // namespace kdfast::cuda
