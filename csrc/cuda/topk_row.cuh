// Per-row maths of teacher top-k labeling, done by one warp per row: the
// running top-k list of (logit, class) pairs and the online softmax statistics
// of logit / T. Shared by the tile kernels of teacher_topk.cu and the fused
// kernel of fused_linear.cu; the order is csrc/cpu/teacher_topk.cpp's: larger
// logit first, ties to the lower class, NaN above every number.
//
// A row's list sits in memory (global or shared), best first. New candidates
// come 32 at a time, one per lane; only those that beat the list's last entry
// (once the list is full) take part, so once the list has settled most chunks
// cost one compare and a ballot. A chunk that has some is sorted in registers
// (bitonic, by shuffles) and merged into the list in place.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "row_math.cuh"

namespace kdfast::cuda::topk_row {

using row_math::d_exp;
using row_math::d_log;

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane() { return threadIdx.x % 32; }

template <typename T>
__device__ __forceinline__ bool is_nan(T x) {
  return x != x;
}

template <typename T>
struct Candidate {
  T logit;
  int64_t index;  // -1: none
};

template <typename T>
__device__ __forceinline__ Candidate<T> no_candidate() {
  return Candidate<T>{T(0), -1};
}

// a ranks above b (every candidate ranks above "none").
template <typename T>
__device__ __forceinline__ bool ranks_above(const Candidate<T>& a, const Candidate<T>& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  const bool a_nan = is_nan(a.logit), b_nan = is_nan(b.logit);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.index < b.index);
  return a.logit > b.logit || (a.logit == b.logit && a.index < b.index);
}

template <typename T>
__device__ __forceinline__ Candidate<T> shfl_xor(const Candidate<T>& c, int lane_mask) {
  return Candidate<T>{__shfl_xor_sync(kFullMask, c.logit, lane_mask), __shfl_xor_sync(kFullMask, c.index, lane_mask)};
}

template <typename T>
__device__ __forceinline__ Candidate<T> shfl(const Candidate<T>& c, int src_lane) {
  return Candidate<T>{__shfl_sync(kFullMask, c.logit, src_lane), __shfl_sync(kFullMask, c.index, src_lane)};
}

// The warp's 32 candidates sorted, best in lane 0 and "none" last (a bitonic sort).
template <typename T>
__device__ Candidate<T> warp_sort(Candidate<T> c) {
  for (int size = 2; size <= 32; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const Candidate<T> o = shfl_xor(c, stride);
      // the lower lane of a pair keeps the better one where its run goes best first
      const bool keep_better = ((lane() & stride) == 0) == ((lane() & size) == 0);
      if (ranks_above(o, c) == keep_better) c = o;
    }
  }
  return c;
}

// A row's list: count entries (known to the caller), best first, at most k.
template <typename T>
struct RowList {
  T* logit;
  int64_t* index;
  int64_t k;
  __device__ Candidate<T> at(int64_t e) const { return Candidate<T>{logit[e], index[e]}; }
};

// The number of the list's first count entries that rank above x (binary search, one lane).
template <typename T>
__device__ int64_t rank_in_list(const RowList<T>& list, int64_t count, const Candidate<T>& x) {
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (ranks_above(list.at(mid), x)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The number of the warp's sorted candidates (the first num valid) that rank above
// this lane's x; every lane calls it.
template <typename T>
__device__ int rank_in_warp(const Candidate<T>& sorted, int num, const Candidate<T>& x) {
  int rank = 0;
  for (int step = 32; step > 0; step >>= 1) {
    const int probe = rank + step - 1;
    const Candidate<T> o = shfl(sorted, probe & 31);
    if (probe < num && ranks_above(o, x)) rank += step;
  }
  return rank;
}

// The warp's candidates (one per lane, or none) merged into the list's count
// entries; returns the new count. Every lane calls it with the same count.
template <typename T>
__device__ int64_t warp_merge(Candidate<T> c, const RowList<T>& list, int64_t count) {
  c = warp_sort(c);
  const int num = __popc(__ballot_sync(kFullMask, c.index >= 0));
  if (num == 0) return count;
  // a candidate's place: its rank in the batch plus the list entries above it
  const int64_t place = c.index >= 0 ? lane() + rank_in_list(list, count, c) : list.k;
  const int64_t first = __shfl_sync(kFullMask, place, 0);  // the entries above the best candidate stay
  __syncwarp();  // the searches are done before the list moves
  // each entry from first on moves down by the number of candidates above it:
  // back to front, 32 at a time, so that no entry is overwritten before it is read
  for (int64_t base = count > first ? first + (count - 1 - first) / 32 * 32 : first - 32; base >= first;
       base -= 32) {
    const int64_t e = base + lane();
    const Candidate<T> x = e < count ? list.at(e) : no_candidate<T>();
    const int64_t to = e + rank_in_warp(c, num, x);
    __syncwarp();  // the chunk is read
    if (e < count && to < list.k) {
      list.logit[to] = x.logit;
      list.index[to] = x.index;
    }
    __syncwarp();
  }
  if (c.index >= 0 && place < list.k) {
    list.logit[place] = c.logit;
    list.index[place] = c.index;
  }
  __syncwarp();  // the list is whole again for every lane
  return count + num < list.k ? count + num : list.k;
}

// Candidates candidate(j), j in [0, n), merged into the list's count entries;
// returns the new count. sorted_source: the candidates come best first (another
// list), so the first chunk with none to enter ends the scan. Every lane calls it.
template <typename T, typename CandidateAt>
__device__ int64_t warp_select(int64_t n, const CandidateAt& candidate, const RowList<T>& list, int64_t count,
                               bool sorted_source = false) {
  // the entry a candidate has to beat once the list is full
  Candidate<T> bar = count == list.k ? list.at(list.k - 1) : no_candidate<T>();
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t j = j0 + lane();
    Candidate<T> c = j < n ? candidate(j) : no_candidate<T>();
    if (count == list.k && !ranks_above(c, bar)) c.index = -1;
    if (__ballot_sync(kFullMask, c.index >= 0) == 0) {
      if (sorted_source) break;
      continue;
    }
    count = warp_merge(c, list, count);
    if (count == list.k) bar = list.at(list.k - 1);
  }
  return count;
}

// The online softmax statistics of x / T over the classes seen so far: max x,
// sum exp((x - max) / T), sum exp(z) z with z = (x - max) / T, and whether a
// NaN was seen (then the sums stop).
template <typename T>
struct SoftmaxStats {
  T max, sum, dot;
  bool nan;
};

template <typename T>
__device__ __forceinline__ SoftmaxStats<T> empty_stats() {
  return SoftmaxStats<T>{-T(INFINITY), T(0), T(0), false};
}

// st <- st and o together (each relative to its own max).
template <typename T>
__device__ void merge_stats(SoftmaxStats<T>& st, const SoftmaxStats<T>& o, T inv_t) {
  st.nan = st.nan || o.nan;
  if (st.nan || o.max == -T(INFINITY)) return;  // o adds nothing (a -inf max: o's sum is 0)
  if (st.max == -T(INFINITY)) {
    st = o;
    return;
  }
  const T max = row_math::std_max(st.max, o.max);
  // rescaled to the new max: sum' = r sum, dot' = r (dot - sum delta), delta = (max - old) / T
  auto rescaled = [&](const SoftmaxStats<T>& a, T& sum, T& dot) {
    if (a.max == max) {
      sum = a.sum;
      dot = a.dot;
      return;
    }
    const T delta = (max - a.max) * inv_t, r = row_math::rescale_factor(a.max, max, inv_t);
    sum = r * a.sum;
    dot = r * (a.dot - a.sum * delta);
  };
  T s1, d1, s2, d2;
  rescaled(st, s1, d1);
  rescaled(o, s2, d2);
  st.max = max;
  st.sum = s1 + s2;
  st.dot = d1 + d2;
}

// The statistics of x[0, n) alone, by the warp (every lane gets them).
template <typename T>
__device__ SoftmaxStats<T> warp_stats(const T* x, int64_t n, T inv_t) {
  const row_math::WarpGroup<T> warp;
  T max = -T(INFINITY);
  for (int64_t j = lane(); j < n; j += 32) max = row_math::nan_max(max, x[j]);
  max = warp.reduce(max, row_math::NanMax{});  // (NaN wins: the statistics' NaN flag)
  SoftmaxStats<T> st{max, T(0), T(0), is_nan(max)};
  if (st.nan || max == -T(INFINITY)) return st;
  T sum = 0, dot = 0;
  for (int64_t j = lane(); j < n; j += 32) {
    const T z = (x[j] - max) * inv_t, e = d_exp(z);
    sum += e;
    dot += e == T(0) ? T(0) : e * z;  // (exp(-inf) * -inf would be NaN)
  }
  st.sum = warp.reduce(sum, row_math::Sum{});
  st.dot = warp.reduce(dot, row_math::Sum{});
  return st;
}

// The statistics as kNumSoftmaxStats (teacher_topk.h) numbers in memory.
template <typename T>
__device__ __forceinline__ SoftmaxStats<T> load_stats(const T* p) {
  return SoftmaxStats<T>{p[0], p[1], p[2], p[3] != T(0)};
}
template <typename T>
__device__ __forceinline__ void store_stats(const SoftmaxStats<T>& st, T* p) {
  p[0] = st.max;
  p[1] = st.sum;
  p[2] = st.dot;
  p[3] = st.nan ? T(1) : T(0);
}

}  // namespace kdfast::cuda::topk_row
