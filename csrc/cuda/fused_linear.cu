// The fused linear loss kernels (declared in fused_linear.h).
//
// A block of 8 warps works on logit tiles of kFusedRows x kFusedClasses:
//   1. the student's W rows of the tile's classes ([128, d]) and the X rows of
//      the tile's rows ([64, d]) sit in shared memory (d padded to 16, zeros);
//   2. f = X W^T by WMMA (each warp a 32 x 32 corner: 2 x 2 fragments) into a
//      float tile in shared memory; a linear teacher's s the same way, with its
//      d_t staged in chunks of kFusedTeacherChunk;
//   3. each warp takes 8 of the tile's rows, a row at a time, and runs the
//      per-row maths of row_math.cuh on it (WarpGroup);
//   4. backward only: dL/df, in place of f, rounded to the input dtype (fp16:
//      scaled by a power of two per row block first, undone after), then
//      dX += G W (float atomics into grad_hidden) and dW += G^T X (fragments
//      kept in registers across the row blocks: each block owns its classes).
// The forward's blocks each own a strided set of class tiles and a group of
// rows, and loop over the group's row blocks for each tile (W read once per
// row group, X from L2); the teacher's log-partition pass (one_minus_prob
// weights) is the same kernel without the student. The backward's blocks each
// own one class tile and loop over all rows.
#include "fused_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "row_math.cuh"
#include "topk_row.cuh"

namespace kdfast::cuda {
namespace {

using namespace row_math;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kFusedRows, kClasses = kFusedClasses;
constexpr int kLdF = kClasses + 4;  // float tiles' row stride (a multiple of 4, rows 32-byte aligned)
constexpr int kMaskWords = kClasses / 32;  // a bit per class of a tile

__host__ __device__ constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// Where each array sits in the block's dynamic shared memory (byte offsets), and
// the input-dtype tiles' row strides (each row padded by 16 bytes: multiples of
// 16 bytes, as WMMA asks, and fewer bank conflicts).
struct Layout {
  int d_pad = 0, ld = 0;  // d rounded up to 16; the row stride of the X and W tiles
  int chunk = 0, ld_chunk = 0;  // a linear teacher's d_t staged this many at a time; its tiles' stride
  int ld_grad = 0;              // the gradient tile's stride (backward)
  int64_t w = -1, x = -1, f = -1, s = -1, stage = -1, grad = -1, keep = -1, kept_mask = -1, bias_grad = -1,
          total = 0;  // -1: none
};

// d: the student's (0 for the teacher-only passes); elem: the input dtype's bytes
// (float inputs stage the teacher in chunks of half as many, to fit).
__host__ __device__ Layout make_layout(int64_t d, FusedTeacher teacher, bool backward, int elem) {
  Layout l;
  const int pad = 16 / elem;
  l.d_pad = static_cast<int>((d + 15) / 16 * 16);
  l.ld = l.d_pad + pad;
  l.chunk = elem == 2 ? kFusedTeacherChunk : kFusedTeacherChunk / 2;
  l.ld_chunk = l.chunk + pad;
  l.ld_grad = kClasses + pad;
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t where = at;
    at += align128(bytes);
    return where;
  };
  if (d > 0) {  // (d = 0: the teacher's log-partition alone)
    l.w = take(int64_t(kClasses) * l.ld * elem);
    l.x = take(int64_t(kRows) * l.ld * elem);
    l.f = take(int64_t(kRows) * kLdF * 4);
  }
  if (teacher != FusedTeacher::None) l.s = take(int64_t(kRows) * kLdF * 4);
  // the teacher's staging (used before f is made) and the gradient tile (after) share their place
  int64_t stage_bytes = teacher == FusedTeacher::Linear ? int64_t(kRows + kClasses) * l.ld_chunk * elem : 0;
  const int64_t grad_bytes = int64_t(kRows) * l.ld_grad * elem;
  if (backward) stage_bytes = stage_bytes > grad_bytes ? stage_bytes : grad_bytes;
  if (stage_bytes > 0) l.stage = l.grad = take(stage_bytes);
  if (backward) {
    l.keep = take(kClasses * 4);
    l.kept_mask = take(kWarps * kMaskWords * 4);
    l.bias_grad = take(kClasses * 4);
  }
  l.total = at;
  return l;
}

// Explicit conversions: torch's nvcc flags (__CUDA_NO_HALF_CONVERSIONS__,
// __CUDA_NO_BFLOAT16_CONVERSIONS__) turn off the types' own.
template <typename in_t>
__device__ __forceinline__ float to_float(in_t x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(float x) { return x; }
template <typename in_t>
__device__ __forceinline__ in_t from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ float from_float(float x) { return x; }

// dst[r * ld + c] <- src[r * ld_src + c] for r < rows, c < cols, zero for the
// rest of [kRowsOut, cols_pad]: the block's threads share the copy, 16 bytes at
// a time where the source rows allow it (cols_pad and ld whole 16 bytes of
// elements, dst 16-byte aligned: the layout's).
template <typename in_t, int kRowsOut>
__device__ void load_rows(in_t* dst, int ld, const in_t* src, int64_t ld_src, int64_t rows, int64_t cols,
                          int cols_pad) {
  constexpr int kVec = 16 / sizeof(in_t);  // elements in 16 bytes
  if (cols % kVec == 0 && ld_src % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int per_row = cols_pad / kVec;
    for (int e = threadIdx.x; e < kRowsOut * per_row; e += kThreads) {
      const int r = e / per_row, c = e % per_row * kVec;
      uint4 v = make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in bf16, fp16 and float
      if (r < rows && c < cols) v = *reinterpret_cast<const uint4*>(src + r * ld_src + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
    return;
  }
  const in_t zero = from_float<in_t>(0.0f);
  for (int e = threadIdx.x; e < kRowsOut * cols_pad; e += kThreads) {
    const int r = e / cols_pad, c = e % cols_pad;
    dst[r * ld + c] = (r < rows && c < cols) ? src[r * ld_src + c] : zero;
  }
}

// The WMMA shape for an input dtype: 16 x 16 x 16 for bf16 / fp16, 16 x 16 x 8
// in tf32 for float (float inputs run here only where torch allows TF32: cuda_ops.cpp).
template <typename in_t>
struct Mma {
  static constexpr int kK = 16;
  using Element = in_t;
};
template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using Element = wmma::precision::tf32;
};
template <typename in_t>
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, Mma<in_t>::kK, float>;
template <typename in_t, typename Layout>
using InputA = wmma::fragment<wmma::matrix_a, 16, 16, Mma<in_t>::kK, typename Mma<in_t>::Element, Layout>;
template <typename in_t, typename Layout>
using InputB = wmma::fragment<wmma::matrix_b, 16, 16, Mma<in_t>::kK, typename Mma<in_t>::Element, Layout>;

// An input fragment loaded for mma_sync (float: its elements rounded to tf32).
template <typename in_t, typename Fragment>
__device__ void load_input(Fragment& frag, const in_t* p, int ld) {
  wmma::load_matrix_sync(frag, p, ld);
  if constexpr (std::is_same_v<in_t, float>) {
    for (int e = 0; e < frag.num_elements; ++e) frag.x[e] = wmma::__float_to_tf32(frag.x[e]);
  }
}

// A warp's 32 x 32 corner of a [kRows, kClasses] logit tile.
template <typename in_t>
struct LogitCorner {
  Accumulator<in_t> c[2][2];
  __device__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }
};
__device__ __forceinline__ int corner_row() { return (threadIdx.x / 32) / 4 * 32; }
__device__ __forceinline__ int corner_col() { return (threadIdx.x / 32) % 4 * 32; }

// acc += x[corner rows, :k] w[corner classes, :k]^T; x and w row-major with
// row stride ld, k a multiple of 16 (of 8 for float).
template <typename in_t>
__device__ void mma_logits(LogitCorner<in_t>& acc, const in_t* x, int ld_x, const in_t* w, int ld_w, int k) {
  InputA<in_t, wmma::row_major> a[2];
  InputB<in_t, wmma::col_major> b[2];
  const int r0 = corner_row(), c0 = corner_col();
  for (int k0 = 0; k0 < k; k0 += Mma<in_t>::kK) {
    for (int i = 0; i < 2; ++i) load_input<in_t>(a[i], x + (r0 + 16 * i) * ld_x + k0, ld_x);
    for (int j = 0; j < 2; ++j) load_input<in_t>(b[j], w + (c0 + 16 * j) * ld_w + k0, ld_w);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.c[i][j], a[i], b[j], acc.c[i][j]);
  }
}

template <typename in_t>
__device__ void store_logits(const LogitCorner<in_t>& acc, float* out) {
  const int r0 = corner_row(), c0 = corner_col();
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(out + (r0 + 16 * i) * kLdF + c0 + 16 * j, acc.c[i][j], kLdF, wmma::mem_row_major);
}

// The parts of a block's shared memory, from the layout.
template <typename in_t>
struct Tiles {
  in_t* w;     // [kClasses, ld] the student's weight rows of the tile's classes
  in_t* x;     // [kRows, ld] the student's hidden rows of the tile's rows
  float* f;    // [kRows, kLdF] logits, then (backward) dL/df
  float* s;    // [kRows, kLdF] the teacher's logits, or null
  in_t* stage_x;  // [kRows, ld_chunk], [kClasses, ld_chunk]: a linear teacher's chunks
  in_t* stage_w;
  in_t* grad;  // [kRows, ld_grad] dL/df in the input dtype (backward)
  int* keep;   // [kClasses] filter flags of the tile's class groups (backward)
  unsigned* kept_mask;  // [kWarps, kMaskWords] each warp's kept classes of the row block (backward)
  float* bias_grad;  // [kClasses] (backward)
};

template <typename in_t>
__device__ Tiles<in_t> tiles(unsigned char* smem, const Layout& l) {
  Tiles<in_t> t;
  auto at = [&](int64_t offset) { return offset < 0 ? nullptr : smem + offset; };
  t.w = reinterpret_cast<in_t*>(at(l.w));
  t.x = reinterpret_cast<in_t*>(at(l.x));
  t.f = reinterpret_cast<float*>(at(l.f));
  t.s = reinterpret_cast<float*>(at(l.s));
  t.stage_x = reinterpret_cast<in_t*>(at(l.stage));
  t.stage_w = t.stage_x ? t.stage_x + kRows * l.ld_chunk : nullptr;
  t.grad = reinterpret_cast<in_t*>(at(l.grad));
  t.keep = reinterpret_cast<int*>(at(l.keep));
  t.kept_mask = reinterpret_cast<unsigned*>(at(l.kept_mask));
  t.bias_grad = reinterpret_cast<float*>(at(l.bias_grad));
  return t;
}

// Rows [r0, r0 + kRows) x classes [c0, c0 + kClasses) of the logits: X rows into
// t.x, the student's logits (no bias yet) into t.f and a linear teacher's into
// t.s; t.w already holds the tile's weight rows. student = false: the teacher's
// alone. Starts and ends with a barrier.
template <typename in_t>
__device__ void make_logits(const FusedLinearArgs& a, const Layout& l, const Tiles<in_t>& t, int64_t r0, int64_t c0,
                            bool student = true) {
  const int64_t rows = min(int64_t(kRows), a.B - r0), classes = min(int64_t(kClasses), a.V - c0);
  __syncthreads();  // the previous row block is done with x, f and s
  if (student) {
    load_rows<in_t, kRows>(t.x, l.ld, static_cast<const in_t*>(a.hidden) + r0 * a.d, a.d, rows, a.d, l.d_pad);
  }
  if (a.teacher == FusedTeacher::Linear) {
    LogitCorner<in_t> acc;
    acc.zero();
    for (int64_t k0 = 0; k0 < a.d_t; k0 += l.chunk) {
      const int64_t kn = min(int64_t(l.chunk), a.d_t - k0);
      __syncthreads();  // the previous chunk is consumed
      load_rows<in_t, kRows>(t.stage_x, l.ld_chunk, static_cast<const in_t*>(a.teacher_hidden) + r0 * a.d_t + k0,
                             a.d_t, rows, kn, l.chunk);
      load_rows<in_t, kClasses>(t.stage_w, l.ld_chunk,
                                static_cast<const in_t*>(a.teacher_weight) + c0 * a.d_t + k0, a.d_t, classes, kn,
                                l.chunk);
      __syncthreads();
      mma_logits(acc, t.stage_x, l.ld_chunk, t.stage_w, l.ld_chunk, l.chunk);
    }
    store_logits(acc, t.s);
  }
  __syncthreads();  // x is loaded
  if (student) {
    LogitCorner<in_t> acc;
    acc.zero();
    mma_logits(acc, t.x, l.ld, t.w, l.ld, l.d_pad);
    store_logits(acc, t.f);
    __syncthreads();
  }
}

// The row's biases added, and a dense or top-k teacher's logits put in its s
// row; by the row's warp, which syncs at the end.
template <typename in_t>
__device__ void finish_row_logits(const FusedLinearArgs& a, int64_t i, int64_t c0, int64_t n, float* f, float* s) {
  const int lane = threadIdx.x % 32;
  for (int64_t j = lane; j < n; j += 32) {
    if (f && a.bias) f[j] += a.bias[c0 + j];
    if (a.teacher == FusedTeacher::Linear && a.teacher_bias) s[j] += a.teacher_bias[c0 + j];
    if (a.teacher == FusedTeacher::Dense) s[j] = to_float(static_cast<const in_t*>(a.teacher_logits)[i * a.V + c0 + j]);
    if (a.teacher == FusedTeacher::TopK) s[j] = neg_inf<float>();
  }
  if (a.teacher == FusedTeacher::TopK) {
    __syncwarp();  // the -inf land before the teacher's classes
    for (int64_t q = lane; q < a.k; q += 32) {
      const int64_t c = a.topk_indices[i * a.k + q];
      if (c >= c0 && c < c0 + n) s[c - c0] = a.topk_logits[i * a.k + q];
    }
  }
  __syncwarp();
}

// The tile's weight rows [c0, c0 + kClasses) into t.w (zeros past V or d).
template <typename in_t>
__device__ void load_weight_tile(const FusedLinearArgs& a, const Layout& l, const Tiles<in_t>& t, int64_t c0) {
  __syncthreads();  // the previous tile is done with w
  load_rows<in_t, kClasses>(t.w, l.ld, static_cast<const in_t*>(a.weight) + c0 * a.d, a.d,
                            min(int64_t(kClasses), a.V - c0), a.d, l.d_pad);
}

// What the forward kernel computes per row.
enum class Pass {
  Loss,         // the rows' running states of the loss (kNumRowState each)
  TeacherLse,   // the teacher's (max, sum of exp(s - max)) alone (2 each)
  TeacherTopK,  // the teacher's top-k list and softmax statistics (FusedTopkPartial)
};

// Block (b, g) folds the class tiles b, b + splits, ... of row group g (rows
// [g rows_per_group, (g + 1) rows_per_group)) into its rows' part of split b's
// partial states (partial, or topk for the top-k pass).
template <typename in_t, Pass kPass>
__global__ void __launch_bounds__(kThreads) fused_forward_kernel(LossTerms p, Targets targets, FusedLinearArgs a,
                                                                 int64_t rows_per_group, float* partial,
                                                                 FusedTopkPartial topk) {
  extern __shared__ __align__(128) unsigned char fused_smem[];
  constexpr bool kStudent = kPass == Pass::Loss;
  constexpr int kWidth = kPass == Pass::TeacherLse ? 2 : kNumRowState;
  const Layout l = make_layout(kStudent ? a.d : 0, a.teacher, false, sizeof(in_t));
  const Tiles<in_t> t = tiles<in_t>(fused_smem, l);
  const int64_t num_tiles = (a.V + kClasses - 1) / kClasses;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_group, row_end = min(a.B, row_begin + rows_per_group);
  const int warp = threadIdx.x / 32;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t c0 = tile * kClasses, n = min(int64_t(kClasses), a.V - c0);
    const bool first = tile == blockIdx.x;
    if (kStudent) load_weight_tile(a, l, t, c0);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
      make_logits(a, l, t, r0, c0, kStudent);
      for (int r = warp; r < kRows && r0 + r < row_end; r += kWarps) {
        const int64_t i = r0 + r, at = int64_t(blockIdx.x) * a.B + i;  // the row, its place in the split
        float* f = kStudent ? t.f + r * kLdF : nullptr;
        float* s = t.s ? t.s + r * kLdF : nullptr;
        finish_row_logits<in_t>(a, i, c0, n, f, s);
        if constexpr (kPass == Pass::TeacherTopK) {
          using namespace topk_row;
          SoftmaxStats<float> st = first ? empty_stats<float>() : load_stats(topk.stats + at * kNumSoftmaxStats);
          merge_stats(st, warp_stats(s, n, topk.inv_t), topk.inv_t);
          const RowList<float> list{topk.logit + at * topk.k, topk.index + at * topk.k, topk.k};
          const int64_t count = warp_select<float>(
              n, [&](int64_t j) { return Candidate<float>{s[j], c0 + j}; }, list, first ? 0 : topk.count[at]);
          __syncwarp();  // every lane has read the old count and statistics
          if (threadIdx.x % 32 == 0) {
            topk.count[at] = count;
            store_stats(st, topk.stats + at * kNumSoftmaxStats);
          }
        } else {
          float st[kWidth];
          float* saved = partial + at * kWidth;
          if constexpr (kPass == Pass::TeacherLse) {
            st[0] = first ? neg_inf<float>() : saved[0];
            st[1] = first ? 0.0f : saved[1];
            lse_row(s, n, st[0], st[1], WarpGroup<float>{});
          } else {
            if (first) {
              empty_row_state(st);
            } else {
              for (int j = 0; j < kWidth; ++j) st[j] = saved[j];
            }
            RowTarget y;
            if (row_target(targets, i, y)) {
              accumulate_row(p, y, f, s, a.lse_w ? a.lse_w + 2 * i : nullptr, n, c0, st, WarpGroup<float>{});
            }
          }
          __syncwarp();  // every lane has read the saved state
          if (threadIdx.x % 32 == 0) {
            for (int j = 0; j < kWidth; ++j) saved[j] = st[j];
          }
        }
      }
    }
  }
}

// One thread per row: state = partial[0] merged with partial[1], ... in order.
__global__ void merge_states_kernel(LossTerms p, const float* partial, int64_t splits, int64_t B, float* state) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  float st[kNumRowState];
  for (int j = 0; j < kNumRowState; ++j) st[j] = partial[i * kNumRowState + j];
  for (int64_t b = 1; b < splits; ++b) merge_row_state(p, st, partial + (b * B + i) * kNumRowState);
  for (int j = 0; j < kNumRowState; ++j) state[i * kNumRowState + j] = st[j];
}

// One thread per row: lse = (max, log sum) of the partial (max, sum) pairs, merged in order.
__global__ void merge_lse_kernel(const float* partial, int64_t splits, int64_t B, float* lse) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B) return;
  float max = partial[2 * i], sum = partial[2 * i + 1];
  for (int64_t b = 1; b < splits; ++b) {
    const float* o = partial + 2 * (b * B + i);
    const float m = std_max(max, o[0]);
    sum = sum * rescale_factor(max, m) + o[1] * rescale_factor(o[0], m);
    max = m;
  }
  lse[2 * i] = max;
  lse[2 * i + 1] = logf(sum);
}

// Whether one of the tile's classes [lo, hi) is kept: a bit set in one of the warps' masks.
__device__ bool any_kept(const unsigned* kept_mask, int64_t lo, int64_t hi) {
  for (int64_t w = lo / 32; w < kMaskWords && w * 32 < hi; ++w) {
    const int64_t b0 = max(lo - w * 32, int64_t(0)), b1 = min(hi - w * 32, int64_t(32));
    const unsigned bits = b1 - b0 == 32 ? ~0u : ((1u << (b1 - b0)) - 1) << b0;
    unsigned any = 0;
    for (int warp = 0; warp < kWarps; ++warp) any |= kept_mask[warp * kMaskWords + w];
    if (any & bits) return true;
  }
  return false;
}

// The warp's dW fragments: its 16 classes of the tile by up to kFusedMaxDim dims.
constexpr int kDimFrags = kFusedMaxDim / 16;

// Block b owns class tile b: for every row block, dL/df of the tile, then
// dX += G W (atomics) and dW += G^T X (registers); dW and the bias's gradient
// written at the end.
template <typename in_t>
__global__ void __launch_bounds__(kThreads) fused_backward_kernel(LossTerms p, Targets targets, FusedLinearArgs a,
                                                                  const float* stats, const float* grad_losses,
                                                                  float filter_eps, int64_t filter_group,
                                                                  float* grad_hidden, in_t* grad_weight,
                                                                  float* grad_bias) {
  extern __shared__ __align__(128) unsigned char fused_smem[];
  constexpr bool kScaled = std::is_same_v<in_t, __half>;  // fp16's gradient tile is scaled
  __shared__ int tile_largest;  // (fp16) the bits of the row block's largest |G| entry
  const Layout l = make_layout(a.d, a.teacher, true, sizeof(in_t));
  const Tiles<in_t> t = tiles<in_t>(fused_smem, l);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c0 = int64_t(blockIdx.x) * kClasses, n = min(int64_t(kClasses), a.V - c0);
  const int dim_frags = l.d_pad / 16;
  const bool filtering = filter_eps > 0;
  // the filter flag of the tile's class j: its class group's, counted from the tile's first
  auto group_of = [&](int64_t j) { return (c0 + j) / filter_group - c0 / filter_group; };
  Accumulator<in_t> dw[kDimFrags];
  for (int q = 0; q < kDimFrags; ++q) wmma::fill_fragment(dw[q], 0.0f);
  for (int j = threadIdx.x; j < kClasses; j += kThreads) {
    t.bias_grad[j] = 0.0f;
    t.keep[j] = 1;  // (filtering: set per row block)
  }
  load_weight_tile(a, l, t, c0);
  for (int64_t r0 = 0; r0 < a.B; r0 += kRows) {
    const int64_t rows = min(int64_t(kRows), a.B - r0);
    if (threadIdx.x == 0) tile_largest = 0;  // (the last row block read it before its later barriers)
    make_logits(a, l, t, r0, c0);
    // dL/df in place of f, row by row; rows that contribute nothing (and those past B) zero.
    // Filtering: bit q of kept_bits is set where class lane + 32 q is kept by one of the warp's rows
    unsigned kept_bits = 0;
    for (int r = warp; r < kRows; r += kWarps) {
      const int64_t i = r0 + r;
      float* f = t.f + r * kLdF;
      float* s = t.s ? t.s + r * kLdF : nullptr;
      RowTarget y;
      if (i < a.B && row_target(targets, i, y)) {
        finish_row_logits<in_t>(a, i, c0, n, f, s);
        const float scale = grad_losses[i];
        gradient_row(p, y, stats + i * kNumRowStats, a.lse_w ? a.lse_w + 2 * i : nullptr, f, s, scale, n, c0, f,
                     WarpGroup<float>{});
        __syncwarp();  // lane 0's corrections at the positives land
        if (filtering) {
          const float limit = filter_eps * fabsf(scale);
          for (int64_t j = lane; j < n; j += 32) {
            if (!(fabsf(f[j]) <= limit)) kept_bits |= 1u << (j / 32);  // NaN keeps
          }
        }
        for (int64_t j = n + lane; j < kClasses; j += 32) f[j] = 0.0f;
      } else {
        for (int j = lane; j < kClasses; j += 32) f[j] = 0.0f;
      }
    }
    // the class groups' filter flags, each set by one thread from the warps' masks (no flag
    // written by two threads); a block whose every group is negligible adds nothing (the same
    // on every thread)
    if (filtering) {
      for (int q = 0; q < kMaskWords; ++q) {
        const unsigned mask = __ballot_sync(0xffffffffu, (kept_bits >> q) & 1u);
        if (lane == 0) t.kept_mask[warp * kMaskWords + q] = mask;
      }
    }
    __syncthreads();
    if (filtering && threadIdx.x < kClasses) {
      const int64_t g = threadIdx.x, first = c0 / filter_group;  // the group, the tile's first
      t.keep[g] = any_kept(t.kept_mask, max((first + g) * filter_group - c0, int64_t(0)),
                           min((first + g + 1) * filter_group - c0, n));
    }
    const int kept_any = __syncthreads_or(threadIdx.x < kClasses && t.keep[threadIdx.x] != 0);
    if (!kept_any) continue;
    // G in the input dtype, the negligible groups zeroed; the bias's gradient summed in row order
    float largest = 0.0f;  // (fp16) the tile's largest |G| entry, this thread's part
    for (int e = threadIdx.x; e < kRows * kClasses; e += kThreads) {
      const int r = e / kClasses, j = e % kClasses;
      const bool kept = t.keep[group_of(j)] != 0 || j >= n;
      const float g = kept ? t.f[r * kLdF + j] : 0.0f;
      t.f[r * kLdF + j] = g;
      if constexpr (kScaled) {
        largest = fmaxf(largest, fabsf(g));  // (a NaN is dropped here; it still reaches G below)
      } else {
        t.grad[r * l.ld_grad + j] = from_float<in_t>(g);
      }
    }
    // fp16: G scaled by the power of two that puts the tile's largest entry in [2^14, 2^15), so
    // that its range keeps the small entries (a mean reduction's ~1/(B V)); dX and dW unscale
    float scale = 1.0f, unscale = 1.0f;
    if constexpr (kScaled) {
      atomicMax(&tile_largest, __float_as_int(largest));  // (non-negative floats order as their bits)
      __syncthreads();
      const float m = __int_as_float(tile_largest);
      if (m > 0.0f && m <= 3.0e38f) {
        const int shift = min(max(14 - ilogbf(m), -126), 126);
        scale = ldexpf(1.0f, shift);
        unscale = ldexpf(1.0f, -shift);
      }
      for (int e = threadIdx.x; e < kRows * kClasses; e += kThreads) {
        const int r = e / kClasses, j = e % kClasses;
        t.grad[r * l.ld_grad + j] = from_float<in_t>(t.f[r * kLdF + j] * scale);
      }
    }
    __syncthreads();
    if (a.bias) {
      for (int j = threadIdx.x; j < kClasses; j += kThreads) {
        float sum = 0;
        for (int r = 0; r < rows; ++r) sum += t.f[r * kLdF + j];
        t.bias_grad[j] += sum;
      }
    }
    __syncthreads();  // f is read: the dX corners go there
    // dX[rows, :d] = G W: warp w takes fragments w, w + 8, ... of the [kRows, d_pad] result
    for (int q = warp; q < (kRows / 16) * dim_frags; q += kWarps) {
      const int fr = q / dim_frags, fc = q % dim_frags;
      Accumulator<in_t> acc;
      wmma::fill_fragment(acc, 0.0f);
      InputA<in_t, wmma::row_major> ga;
      InputB<in_t, wmma::row_major> wb;
      for (int k0 = 0; k0 < kClasses; k0 += Mma<in_t>::kK) {
        load_input<in_t>(ga, t.grad + fr * 16 * l.ld_grad + k0, l.ld_grad);
        load_input<in_t>(wb, t.w + k0 * l.ld + fc * 16, l.ld);
        wmma::mma_sync(acc, ga, wb, acc);
      }
      wmma::store_matrix_sync(t.f + fr * 16 * kLdF + fc * 16, acc, kLdF, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * a.d; e += kThreads) {
      const int r = e / a.d, c = e % a.d;
      atomicAdd(grad_hidden + (r0 + r) * a.d + c, kScaled ? t.f[r * kLdF + c] * unscale : t.f[r * kLdF + c]);
    }
    // dW[warp's 16 classes, :d_pad] += G^T X (G^T: the gradient tile read column-major); fp16:
    // each fragment's product made apart, then unscaled into its sum
    using GradT = InputA<in_t, wmma::col_major>;
    using HiddenB = InputB<in_t, wmma::row_major>;
    if constexpr (kScaled) {
#pragma unroll
      for (int q = 0; q < kDimFrags; ++q) {
        if (q < dim_frags) {
          Accumulator<in_t> part;
          wmma::fill_fragment(part, 0.0f);
          for (int k0 = 0; k0 < kRows; k0 += Mma<in_t>::kK) {
            GradT gt;
            HiddenB xb;
            load_input<in_t>(gt, t.grad + k0 * l.ld_grad + warp * 16, l.ld_grad);
            load_input<in_t>(xb, t.x + k0 * l.ld + q * 16, l.ld);
            wmma::mma_sync(part, gt, xb, part);
          }
          for (int e = 0; e < part.num_elements; ++e) dw[q].x[e] += part.x[e] * unscale;
        }
      }
    } else {
      for (int k0 = 0; k0 < kRows; k0 += Mma<in_t>::kK) {
        GradT gt;
        load_input<in_t>(gt, t.grad + k0 * l.ld_grad + warp * 16, l.ld_grad);
#pragma unroll
        for (int q = 0; q < kDimFrags; ++q) {
          if (q < dim_frags) {
            HiddenB xb;
            load_input<in_t>(xb, t.x + k0 * l.ld + q * 16, l.ld);
            wmma::mma_sync(dw[q], gt, xb, dw[q]);
          }
        }
      }
    }
  }
  // dW out through a 16 x 16 float patch per warp (in f, free now), rounded to the input dtype
  __syncthreads();
  float* patch = t.f + warp * 256;
#pragma unroll
  for (int q = 0; q < kDimFrags; ++q) {
    if (q < dim_frags) {
      wmma::store_matrix_sync(patch, dw[q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t cls = warp * 16 + e / 16, dim = q * 16 + e % 16;
        if (cls < n && dim < a.d) grad_weight[(c0 + cls) * a.d + dim] = from_float<in_t>(patch[e]);
      }
      __syncwarp();  // the patch is read before the next fragment
    }
  }
  if (grad_bias) {
    for (int j = threadIdx.x; j < n; j += kThreads) grad_bias[c0 + j] = t.bias_grad[j];
  }
}

template <typename Kernel>
void allow_shared(Kernel* kernel, int64_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// The forward's grid: splits x row groups blocks, about kForwardBlocks of them
// (enough to fill a large GPU), each row group a whole number of row blocks.
constexpr int64_t kForwardBlocks = 512;

dim3 forward_grid(int64_t B, int64_t splits, int64_t& rows_per_group) {
  const int64_t row_blocks = (B + kRows - 1) / kRows;
  const int64_t groups = std::clamp<int64_t>((kForwardBlocks + splits - 1) / splits, 1, row_blocks);
  rows_per_group = (row_blocks + groups - 1) / groups * kRows;
  return dim3(static_cast<unsigned>(splits), static_cast<unsigned>((B + rows_per_group - 1) / rows_per_group));
}

template <typename in_t, Pass kPass>
void launch_forward(const LossTerms& p, const Targets& targets, const FusedLinearArgs& a, int64_t splits,
                    float* partial, const FusedTopkPartial& topk, cudaStream_t stream) {
  const Layout l = make_layout(kPass == Pass::Loss ? a.d : 0, a.teacher, false, sizeof(in_t));
  int64_t rows_per_group = 0;
  const dim3 grid = forward_grid(a.B, splits, rows_per_group);
  allow_shared(fused_forward_kernel<in_t, kPass>, l.total);
  fused_forward_kernel<in_t, kPass><<<grid, kThreads, l.total, stream>>>(p, targets, a, rows_per_group, partial, topk);
}

// launch_forward for the inputs' dtype.
template <Pass kPass>
void launch_forward(const LossTerms& p, const Targets& targets, const FusedLinearArgs& a, int64_t splits,
                    float* partial, const FusedTopkPartial& topk, cudaStream_t stream) {
  switch (a.input) {
    case FusedInput::BFloat16:
      return launch_forward<__nv_bfloat16, kPass>(p, targets, a, splits, partial, topk, stream);
    case FusedInput::Float16:
      return launch_forward<__half, kPass>(p, targets, a, splits, partial, topk, stream);
    case FusedInput::Float32:
      return launch_forward<float, kPass>(p, targets, a, splits, partial, topk, stream);
  }
}

// A forward pass's class splits: at most one per class tile, as many as the
// partial states' memory allows, kForwardBlocks (or max_splits > 0) at most.
int64_t choose_splits(int64_t num_tiles, int64_t by_memory, int64_t max_splits) {
  const int64_t cap = max_splits > 0 ? std::min(max_splits, kForwardBlocks) : kForwardBlocks;
  return std::max<int64_t>(1, std::min<int64_t>({num_tiles, by_memory, cap}));
}

template <typename in_t>
void launch_backward(const LossTerms& terms, const Targets& targets, const FusedLinearArgs& a, const Layout& l,
                     const float* stats, const float* grad_losses, float filter_eps, int64_t filter_group,
                     float* grad_hidden, void* grad_weight, float* grad_bias, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((a.V + kClasses - 1) / kClasses);
  allow_shared(fused_backward_kernel<in_t>, l.total);
  fused_backward_kernel<in_t><<<blocks, kThreads, l.total, stream>>>(terms, targets, a, stats, grad_losses,
                                                                     filter_eps, filter_group, grad_hidden,
                                                                     static_cast<in_t*>(grad_weight), grad_bias);
}

int element_bytes(FusedInput input) { return input == FusedInput::Float32 ? 4 : 2; }

unsigned row_threads_blocks(int64_t B) { return static_cast<unsigned>((B + 255) / 256); }

}  // namespace

bool fused_linear_supported(const FusedLinearArgs& args) {
  if (args.d < 1 || args.d > kFusedMaxDim) return false;
  // the backward's layout holds the forward's (and the teacher-only passes')
  return make_layout(args.d, args.teacher, true, element_bytes(args.input)).total <= 160 * 1024;
}

int64_t fused_forward_splits(int64_t B, int64_t V, int64_t max_splits) {
  // the partial states within 16 MiB (kept in L2, and a small part of the step's peak memory)
  const int64_t num_tiles = (V + kClasses - 1) / kClasses;
  const int64_t by_memory = (int64_t(16) << 20) / (std::max<int64_t>(B, 1) * kNumRowState * 4);
  return choose_splits(num_tiles, by_memory, max_splits);
}

void fused_linear_forward(const LossTerms& terms, const Targets& targets, const FusedLinearArgs& args,
                          int64_t splits, float* partial, float* state, cudaStream_t stream) {
  if (args.B <= 0 || args.V <= 0) return;
  launch_forward<Pass::Loss>(terms, targets, args, splits, partial, FusedTopkPartial{}, stream);
  merge_states_kernel<<<row_threads_blocks(args.B), 256, 0, stream>>>(terms, partial, splits, args.B, state);
}

void fused_teacher_lse(const FusedLinearArgs& args, int64_t splits, float* partial, float* lse, cudaStream_t stream) {
  if (args.B <= 0 || args.V <= 0) return;
  launch_forward<Pass::TeacherLse>(LossTerms{}, Targets{}, args, splits, partial, FusedTopkPartial{}, stream);
  merge_lse_kernel<<<row_threads_blocks(args.B), 256, 0, stream>>>(partial, splits, args.B, lse);
}

bool fused_topk_supported(const FusedLinearArgs& args, int64_t k) {
  return args.teacher == FusedTeacher::Linear && args.d_t >= 1 && k >= 1 && k <= kMaxTopK &&
         make_layout(0, args.teacher, false, element_bytes(args.input)).total <= 160 * 1024;
}

int64_t fused_topk_splits(int64_t B, int64_t V, int64_t k, int64_t max_splits) {
  // the partial lists within 64 MiB (a small part of a labeling batch's memory)
  const int64_t num_tiles = (V + kClasses - 1) / kClasses;
  const int64_t row_bytes = k * (4 + 8) + 8 + kNumSoftmaxStats * 4;
  const int64_t by_memory = (int64_t(64) << 20) / (std::max<int64_t>(B, 1) * row_bytes);
  return choose_splits(num_tiles, by_memory, max_splits);
}

void fused_teacher_topk(const FusedLinearArgs& args, int64_t k, double temperature, int64_t splits,
                        FusedTopkPartial partial, float* best_logit, int64_t* best_index, float* stats,
                        cudaStream_t stream) {
  if (args.B <= 0 || args.V <= 0) return;
  partial.k = k;
  partial.inv_t = 1.0f / float(temperature);  // as teacher_topk.cu's kernels
  launch_forward<Pass::TeacherTopK>(LossTerms{}, Targets{}, args, splits, nullptr, partial, stream);
  topk_merge_splits(partial.logit, partial.index, partial.count, partial.stats, splits, args.B, k, temperature,
                    best_logit, best_index, stats, stream);
}

void fused_linear_backward(const LossTerms& terms, const Targets& targets, const FusedLinearArgs& args,
                           const float* stats, const float* grad_losses, double filter_eps, int64_t filter_group,
                           float* grad_hidden, void* grad_weight, float* grad_bias, cudaStream_t stream) {
  if (args.B <= 0 || args.V <= 0) return;
  const Layout l = make_layout(args.d, args.teacher, true, element_bytes(args.input));
  const float eps = static_cast<float>(filter_eps);
  const int64_t group = std::max<int64_t>(filter_group, 1);
  switch (args.input) {
    case FusedInput::BFloat16:
      return launch_backward<__nv_bfloat16>(terms, targets, args, l, stats, grad_losses, eps, group, grad_hidden,
                                            grad_weight, grad_bias, stream);
    case FusedInput::Float16:
      return launch_backward<__half>(terms, targets, args, l, stats, grad_losses, eps, group, grad_hidden,
                                     grad_weight, grad_bias, stream);
    case FusedInput::Float32:
      return launch_backward<float>(terms, targets, args, l, stats, grad_losses, eps, group, grad_hidden,
                                    grad_weight, grad_bias, stream);
  }
}

}  // namespace kdfast::cuda
