// CPU kernel of the eigenprojection: weights [T, k, d] (a trajectory of T
// checkpoints of a k x d weight matrix) and an eigenbasis [d, r] of the data
// -> out[t, i] = || W_t v_i ||_2, the weight's component along each data
// eigendirection (seed 001, section 4 and App. D.3).
//
// Work items are (checkpoint, block of weight rows): each is one GEMM
// W_t[rows] @ V into a small buffer, reduced at once to per-column sums of
// squares, so the [T, k, r] product is never stored. The partial sums are
// folded in block order, so results do not depend on thread timing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace kdfast::cpu {
namespace {

// Rows of W per work item: the [rows, r] product buffer stays near 256 KiB.
int64_t rows_per_block(int64_t k, int64_t r) {
  const int64_t budget_elems = (256 * 1024) / 4;
  return std::clamp<int64_t>(budget_elems / std::max<int64_t>(r, 1), 1, std::max<int64_t>(k, 1));
}

at::Tensor eigenprojection_cpu(const at::Tensor& weights, const at::Tensor& basis) {
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be a floating-point tensor, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 3, "weights must have shape [T, k, d], got ", weights.sizes());
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(0) == weights.size(2), "basis must have shape [d, r] with d = ",
                    weights.size(2), ", got ", basis.sizes());
  TORCH_CHECK_TYPE(basis.scalar_type() == weights.scalar_type(), "basis has dtype ", basis.scalar_type(),
                   " but weights have dtype ", weights.scalar_type());
  TORCH_CHECK_VALUE(basis.device() == weights.device(), "basis is on ", basis.device(), " but weights are on ",
                    weights.device());

  const int64_t T = weights.size(0), k = weights.size(1), r = basis.size(1);
  // GEMMs run in float64 for float64 inputs and in float32 otherwise.
  const auto acc_dtype = weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weights.contiguous();
  const at::Tensor v = basis.to(acc_dtype).contiguous();
  const int64_t block = rows_per_block(k, r);
  const int64_t blocks = k == 0 ? 0 : (k + block - 1) / block;

  // partial[t, b, i]: sum of squares of (W_t[rows of block b] @ V)[:, i], in float64.
  at::Tensor partial = at::zeros({T, std::max<int64_t>(blocks, 1), r}, weights.options().dtype(at::kDouble));
  double* partial_data = partial.data_ptr<double>();
  if (r > 0 && blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "eigenprojection", [&] {
      at::parallel_for(0, T * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t t = item / blocks, b = item % blocks;
          const int64_t row0 = b * block, rows = std::min(block, k - row0);
          const at::Tensor product = at::mm(w[t].narrow(0, row0, rows).to(acc_dtype), v);  // [rows, r]
          const scalar_t* p = product.const_data_ptr<scalar_t>();
          double* out = partial_data + item * r;
          for (int64_t row = 0; row < rows; ++row)
            for (int64_t i = 0; i < r; ++i) {
              const double x = p[row * r + i];
              out[i] += x * x;
            }
        }
      });
    });
  }
  return partial.sum(1).sqrt_().to(weights.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("eigenprojection", &eigenprojection_cpu);
}

}  // namespace kdfast::cpu
