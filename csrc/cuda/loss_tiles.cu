// CUDA kernels of the loss family over class tiles (declared in loss_tiles.h).
// The maths is csrc/cpu/loss_math.h's, element for element: one block per row,
// each thread strides over the tile's classes, block reductions in a fixed
// order (so results are deterministic). Every thread of a block keeps the same
// copy of the row's running state in registers; thread 0 writes it back.
#include "loss_tiles.h"

#include <cmath>

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -T(INFINITY);
}

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float d_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double d_expm1(double x) { return expm1(x); }

// std::max's semantics (a NaN in b is dropped), as the CPU code combines a
// running maximum with a chunk's.
template <typename T>
__device__ __forceinline__ T std_max(T a, T b) {
  return a < b ? b : a;
}
// A maximum that keeps NaN, as at::vec::maximum inside a chunk.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// exp(old_max - new_max) (times 1/T); 0 while nothing was summed (old = -inf).
template <typename T>
__device__ __forceinline__ T rescale_factor(T old_max, T new_max, T inv_t = T(1)) {
  return old_max == neg_inf<T>() ? T(0) : d_exp((old_max - new_max) * inv_t);
}
// The shift subtracted before exponentiating (0 when the maximum is -inf).
template <typename T>
__device__ __forceinline__ T exp_shift(T max_value) {
  return max_value == neg_inf<T>() ? T(0) : max_value;
}

// The reduction of v over the block, returned to every thread. Warps reduce by
// shuffles, then every thread folds the warps' results in warp order.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // smem may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct NanMax {
  template <typename T>
  __device__ T operator()(T a, T b) const { return nan_max(a, b); }
};

// Row i's positives; false when the row contributes nothing.
struct RowTarget {
  const int64_t* positives = nullptr;
  int64_t num_positives = 0;
  int64_t multiplicity = 1;
};

__device__ __forceinline__ bool row_target(const Targets& t, int64_t i, RowTarget& out) {
  if (t.indptr) {
    const int64_t begin = min(max(t.indptr[i], int64_t(0)), t.num_indices);
    const int64_t end = min(max(t.indptr[i + 1], begin), t.num_indices);
    out.positives = t.indices + begin;
    out.num_positives = end - begin;
    out.multiplicity = end - begin;
    return end > begin;
  }
  if (t.target) {
    out.positives = t.target + i;
    out.num_positives = 1;
    out.multiplicity = 1;
    return t.target[i] != t.ignore_index;
  }
  return true;
}

// log w of double distillation for a teacher logit s (loss_math.h's
// log_negative_weights); lse_w: the row's (max, log-sum) for one_minus_prob.
template <typename T>
__device__ __forceinline__ T log_weight(const LossTerms& p, T s, const T* lse_w) {
  if (p.negative_weighting == kWeightSigmoid) {
    const T z = T(p.negative_scale) * (s - T(p.negative_shift));
    return -(std_max(z, T(0)) + d_log1p(d_exp(-fabs(z))));
  }
  const T x0 = (s - exp_shift(lse_w[0])) - lse_w[1];
  const T x = (x0 < T(0) || x0 != x0) ? x0 : T(0);  // min(x0, 0) keeping NaN, as at::vec::minimum
  return x > -T(0.6931471805599453) ? d_log(-d_expm1(x)) : d_log1p(-d_exp(x));
}

// Running state of a row, RowAccumulator's members in this order.
enum : int {
  kMaxF = 0, kMaxS, kMaxFW, kSumF, kSumFT, kSumFW, kSumST, kDotST, kSumS, kDotS, kSumLogits, kTargetLogit
};
// RowStat order (loss_math.h).
enum : int { kStatMaxF = 0, kStatLogSumF, kStatLogSumFT, kStatMaxFW, kStatLogSumFW, kStatMaxS, kStatLogSumST, kStatLogSumS };

template <typename T>
__global__ void init_row_state_kernel(T* state, int64_t B) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  T* st = state + i * kNumRowState;
  for (int j = 0; j < kNumRowState; ++j) st[j] = T(0);
  st[kMaxF] = st[kMaxS] = st[kMaxFW] = neg_inf<T>();
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
  const T inv_t = T(1) / T(p.temperature);
  const bool same_t = p.temperature == 1.0;
  const bool hard = p.hard_weight > 0, soft = p.soft_weight > 0, dbl = p.double_weight > 0;

  if (hard || soft) {
    T m = neg_inf<T>();
    for (int64_t j = threadIdx.x; j < n; j += kThreads) m = nan_max(m, f[j]);
    m = std_max(st[kMaxF], block_reduce(m, NanMax(), smem));
    if (m != st[kMaxF]) {
      st[kSumF] *= rescale_factor(st[kMaxF], m);
      st[kSumFT] *= rescale_factor(st[kMaxF], m, inv_t);
      st[kMaxF] = m;
    }
    const T shift = exp_shift(st[kMaxF]);
    T chunk_f = 0;
    if (hard || same_t) {
      T e = 0;
      for (int64_t j = threadIdx.x; j < n; j += kThreads) e += d_exp(f[j] - shift);
      chunk_f = block_reduce(e, Sum(), smem);
      st[kSumF] += chunk_f;
    }
    if (soft) {
      if (same_t) {
        st[kSumFT] += chunk_f;
      } else {
        T e = 0;
        for (int64_t j = threadIdx.x; j < n; j += kThreads) e += d_exp((f[j] - shift) * inv_t);
        st[kSumFT] += block_reduce(e, Sum(), smem);
      }
    }
  }
  if (hard) {
    if (threadIdx.x == 0) {
      for (int64_t q = 0; q < y.num_positives; ++q) {
        const int64_t c = y.positives[q];
        if (c >= c0 && c < c0 + n) st[kTargetLogit] += f[c - c0];
      }
    }
    if (p.label_smoothing > 0) {
      T sum = 0;
      for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += f[j];
      st[kSumLogits] += block_reduce(sum, Sum(), smem);
    }
  }
  if ((soft || dbl) && s) {
    T m = neg_inf<T>();
    for (int64_t j = threadIdx.x; j < n; j += kThreads) m = nan_max(m, s[j]);
    m = std_max(st[kMaxS], block_reduce(m, NanMax(), smem));
    if (m != st[kMaxS]) {
      const T r1 = rescale_factor(st[kMaxS], m), rT = rescale_factor(st[kMaxS], m, inv_t);
      st[kSumS] *= r1;
      st[kDotS] *= r1;
      st[kSumST] *= rT;
      st[kDotST] *= rT;
      st[kMaxS] = m;
    }
    const T shift = exp_shift(st[kMaxS]);
    if (soft) {  // sum exp((s - max)/T) and sum exp((s - max)/T) (f - s), 0 where the exp is 0
      T sum = 0, dot = 0;
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const T e = d_exp((s[j] - shift) * inv_t);
        sum += e;
        dot += e == T(0) ? T(0) : e * (f[j] - s[j]);
      }
      st[kSumST] += block_reduce(sum, Sum(), smem);
      st[kDotST] += block_reduce(dot, Sum(), smem);
    }
    if (dbl) {  // sum exp(s - max) and sum exp(s - max) f
      T sum = 0, dot = 0;
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const T e = d_exp(s[j] - shift);
        sum += e;
        dot += e == T(0) ? T(0) : e * f[j];
      }
      st[kSumS] += block_reduce(sum, Sum(), smem);
      st[kDotS] += block_reduce(dot, Sum(), smem);
    }
  }
  if (dbl) {  // LSE(f + log w); log w = 0 without a teacher in the tile
    T m = neg_inf<T>();
    for (int64_t j = threadIdx.x; j < n; j += kThreads) m = nan_max(m, s ? f[j] + log_weight(p, s[j], lse_w) : f[j]);
    m = std_max(st[kMaxFW], block_reduce(m, NanMax(), smem));
    if (m != st[kMaxFW]) {
      st[kSumFW] *= rescale_factor(st[kMaxFW], m);
      st[kMaxFW] = m;
    }
    const T shift = exp_shift(st[kMaxFW]);
    T sum = 0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      sum += d_exp((s ? f[j] + log_weight(p, s[j], lse_w) : f[j]) - shift);
    }
    st[kSumFW] += block_reduce(sum, Sum(), smem);
  }
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
  T m = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < n; j += kThreads) m = nan_max(m, s[j]);
  m = std_max(max, block_reduce(m, NanMax(), smem));
  if (m != max) {
    sum *= rescale_factor(max, m);
    max = m;
  }
  const T shift = exp_shift(max);
  T e = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) e += d_exp(s[j] - shift);
  sum += block_reduce(e, Sum(), smem);
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
  const T inv_t = T(1) / T(p.temperature);
  const T ch_one = T(p.hard_weight) * scale;
  const T ms = T(y.multiplicity) * scale;
  const T ch = T(p.hard_weight) * ms;
  const T cs = T(p.soft_weight * p.temperature) * ms;
  const T cd = T(p.double_weight) * ms;
  const bool hard = p.hard_weight > 0, soft = p.soft_weight > 0, dbl = p.double_weight > 0;
  const T smooth = hard ? ch * T(p.label_smoothing / double(p.num_classes)) : T(0);
  const T shift_f = exp_shift(st[kStatMaxF]), shift_fw = exp_shift(st[kStatMaxFW]), shift_s = exp_shift(st[kStatMaxS]);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const T fj = f[j];
    T g = 0;
    if (hard) g = ch * d_exp((fj - shift_f) - st[kStatLogSumF]) - smooth;
    if (soft) {
      T q = d_exp((fj - shift_f) * inv_t - st[kStatLogSumFT]);
      if (s) q -= d_exp((s[j] - shift_s) * inv_t - st[kStatLogSumST]);
      g += cs * q;
    }
    if (dbl) {
      T q = d_exp((s ? fj + log_weight(p, s[j], lse_w) : fj) - shift_fw - st[kStatLogSumFW]);
      if (s) q -= d_exp((s[j] - shift_s) - st[kStatLogSumS]);
      g += cd * q;
    }
    grad[j] = g;
  }
  if (hard) {
    __syncthreads();  // the writes above land before the positives are corrected
    if (threadIdx.x == 0) {
      const T at_positive = ch_one * (T(1) - T(p.label_smoothing));
      for (int64_t q = 0; q < y.num_positives; ++q) {
        const int64_t c = y.positives[q];
        if (c >= c0 && c < c0 + n) grad[c - c0] -= at_positive;
      }
    }
  }
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
