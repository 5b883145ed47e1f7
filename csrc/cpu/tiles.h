// Class tiles for the CPU kernels that fuse a linear layer with a reduction over
// classes: tile sizing, the tile GEMM, and folding per-thread partial results.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "gemm.h"

namespace kdfast::cpu {

// Class tile size: the per-thread [B, tile] buffers (student and teacher logits,
// gradient) in about 4 MiB, a multiple of 64 between min_tile and 8192.
inline int64_t choose_tile(int64_t requested, int64_t B, int64_t V, int64_t min_tile = 64) {
  int64_t tile = requested;
  if (tile <= 0) {
    const int64_t budget_bytes = int64_t(4) << 20;
    tile = budget_bytes / (std::max<int64_t>(B, 1) * 3 * 4);
    tile = std::clamp<int64_t>(tile / 64 * 64, min_tile, 8192);
  }
  return std::min(tile, V);
}

// The rows x_in (input dtype, contiguous) for linear_tile's bf16 GEMM when their
// GEMMs with these weights take it (both bf16 and the bf16 GEMM on), else undefined.
inline at::Tensor bf16_rows(const at::Tensor& x_in, const at::Tensor& weight) {
  const bool bf16 = x_in.defined() && x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16;
  return bf16 && bf16_gemm_enabled() ? x_in : at::Tensor();
}

// out[B, n] = x W[c0:c0+n]^T + b[c0:c0+n] in acc dtype. x is in acc dtype; x_low
// is undefined, or the same rows in bf16 when the caller chose the bf16 GEMM
// (bf16_rows: one choice per op, as its tiles must agree). Otherwise `w_buffer`
// holds the weight tile converted to acc dtype when the weights are in a lower
// precision.
inline void linear_tile(const at::Tensor& x, const at::Tensor& x_low, const at::Tensor& weight,
                        const at::Tensor& bias, int64_t c0, int64_t n, at::Tensor& w_buffer, const at::Tensor& out) {
  if (x_low.defined()) {
    linear_tile_bf16(x_low, weight, bias, c0, n, out);
    return;
  }
  at::Tensor w = weight.narrow(0, c0, n);
  if (w.scalar_type() != x.scalar_type()) {
    at::Tensor converted = w_buffer.view(-1).narrow(0, 0, n * weight.size(1)).view({n, weight.size(1)});
    converted.copy_(w);
    w = converted;
  }
  if (bias.defined()) {
    at::addmm_out(const_cast<at::Tensor&>(out), bias.narrow(0, c0, n), x, w.t());
  } else {
    at::mm_out(const_cast<at::Tensor&>(out), x, w.t());
  }
}

// Per-thread partial results of a parallel pass over tiles, folded in tile order
// once the pass is done, so results do not depend on which thread ends first.
template <typename Part>
class OrderedParts {
 public:
  void add(int64_t first_tile, Part part) {
    std::lock_guard<std::mutex> lock(mutex_);
    parts_.emplace(first_tile, std::move(part));
  }
  template <typename Fold>
  void fold(const Fold& fold) {
    for (auto& entry : parts_) fold(entry.second);
  }

 private:
  std::mutex mutex_;
  std::map<int64_t, Part> parts_;
};

// A contiguous [rows, n] view of the first rows * n elements of a flat buffer.
inline at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t n) {
  return buffer.narrow(0, 0, rows * n).view({rows, n});
}

}  // namespace kdfast::cpu
