// Helpers shared by the CPU loss kernels: the op arguments as a LossConfig,
// target checks, and moving chunks between the input dtype and acc_t.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <optional>
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

// The kernels divide by the temperature in their accumulation dtype: it and its
// inverse must be finite there (a float32 temperature below ~2.9e-39 made NaNs).
inline void check_temperature_range(double temperature, at::ScalarType acc_type) {
  const double largest = acc_type == at::kDouble ? std::numeric_limits<double>::max()
                                                 : static_cast<double>(std::numeric_limits<float>::max());
  TORCH_CHECK_VALUE(temperature >= 1.0 / largest && temperature <= largest, "temperature must be in [",
                    1.0 / largest, ", ", largest, "] with ", acc_type,
                    " accumulation (it and 1/temperature finite), got ", temperature);
}

// Shape, dtype and device checks of the dense loss op's tensors (every message
// names the argument); shared by the CPU kernels and the CUDA glue.
inline void check_dense_inputs(const LossConfig& cfg, const at::Tensor& student, const std::optional<at::Tensor>& target,
                  const std::optional<at::Tensor>& teacher) {
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()),
                   "student_logits must be a floating-point tensor, got ", student.scalar_type());
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must have shape [B, V], got ", student.sizes());
  const int64_t B = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(V > 0, "student_logits must have at least one class (V = 0)");
  check_temperature_range(cfg.temperature, student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (target.has_value()) {
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, "target must be int64, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == B, "target must have shape [", B, "], got ",
                      target->sizes());
    TORCH_CHECK_VALUE(target->device() == student.device(), "target is on ", target->device(),
                      " but student_logits is on ", student.device());
  } else {
    TORCH_CHECK_VALUE(!cfg.hard(), "hard_weight > 0 needs target");
  }
  if (teacher.has_value()) {
    TORCH_CHECK_TYPE(teacher->scalar_type() == student.scalar_type(), "teacher_logits has dtype ",
                     teacher->scalar_type(), " but student_logits has ", student.scalar_type());
    TORCH_CHECK_VALUE(teacher->sizes() == student.sizes(), "teacher_logits must have shape ", student.sizes(),
                      ", got ", teacher->sizes());
    TORCH_CHECK_VALUE(teacher->device() == student.device(), "teacher_logits is on ", teacher->device(),
                      " but student_logits is on ", student.device());
  } else {
    TORCH_CHECK_VALUE(!cfg.needs_teacher(), "soft_weight > 0 or double_weight > 0 needs teacher_logits");
  }
}

// Argument checks of teacher_topk (every message names the argument); shared by
// the CPU kernel and the CUDA glue.
inline void check_teacher_topk_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t k, double temperature) {
  TORCH_CHECK_TYPE(at::isFloatingType(hidden.scalar_type()), "hidden must be a floating-point tensor, got ",
                   hidden.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must have shape [B, d], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight must have shape [V, d] with d = ",
                    hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight has dtype ", weight.scalar_type(),
                   " but hidden has ", hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "weight is on ", weight.device(), " but hidden is on ",
                    hidden.device());
  const int64_t V = weight.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "k must be in [1, V = ", V, "], got ", k);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  check_temperature_range(temperature, hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "bias must have shape [", V, "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), "bias has dtype ", bias->scalar_type(),
                     " but hidden has ", hidden.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), "bias is on ", bias->device(), " but hidden is on ",
                      hidden.device());
  }
}

// The backward's inputs from the forward: the upstream gradient of each row's
// loss and the row statistics the forward returned, on the device of `ref` (a
// tensor on another device would hand the kernels a pointer they cannot read).
inline void check_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& stats, int64_t B,
                                  at::ScalarType stats_type, const char* forward_op, const at::Tensor& ref,
                                  const char* ref_name) {
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == B, "grad_losses must have shape [", B,
                    "], got ", grad_losses.sizes());
  TORCH_CHECK_VALUE(grad_losses.device() == ref.device(), "grad_losses is on ", grad_losses.device(), " but ",
                    ref_name, " is on ", ref.device());
  TORCH_CHECK_VALUE(stats.device() == ref.device(), "stats is on ", stats.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == kNumRowStats &&
                        stats.scalar_type() == stats_type,
                    "stats must be the [", B, ", ", int64_t(kNumRowStats), "] ", stats_type, " tensor returned by ",
                    forward_op);
}

// Index tensors are checked value by value on the host: a tensor on another
// device (CUDA) is copied there first, a host sync that its glue makes only
// when asked to (KDFAST_CUDA_HOST_CHECKS=1; by default it checks on the device).
inline at::Tensor host_copy(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

// Rows whose target is ignore_index are skipped; any other target must be a class.
inline void check_target_values(const at::Tensor& target_in, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor target = host_copy(target_in);
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
