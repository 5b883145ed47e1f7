// The per-row maths of the loss family on the device, shared by the tile kernels
// (csrc/cuda/loss_tiles.cu: a block of kBlockThreads threads per row) and the
// fused linear kernels (csrc/cuda/fused_linear.cu: a warp per row). It is
// csrc/cpu/loss_math.h's, element for element. A Group is the set of threads
// that work on one row: each strides over the row's classes from its rank, and
// reductions give every thread of the group the same result (xor shuffles, then
// for a block the warps' results folded in warp order), so every thread keeps the
// same copy of the row's running state.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "loss_tiles.h"

namespace kdfast::cuda::row_math {

constexpr int kBlockThreads = 256;

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

// The reduction of v over the block (kBlockThreads threads), returned to every
// thread. Warps reduce by shuffles, then every thread folds the warps' results in
// warp order.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // smem may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kBlockThreads / 32; ++w) r = op(r, smem[w]);
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

// A whole block works on the row; smem: kBlockThreads / 32 values of the reduced type.
template <typename T>
struct BlockGroup {
  static constexpr int kSize = kBlockThreads;
  T* smem;
  __device__ __forceinline__ int rank() const { return threadIdx.x; }
  template <typename Op>
  __device__ __forceinline__ T reduce(T v, Op op) const { return block_reduce(v, op, smem); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

// One warp works on the row (its 32 lanes, all active).
template <typename T>
struct WarpGroup {
  static constexpr int kSize = 32;
  __device__ __forceinline__ int rank() const { return threadIdx.x % 32; }
  template <typename Op>
  __device__ __forceinline__ T reduce(T v, Op op) const {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
};

// Folds the row's logits of classes [c0, c0 + n) into its running state st
// (RowAccumulator::update). f: the student's logits, s: the teacher's or null
// (no teacher terms), lse_w: the row's (max, log-sum) for one_minus_prob weights.
template <typename T, typename Group>
__device__ void accumulate_row(const LossTerms& p, const RowTarget& y, const T* f, const T* s, const T* lse_w,
                               int64_t n, int64_t c0, T* st, const Group& grp) {
  const T inv_t = T(1) / T(p.temperature);
  const bool same_t = p.temperature == 1.0;
  const bool hard = p.hard_weight > 0, soft = p.soft_weight > 0, dbl = p.double_weight > 0;

  if (hard || soft) {
    T m = neg_inf<T>();
    for (int64_t j = grp.rank(); j < n; j += Group::kSize) m = nan_max(m, f[j]);
    m = std_max(st[kMaxF], grp.reduce(m, NanMax()));
    if (m != st[kMaxF]) {
      st[kSumF] *= rescale_factor(st[kMaxF], m);
      st[kSumFT] *= rescale_factor(st[kMaxF], m, inv_t);
      st[kMaxF] = m;
    }
    const T shift = exp_shift(st[kMaxF]);
    T chunk_f = 0;
    if (hard || same_t) {
      T e = 0;
      for (int64_t j = grp.rank(); j < n; j += Group::kSize) e += d_exp(f[j] - shift);
      chunk_f = grp.reduce(e, Sum());
      st[kSumF] += chunk_f;
    }
    if (soft) {
      if (same_t) {
        st[kSumFT] += chunk_f;
      } else {
        T e = 0;
        for (int64_t j = grp.rank(); j < n; j += Group::kSize) e += d_exp((f[j] - shift) * inv_t);
        st[kSumFT] += grp.reduce(e, Sum());
      }
    }
  }
  if (hard) {
    if (grp.rank() == 0) {
      for (int64_t q = 0; q < y.num_positives; ++q) {
        const int64_t c = y.positives[q];
        if (c >= c0 && c < c0 + n) st[kTargetLogit] += f[c - c0];
      }
    }
    if (p.label_smoothing > 0) {
      T sum = 0;
      for (int64_t j = grp.rank(); j < n; j += Group::kSize) sum += f[j];
      st[kSumLogits] += grp.reduce(sum, Sum());
    }
  }
  if ((soft || dbl) && s) {
    T m = neg_inf<T>();
    for (int64_t j = grp.rank(); j < n; j += Group::kSize) m = nan_max(m, s[j]);
    m = std_max(st[kMaxS], grp.reduce(m, NanMax()));
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
      for (int64_t j = grp.rank(); j < n; j += Group::kSize) {
        const T e = d_exp((s[j] - shift) * inv_t);
        sum += e;
        dot += e == T(0) ? T(0) : e * (f[j] - s[j]);
      }
      st[kSumST] += grp.reduce(sum, Sum());
      st[kDotST] += grp.reduce(dot, Sum());
    }
    if (dbl) {  // sum exp(s - max) and sum exp(s - max) f
      T sum = 0, dot = 0;
      for (int64_t j = grp.rank(); j < n; j += Group::kSize) {
        const T e = d_exp(s[j] - shift);
        sum += e;
        dot += e == T(0) ? T(0) : e * f[j];
      }
      st[kSumS] += grp.reduce(sum, Sum());
      st[kDotS] += grp.reduce(dot, Sum());
    }
  }
  if (dbl) {  // LSE(f + log w); log w = 0 without a teacher in the tile
    T m = neg_inf<T>();
    for (int64_t j = grp.rank(); j < n; j += Group::kSize) m = nan_max(m, s ? f[j] + log_weight(p, s[j], lse_w) : f[j]);
    m = std_max(st[kMaxFW], grp.reduce(m, NanMax()));
    if (m != st[kMaxFW]) {
      st[kSumFW] *= rescale_factor(st[kMaxFW], m);
      st[kMaxFW] = m;
    }
    const T shift = exp_shift(st[kMaxFW]);
    T sum = 0;
    for (int64_t j = grp.rank(); j < n; j += Group::kSize) {
      sum += d_exp((s ? f[j] + log_weight(p, s[j], lse_w) : f[j]) - shift);
    }
    st[kSumFW] += grp.reduce(sum, Sum());
  }
}

// grad[j] <- dL/df_j of the row for classes [c0, c0 + n), times its upstream
// gradient scale (loss_math.h's gradient_chunk); st: the row's [kNumRowStats]
// statistics from the forward. grad may be f (each entry is read, then written,
// by one thread).
template <typename T, typename Group>
__device__ void gradient_row(const LossTerms& p, const RowTarget& y, const T* st, const T* lse_w, const T* f,
                             const T* s, T scale, int64_t n, int64_t c0, T* grad, const Group& grp) {
  const T inv_t = T(1) / T(p.temperature);
  const T ch_one = T(p.hard_weight) * scale;
  const T ms = T(y.multiplicity) * scale;
  const T ch = T(p.hard_weight) * ms;
  const T cs = T(p.soft_weight * p.temperature) * ms;
  const T cd = T(p.double_weight) * ms;
  const bool hard = p.hard_weight > 0, soft = p.soft_weight > 0, dbl = p.double_weight > 0;
  const T smooth = hard ? ch * T(p.label_smoothing / double(p.num_classes)) : T(0);
  const T shift_f = exp_shift(st[kStatMaxF]), shift_fw = exp_shift(st[kStatMaxFW]), shift_s = exp_shift(st[kStatMaxS]);
  for (int64_t j = grp.rank(); j < n; j += Group::kSize) {
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
    grp.sync();  // the writes above land before the positives are corrected
    if (grp.rank() == 0) {
      const T at_positive = ch_one * (T(1) - T(p.label_smoothing));
      for (int64_t q = 0; q < y.num_positives; ++q) {
        const int64_t c = y.positives[q];
        if (c >= c0 && c < c0 + n) grad[c - c0] -= at_positive;
      }
    }
  }
}

// Folds the row's teacher logits s of n classes into its running (max, sum of
// exp(s - max)) (loss_math.h's LogSumExp::update).
template <typename T, typename Group>
__device__ void lse_row(const T* s, int64_t n, T& max, T& sum, const Group& grp) {
  T m = neg_inf<T>();
  for (int64_t j = grp.rank(); j < n; j += Group::kSize) m = nan_max(m, s[j]);
  m = std_max(max, grp.reduce(m, NanMax()));
  if (m != max) {
    sum *= rescale_factor(max, m);
    max = m;
  }
  const T shift = exp_shift(max);
  T e = 0;
  for (int64_t j = grp.rank(); j < n; j += Group::kSize) e += d_exp(s[j] - shift);
  sum += grp.reduce(e, Sum());
}

// Folds o, another state of the same row over other classes, into st
// (RowAccumulator::merge).
template <typename T>
__device__ void merge_row_state(const LossTerms& p, T* st, const T* o) {
  const T inv_t = T(1) / T(p.temperature);
  {
    const T m = std_max(st[kMaxF], o[kMaxF]);
    const T a = rescale_factor(st[kMaxF], m), b = rescale_factor(o[kMaxF], m);
    const T aT = rescale_factor(st[kMaxF], m, inv_t), bT = rescale_factor(o[kMaxF], m, inv_t);
    st[kSumF] = st[kSumF] * a + o[kSumF] * b;
    st[kSumFT] = st[kSumFT] * aT + o[kSumFT] * bT;
    st[kMaxF] = m;
  }
  {
    const T m = std_max(st[kMaxS], o[kMaxS]);
    const T a = rescale_factor(st[kMaxS], m), b = rescale_factor(o[kMaxS], m);
    const T aT = rescale_factor(st[kMaxS], m, inv_t), bT = rescale_factor(o[kMaxS], m, inv_t);
    st[kSumS] = st[kSumS] * a + o[kSumS] * b;
    st[kDotS] = st[kDotS] * a + o[kDotS] * b;
    st[kSumST] = st[kSumST] * aT + o[kSumST] * bT;
    st[kDotST] = st[kDotST] * aT + o[kDotST] * bT;
    st[kMaxS] = m;
  }
  {
    const T m = std_max(st[kMaxFW], o[kMaxFW]);
    st[kSumFW] = st[kSumFW] * rescale_factor(st[kMaxFW], m) + o[kSumFW] * rescale_factor(o[kMaxFW], m);
    st[kMaxFW] = m;
  }
  st[kSumLogits] += o[kSumLogits];
  st[kTargetLogit] += o[kTargetLogit];
}

// An empty state: maxima -inf, sums 0.
template <typename T>
__device__ __forceinline__ void empty_row_state(T* st) {
  for (int j = 0; j < kNumRowState; ++j) st[j] = T(0);
  st[kMaxF] = st[kMaxS] = st[kMaxFW] = neg_inf<T>();
}

}  // namespace kdfast::cuda::row_math
