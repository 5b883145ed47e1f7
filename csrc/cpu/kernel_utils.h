// Helpers shared by the CPU loss kernels: the op arguments as a LossConfig,
// target checks, and moving chunks between the input dtype and acc_t.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <string>
#include <type_traits>

#include "loss_math.h"

namespace kdfast::cpu {

// The loss keywords of an op call as a checked LossConfig.
inline LossConfig make_config(double hard_weight, double soft_weight, double double_weight, double temperature,
                              const std::string& negative_weighting, double negative_scale, double negative_shift,
                              double label_smoothing, int64_t ignore_index, int64_t num_classes) {
  LossConfig cfg;
  cfg.hard_weight = hard_weight;
  cfg.soft_weight = soft_weight;
  cfg.double_weight = double_weight;
  cfg.temperature = temperature;
  cfg.negative_weighting = parse_negative_weighting(negative_weighting);
  cfg.negative_scale = negative_scale;
  cfg.negative_shift = negative_shift;
  cfg.label_smoothing = label_smoothing;
  cfg.ignore_index = ignore_index;
  cfg.num_classes = num_classes;
  cfg.check();
  return cfg;
}

// The backward's inputs from the forward: the upstream gradient of each row's
// loss and the row statistics the forward returned.
inline void check_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& stats, int64_t B,
                                  at::ScalarType stats_type, const char* forward_op) {
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == B, "grad_losses must have shape [", B,
                    "], got ", grad_losses.sizes());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == kNumRowStats &&
                        stats.scalar_type() == stats_type,
                    "stats must be the [", B, ", ", int64_t(kNumRowStats), "] ", stats_type, " tensor returned by ",
                    forward_op);
}

// Rows whose target is ignore_index are skipped; any other target must be a class.
inline void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < num_classes), "target[", i, "] = ", t[i],
                      " is outside [0, ", num_classes, ") and is not ignore_index (", ignore_index, ")");
  }
}

// A chunk of a row in acc_t: the row's own memory when the dtypes agree, else a
// converted copy in `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

// Where to compute a chunk of output in acc_t: the output itself when the dtypes
// agree, else `buffer`, then converted by store_chunk.
template <typename scalar_t, typename acc_t>
acc_t* store_buffer(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
void store_chunk(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(src, dst, n);
}

}  // namespace kdfast::cpu
