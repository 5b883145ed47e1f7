// CPU stand-in for <mma.h>'s warp matrix functions (nvcuda::wmma), for the CUDA
// emulation build of the tests (tests/cuda_emu/README.md): the shapes kdfast's
// kernels use, 16x16x16 with bf16 or fp16 inputs and 16x16x8 with tf32 inputs
// (float in memory; the mma reads only their tf32 bits), float accumulators.
//
// Every load, store and mma_sync is a warp-wide sync point, so a call that not
// every lane of the warp reaches is an error, as it is undefined on a GPU. A
// matrix_a / matrix_b fragment holds the whole matrix in every lane. An
// accumulator's elements are shared out among the lanes (element e to lane
// e % 32) and each lane computes, loads and stores only its own: a lane that
// reads what another stored without a __syncwarp (or __syncthreads) between
// reads what was there before, depending on the order the lanes ran in.
// Checked as the CUDA documentation asks: pointers 256-bit aligned, ldm a
// multiple of 16 bytes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
// What an input fragment of element type T holds (and loads from): tf32 is float.
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
template <typename T>
using storage_t = typename storage<T>::type;
// the shapes of the real wmma: 16x16x8 for tf32, 16x16x16 for the 16-bit types
template <typename T, int M, int N, int K>
constexpr bool shape_ok = std::is_same_v<T, precision::tf32> ? (M == 16 && N == 16 && K == 8)
                                                             : (M == 16 && N == 16 && K == 16);
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// A is M x K, B is K x N, the accumulator M x N.
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  static_assert(detail::shape_ok<T, M, N, K>, "a shape wmma has for this type");
  static constexpr int rows = M, cols = K, num_elements = M * K;
  detail::storage_t<T> x[M * K];
};
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  static_assert(detail::shape_ok<T, M, N, K>, "a shape wmma has for this type");
  static constexpr int rows = K, cols = N, num_elements = K * N;
  detail::storage_t<T> x[K * N];
};
template <int M, int N, int K, typename T>
struct fragment<accumulator, M, N, K, T, void> {
  static constexpr int rows = M, cols = N, num_elements = M * N;
  T x[M * N];
};

namespace detail {
template <typename T>
void check_pointer(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::cuda_emu::fail(what);
  if ((ldm * sizeof(T)) % 16 != 0) ::cuda_emu::fail("wmma: ldm is not a multiple of 16 bytes");
}
inline bool owns(int e) { return e % 32 == ::cuda_emu::lane_id(); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& a, detail::storage_t<T> v) {
  for (int e = 0; e < a.num_elements; ++e) a.x[e] = v;
}

// x rounded to tf32 (10 mantissa bits; to nearest, ties away from zero, as cvt.rna.tf32.f32).
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&x, &bits, 4);
  return x;
}

namespace detail {
// what the tensor cores read of an input element: a tf32 one's top 19 bits
inline float mma_input(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= ~0x1fffu;
  std::memcpy(&x, &bits, 4);
  return x;
}
template <typename T>
float mma_input(T x) {
  return static_cast<float>(x);
}
}  // namespace detail

// matrix_a / matrix_b: element (r, c) at p[r * ldm + c] (row_major) or p[c * ldm + r].
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a, const detail::storage_t<T>* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "an input fragment");
  ::cuda_emu::sync_warp(0xffffffffu);
  detail::check_pointer(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      a.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
    }
  }
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& a, const float* p, unsigned ldm, layout_t layout) {
  ::cuda_emu::sync_warp(0xffffffffu);
  detail::check_pointer(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned");
  for (int e = 0; e < M * N; ++e) {
    if (detail::owns(e)) a.x[e] = layout == mem_row_major ? p[(e / N) * ldm + e % N] : p[(e % N) * ldm + e / N];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm, layout_t layout) {
  ::cuda_emu::sync_warp(0xffffffffu);
  detail::check_pointer(p, ldm, "wmma::store_matrix_sync: pointer not 256-bit aligned");
  for (int e = 0; e < M * N; ++e) {
    if (!detail::owns(e)) continue;
    (layout == mem_row_major ? p[(e / N) * ldm + e % N] : p[(e % N) * ldm + e / N]) = a.x[e];
  }
}

// d = a b + c, in float (the products of bf16 / fp16 / tf32 values are exact in float).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  ::cuda_emu::sync_warp(0xffffffffu);
  for (int e = 0; e < M * N; ++e) {
    if (!detail::owns(e)) continue;
    const int i = e / N, j = e % N;
    float sum = c.x[e];
    for (int k = 0; k < K; ++k) sum += detail::mma_input(a.x[i * K + k]) * detail::mma_input(b.x[k * N + j]);
    d.x[e] = sum;
  }
}

}  // namespace wmma
}  // namespace nvcuda
