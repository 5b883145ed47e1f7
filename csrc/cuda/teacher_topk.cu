// CUDA kernels of teacher top-k labeling (declared in teacher_topk.h); the
// maths and the order of candidates are csrc/cpu/teacher_topk.cpp's: larger
// logit first, ties to the lower class, NaN above every number.
//
// One block per row and tile. The softmax statistics are updated online; then,
// unless the tile's best logit cannot enter a full list, the new list is
// selected in k rounds, each a block-wide search for the best candidate (from
// the tile and the old list) ranking below the previous pick. Simple rather than
// fast: a first version, correct for any k.
#include "teacher_topk.h"

#include <cmath>

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Candidate {
  T logit;
  int64_t index;  // -1: none
};

template <typename T>
__device__ __forceinline__ bool is_nan(T x) {
  return x != x;
}

// a ranks above b (a candidate ranks above "none").
template <typename T>
__device__ __forceinline__ bool ranks_above(const Candidate<T>& a, const Candidate<T>& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  const bool a_nan = is_nan(a.logit), b_nan = is_nan(b.logit);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.index < b.index);
  return a.logit > b.logit || (a.logit == b.logit && a.index < b.index);
}

template <typename T>
__device__ Candidate<T> block_best(Candidate<T> c, Candidate<T>* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Candidate<T> o;
    o.logit = __shfl_xor_sync(0xffffffffu, c.logit, offset);
    o.index = __shfl_xor_sync(0xffffffffu, c.index, offset);
    if (ranks_above(o, c)) c = o;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = c;
  __syncthreads();
  Candidate<T> r = smem[0];
  for (int w = 1; w < kWarps; ++w) {
    if (ranks_above(smem[w], r)) r = smem[w];
  }
  return r;
}

template <typename T>
__device__ T block_sum(T v, T* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r += smem[w];
  return r;
}

template <typename T>
__device__ T block_max(T v, T* smem) {  // NaN wins
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (is_nan(v) || v > o) ? v : o;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = (is_nan(r) || r > smem[w]) ? r : smem[w];
  return r;
}

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }

template <typename T>
__global__ void topk_init_kernel(T* best_logit, int64_t* best_index, int64_t* count, T* stats, int64_t B, int64_t k) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < B * k) {
    best_logit[i] = T(0);
    best_index[i] = -1;
  }
  if (i < B) {
    count[i] = 0;
    stats[i * kNumSoftmaxStats + 0] = -T(INFINITY);
    stats[i * kNumSoftmaxStats + 1] = T(0);
    stats[i * kNumSoftmaxStats + 2] = T(0);
    stats[i * kNumSoftmaxStats + 3] = T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_tile_kernel(const T* x_all, int64_t n, int64_t c0, int64_t k,
                                                             T inv_t, T* best_logit_all, int64_t* best_index_all,
                                                             int64_t* count_all, T* stats_all) {
  __shared__ T smem[kWarps];
  __shared__ Candidate<T> smem_c[kWarps];
  const int64_t row = blockIdx.x;
  const T* x = x_all + row * n;
  T* best_logit = best_logit_all + row * k;
  int64_t* best_index = best_index_all + row * k;
  T* st = stats_all + row * kNumSoftmaxStats;

  // online softmax statistics (SoftmaxStats::update)
  T m = -T(INFINITY);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) m = (is_nan(m) || m > x[j]) ? m : x[j];
  m = block_max(m, smem);
  T max = st[0], sum = st[1], dot = st[2];
  bool has_nan = st[3] != T(0) || is_nan(m);
  if (!has_nan) {
    const T new_max = max < m ? m : max;
    if (new_max != max) {
      if (max == -T(INFINITY)) {
        sum = dot = T(0);
      } else {
        const T delta = (new_max - max) * inv_t, r = d_exp(-delta);
        dot = r * (dot - sum * delta);
        sum = r * sum;
      }
      max = new_max;
    }
    const T shift = max == -T(INFINITY) ? T(0) : max;
    T s = 0, d = 0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const T z = (x[j] - shift) * inv_t;
      const T e = d_exp(z);
      s += e;
      d += e == T(0) ? T(0) : e * z;
    }
    sum += block_sum(s, smem);
    dot += block_sum(d, smem);
  }
  const int64_t count = count_all[row];
  __syncthreads();  // every thread has read the old state
  if (threadIdx.x == 0) {
    st[0] = max;
    st[1] = sum;
    st[2] = dot;
    st[3] = has_nan ? T(1) : T(0);
  }

  // a tile whose best logit cannot enter a full list is skipped (NaN is scanned)
  if (count == k && m < best_logit[k - 1]) return;
  // The old list moves to registers (kMaxOwned entries per thread) before the
  // picks overwrite it in place.
  Candidate<T> owned[kMaxOwned];
  for (int q = 0; q < kMaxOwned; ++q) {
    const int64_t e = threadIdx.x + int64_t(q) * kThreads;
    owned[q] = e < count ? Candidate<T>{best_logit[e], best_index[e]} : Candidate<T>{T(0), -1};
  }
  __syncthreads();
  Candidate<T> prev{T(0), -1};
  int64_t picked = 0;
  for (; picked < k; ++picked) {
    Candidate<T> c{T(0), -1};
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const Candidate<T> cand{x[j], c0 + j};
      if ((prev.index < 0 || ranks_above(prev, cand)) && ranks_above(cand, c)) c = cand;
    }
    for (int q = 0; q < kMaxOwned; ++q) {
      const Candidate<T>& cand = owned[q];
      if (cand.index >= 0 && (prev.index < 0 || ranks_above(prev, cand)) && ranks_above(cand, c)) c = cand;
    }
    c = block_best(c, smem_c);
    if (c.index < 0) break;  // nothing left (the tile and the old list hold fewer than k)
    if (threadIdx.x == 0) {
      best_logit[picked] = c.logit;
      best_index[picked] = c.index;
    }
    prev = c;
  }
  if (threadIdx.x == 0) count_all[row] = picked;
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
    topk_tile_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        x, n, c0, k, acc_t(1) / acc_t(temperature), best_logit, best_index, count, stats);
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
