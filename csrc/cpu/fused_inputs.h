// The fused linear loss's op arguments, checked and unpacked: shared by the CPU
// kernels (fused_linear_loss.cpp) and the CUDA glue (csrc/cuda_ops.cpp).
// Shape, dtype and device checks are the same on every device; index values
// are checked on the host, after a copy there (a host sync) for tensors on
// another device (kernel_utils.h, host_copy), unless the caller checks them
// itself (check_index_values = false: the CUDA glue checks them on the device,
// csrc/cuda/index_checks.h, unless KDFAST_CUDA_HOST_CHECKS=1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernel_utils.h"
#include "loss_math.h"

namespace kdfast::cpu {

using OptTensor = std::optional<at::Tensor>;

enum class TeacherKind { None, Dense, Linear, TopK };

// The op's tensors, checked, contiguous, with the small ones in acc dtype.
struct FusedInputs {
  int64_t B = 0, V = 0, d = 0;
  at::ScalarType acc_type = at::kFloat;
  at::Tensor hidden;          // [B, d] acc
  at::Tensor hidden_in;       // [B, d] input dtype (GEMMs in bf16/fp16 on CUDA)
  at::Tensor weight;          // [V, d] input dtype
  at::Tensor bias;            // [V] acc or undefined
  at::Tensor target, indptr, indices;
  TeacherKind teacher = TeacherKind::None;
  at::Tensor teacher_logits;  // [B, V] input dtype
  at::Tensor teacher_hidden;  // [B, d_t] acc
  at::Tensor teacher_hidden_in;  // [B, d_t] input dtype (CUDA GEMMs)
  at::Tensor teacher_weight;  // [V, d_t] input dtype
  at::Tensor teacher_bias;    // [V] acc or undefined
  at::Tensor topk_indices;    // [B, k] int64
  at::Tensor topk_logits;     // [B, k] acc
  at::Tensor topk_lse;        // [B] acc

  BatchTargets targets(int64_t ignore_index) const {
    BatchTargets t;
    t.target = target.defined() ? target.data_ptr<int64_t>() : nullptr;
    t.indptr = indptr.defined() ? indptr.data_ptr<int64_t>() : nullptr;
    t.indices = indices.defined() ? indices.data_ptr<int64_t>() : nullptr;
    t.ignore_index = ignore_index;
    return t;
  }
};

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but student_hidden is on ",
                    ref.device());
}

inline void check_bias(const at::Tensor& bias, const char* name, int64_t V, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == V, name, " must have shape [", V, "], got ", bias.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == ref.scalar_type(), name, " has dtype ", bias.scalar_type(),
                   " but student_hidden has ", ref.scalar_type());
  check_same_device(bias, name, ref);
}

inline void check_csr_targets(const at::Tensor& indptr_in, const at::Tensor& indices_in, int64_t B, int64_t V) {
  const at::Tensor indptr = host_copy(indptr_in), indices = host_copy(indices_in);
  const int64_t* p = indptr.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0, "target.indptr[0] must be 0, got ", p[0]);
  TORCH_CHECK_VALUE(p[B] == indices.numel(), "target.indptr[-1] = ", p[B], " but target.indices has ",
                    indices.numel(), " entries");
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(p[i + 1] >= p[i], "target.indptr must be non-decreasing; indptr[", i + 1, "] = ", p[i + 1],
                      " < indptr[", i, "] = ", p[i]);
    for (int64_t j = p[i]; j < p[i + 1]; ++j) {
      TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < V, "target.indices[", j, "] = ", idx[j], " (row ", i,
                        ") is outside [0, ", V, ")");
      TORCH_CHECK_VALUE(j == p[i] || idx[j] >= idx[j - 1], "target.indices of row ", i,
                        " must be sorted ascending; got ", idx[j - 1], " before ", idx[j]);
    }
  }
}

inline void check_topk_indices(const at::Tensor& indices_in, int64_t V) {
  const at::Tensor indices = host_copy(indices_in);
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t k = indices.size(1);
  for (int64_t j = 0; j < indices.numel(); ++j) {
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < V, "teacher_topk.indices[", j / k, ", ", j % k, "] = ", idx[j],
                      " is outside [0, ", V, ")");
  }
  // a row's k classes are distinct: a repeated one would hold two teacher logits
  std::vector<int64_t> row(k);
  for (int64_t i = 0; i < indices.size(0); ++i) {
    std::copy(idx + i * k, idx + (i + 1) * k, row.begin());
    std::sort(row.begin(), row.end());
    const auto repeated = std::adjacent_find(row.begin(), row.end());
    TORCH_CHECK_VALUE(repeated == row.end(), "teacher_topk.indices[", i, "] holds class ", *repeated,
                      " more than once");
  }
}

inline FusedInputs prepare_inputs(const LossConfig& cfg, const at::Tensor& hidden, const at::Tensor& weight,
                                  const OptTensor& bias, const OptTensor& target, const OptTensor& target_indptr,
                                  const OptTensor& target_indices, const OptTensor& teacher_logits,
                                  const OptTensor& teacher_hidden, const OptTensor& teacher_weight,
                                  const OptTensor& teacher_bias, const OptTensor& topk_indices,
                                  const OptTensor& topk_logits, const OptTensor& topk_lse,
                                  bool check_index_values = true) {
  FusedInputs in;
  TORCH_CHECK_TYPE(at::isFloatingType(hidden.scalar_type()), "student_hidden must be a floating-point tensor, got ",
                   hidden.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2, "student_hidden must have shape [B, d], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "student_weight must have shape [V, d], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "student_weight has dtype ", weight.scalar_type(),
                   " but student_hidden has ", hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "student_weight has d = ", weight.size(1),
                    " but student_hidden has d = ", hidden.size(1));
  check_same_device(weight, "student_weight", hidden);
  in.B = hidden.size(0);
  in.V = weight.size(0);
  in.d = hidden.size(1);
  TORCH_CHECK_VALUE(in.V > 0, "student_weight must have at least one class (V = 0)");
  TORCH_CHECK_VALUE(cfg.num_classes == in.V, "internal: num_classes mismatch");
  in.acc_type = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_temperature_range(cfg.temperature, in.acc_type);
  in.hidden = hidden.to(in.acc_type).contiguous();
  in.hidden_in = hidden.contiguous();
  in.weight = weight.contiguous();
  if (bias.has_value()) {
    check_bias(*bias, "student_bias", in.V, hidden);
    in.bias = bias->to(in.acc_type).contiguous();
  }

  TORCH_CHECK_VALUE(!(target.has_value() && target_indptr.has_value()),
                    "pass either an int target or a MultiTarget, not both");
  TORCH_CHECK_VALUE(target_indptr.has_value() == target_indices.has_value(),
                    "a MultiTarget needs both indptr and indices");
  if (target.has_value()) {
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, "target must be int64, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == in.B, "target must have shape [", in.B, "], got ",
                      target->sizes());
    check_same_device(*target, "target", hidden);
    in.target = target->contiguous();
    if (check_index_values) check_target_values(in.target, in.V, cfg.ignore_index);
  } else if (target_indptr.has_value()) {
    TORCH_CHECK_TYPE(target_indptr->scalar_type() == at::kLong && target_indices->scalar_type() == at::kLong,
                     "target.indptr and target.indices must be int64");
    TORCH_CHECK_VALUE(target_indptr->dim() == 1 && target_indptr->size(0) == in.B + 1,
                      "target.indptr must have shape [B + 1] = [", in.B + 1, "], got ", target_indptr->sizes());
    TORCH_CHECK_VALUE(target_indices->dim() == 1, "target.indices must be 1-D, got ", target_indices->sizes());
    check_same_device(*target_indptr, "target.indptr", hidden);
    check_same_device(*target_indices, "target.indices", hidden);
    in.indptr = target_indptr->contiguous();
    in.indices = target_indices->contiguous();
    if (check_index_values) check_csr_targets(in.indptr, in.indices, in.B, in.V);
  } else {
    TORCH_CHECK_VALUE(!cfg.hard(), "hard_weight > 0 needs target");
  }

  const int forms = int(teacher_logits.has_value()) + int(teacher_hidden.has_value() || teacher_weight.has_value()) +
                    int(topk_indices.has_value());
  TORCH_CHECK_VALUE(forms <= 1, "give the teacher in one form only: teacher_logits, "
                                "teacher_hidden + teacher_weight, or teacher_topk");
  if (!cfg.needs_teacher()) return in;  // a teacher that no term reads is not read
  TORCH_CHECK_VALUE(forms == 1, "soft_weight > 0 or double_weight > 0 needs a teacher: teacher_logits, "
                                "teacher_hidden + teacher_weight, or teacher_topk");
  if (teacher_logits.has_value()) {
    in.teacher = TeacherKind::Dense;
    TORCH_CHECK_TYPE(teacher_logits->scalar_type() == hidden.scalar_type(), "teacher_logits has dtype ",
                     teacher_logits->scalar_type(), " but student_hidden has ", hidden.scalar_type());
    TORCH_CHECK_VALUE(teacher_logits->dim() == 2 && teacher_logits->size(0) == in.B &&
                          teacher_logits->size(1) == in.V,
                      "teacher_logits must have shape [B, V] = [", in.B, ", ", in.V, "], got ",
                      teacher_logits->sizes());
    check_same_device(*teacher_logits, "teacher_logits", hidden);
    in.teacher_logits = teacher_logits->contiguous();
  } else if (teacher_hidden.has_value() || teacher_weight.has_value()) {
    in.teacher = TeacherKind::Linear;
    TORCH_CHECK_VALUE(teacher_hidden.has_value() && teacher_weight.has_value(),
                      "an on-the-fly teacher needs both teacher_hidden and teacher_weight");
    TORCH_CHECK_TYPE(teacher_hidden->scalar_type() == hidden.scalar_type() &&
                         teacher_weight->scalar_type() == hidden.scalar_type(),
                     "teacher_hidden and teacher_weight must have the dtype of student_hidden (",
                     hidden.scalar_type(), "), got ", teacher_hidden->scalar_type(), " and ",
                     teacher_weight->scalar_type());
    TORCH_CHECK_VALUE(teacher_hidden->dim() == 2 && teacher_hidden->size(0) == in.B,
                      "teacher_hidden must have shape [B, d_t] with B = ", in.B, ", got ", teacher_hidden->sizes());
    TORCH_CHECK_VALUE(teacher_weight->dim() == 2 && teacher_weight->size(0) == in.V &&
                          teacher_weight->size(1) == teacher_hidden->size(1),
                      "teacher_weight must have shape [V, d_t] = [", in.V, ", ", teacher_hidden->size(1),
                      "], got ", teacher_weight->sizes());
    check_same_device(*teacher_hidden, "teacher_hidden", hidden);
    check_same_device(*teacher_weight, "teacher_weight", hidden);
    in.teacher_hidden = teacher_hidden->to(in.acc_type).contiguous();
    in.teacher_hidden_in = teacher_hidden->contiguous();
    in.teacher_weight = teacher_weight->contiguous();
    if (teacher_bias.has_value()) {
      check_bias(*teacher_bias, "teacher_bias", in.V, hidden);
      in.teacher_bias = teacher_bias->to(in.acc_type).contiguous();
    }
  } else {
    in.teacher = TeacherKind::TopK;
    TORCH_CHECK_VALUE(topk_logits.has_value() && topk_lse.has_value(),
                      "teacher_topk needs indices, logits and lse");
    TORCH_CHECK_TYPE(topk_indices->scalar_type() == at::kLong, "teacher_topk.indices must be int64, got ",
                     topk_indices->scalar_type());
    TORCH_CHECK_TYPE(at::isFloatingType(topk_logits->scalar_type()) && at::isFloatingType(topk_lse->scalar_type()),
                     "teacher_topk.logits and teacher_topk.lse must be floating point");
    TORCH_CHECK_VALUE(topk_indices->dim() == 2 && topk_indices->size(0) == in.B,
                      "teacher_topk.indices must have shape [B, k] with B = ", in.B, ", got ",
                      topk_indices->sizes());
    TORCH_CHECK_VALUE(topk_indices->size(1) >= 1 && topk_indices->size(1) <= in.V, "teacher_topk has k = ",
                      topk_indices->size(1), ", outside [1, V = ", in.V, "]");
    TORCH_CHECK_VALUE(topk_logits->sizes() == topk_indices->sizes(), "teacher_topk.logits must have shape ",
                      topk_indices->sizes(), ", got ", topk_logits->sizes());
    TORCH_CHECK_VALUE(topk_lse->dim() == 1 && topk_lse->size(0) == in.B, "teacher_topk.lse must have shape [",
                      in.B, "], got ", topk_lse->sizes());
    check_same_device(*topk_indices, "teacher_topk.indices", hidden);
    check_same_device(*topk_logits, "teacher_topk.logits", hidden);
    check_same_device(*topk_lse, "teacher_topk.lse", hidden);
    in.topk_indices = topk_indices->contiguous();
    if (check_index_values) check_topk_indices(in.topk_indices, in.V);
    in.topk_logits = topk_logits->to(in.acc_type).contiguous();
    in.topk_lse = topk_lse->to(in.acc_type).contiguous();
  }
  return in;
}

// Unpacked op arguments shared by forward and backward.
#define KDFAST_FUSED_INPUT_ARGS                                                                              \
  const at::Tensor &hidden, const at::Tensor &weight, const OptTensor &bias, const OptTensor &target,        \
      const OptTensor &target_indptr, const OptTensor &target_indices, const OptTensor &teacher_logits,      \
      const OptTensor &teacher_hidden, const OptTensor &teacher_weight, const OptTensor &teacher_bias,       \
      const OptTensor &topk_indices, const OptTensor &topk_logits, const OptTensor &topk_lse
#define KDFAST_LOSS_PARAMS                                                                                   \
  double hard_weight, double soft_weight, double double_weight, double temperature,                         \
      c10::string_view negative_weighting, double negative_scale, double negative_shift,                     \
      double label_smoothing, int64_t ignore_index
// Their names, to forward them.
#define KDFAST_FUSED_INPUT_NAMES                                                                             \
  hidden, weight, bias, target, target_indptr, target_indices, teacher_logits, teacher_hidden, teacher_weight, \
      teacher_bias, topk_indices, topk_logits, topk_lse
#define KDFAST_LOSS_NAMES                                                                                    \
  hard_weight, soft_weight, double_weight, temperature, negative_weighting, negative_scale, negative_shift,   \
      label_smoothing, ignore_index

// A fused op's loss keywords and tensors, checked: the loss config and the
// unpacked inputs every device's forward and backward start from.
inline std::pair<LossConfig, FusedInputs> prepare_call(bool check_index_values, KDFAST_FUSED_INPUT_ARGS,
                                                       KDFAST_LOSS_PARAMS) {
  const LossConfig cfg =
      make_config(hard_weight, soft_weight, double_weight, temperature, std::string(negative_weighting),
                  negative_scale, negative_shift, label_smoothing, ignore_index, weight.dim() == 2 ? weight.size(0) : 0);
  return {cfg, prepare_inputs(cfg, KDFAST_FUSED_INPUT_NAMES, check_index_values)};
}

}  // namespace kdfast::cpu
