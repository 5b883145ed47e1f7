// CPU kernels of the dense distillation loss: logits [B, V] in, per-row losses out.
// Parallel over rows; each row is walked in chunks of kChunk classes (loss_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernel_utils.h"
#include "loss_math.h"

namespace kdfast::cpu {
namespace {

// Per-thread chunk buffers.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> f, s, log_w, grad;
  Scratch() : f(kChunk), s(kChunk), log_w(kChunk), grad(kChunk) {}
};

template <typename scalar_t, typename acc_t>
LogPartition<acc_t> teacher_lse(const scalar_t* s_row, int64_t V, Scratch<acc_t>& scratch) {
  LogSumExp<acc_t> lse;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    lse.update(load_chunk(s_row + c0, n, scratch.s.data()), n);
  }
  return lse.value();
}

std::tuple<at::Tensor, at::Tensor> distillation_loss_forward_cpu(
    const at::Tensor& student_logits, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& teacher_logits, double hard_weight, double soft_weight, double double_weight,
    double temperature, c10::string_view negative_weighting, double negative_scale, double negative_shift,
    double label_smoothing, int64_t ignore_index) {
  const LossConfig cfg0 = make_config(hard_weight, soft_weight, double_weight, temperature,
                                      std::string(negative_weighting), negative_scale, negative_shift,
                                      label_smoothing, ignore_index,
                                      student_logits.dim() == 2 ? student_logits.size(1) : 0);
  check_dense_inputs(cfg0, student_logits, target, teacher_logits);
  const int64_t B = student_logits.size(0), V = student_logits.size(1);
  const at::Tensor f_all = student_logits.contiguous();
  const at::Tensor s_all = cfg0.needs_teacher() ? teacher_logits->contiguous() : at::Tensor();
  const at::Tensor t_all = target.has_value() ? target->contiguous() : at::Tensor();
  if (t_all.defined()) check_target_values(t_all, V, ignore_index);

  const auto stats_type = student_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor losses = at::zeros({B}, student_logits.options().dtype(stats_type));
  at::Tensor stats = at::zeros({B, kNumRowStats}, student_logits.options().dtype(stats_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(),
                                  "distillation_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossConfig cfg = cfg0;
    const scalar_t* f_data = f_all.data_ptr<scalar_t>();
    const scalar_t* s_data = s_all.defined() ? s_all.data_ptr<scalar_t>() : nullptr;
    BatchTargets targets;
    targets.target = t_all.defined() ? t_all.data_ptr<int64_t>() : nullptr;
    targets.ignore_index = cfg.ignore_index;
    acc_t* loss_data = losses.data_ptr<acc_t>();
    acc_t* stats_data = stats.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t row = begin; row < end; ++row) {
        RowTarget y;
        if (!targets.row(row, y)) continue;  // an ignored row contributes nothing
        const scalar_t* f_row = f_data + row * V;
        const scalar_t* s_row = s_data ? s_data + row * V : nullptr;
        const LogPartition<acc_t> lse_s =
            cfg.needs_teacher_prepass() ? teacher_lse(s_row, V, scratch) : LogPartition<acc_t>{0, 0};
        RowAccumulator<acc_t> acc;
        for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
          const int64_t n = std::min(kChunk, V - c0);
          const acc_t* f = load_chunk(f_row + c0, n, scratch.f.data());
          const acc_t* s = s_row ? load_chunk(s_row + c0, n, scratch.s.data()) : nullptr;
          if (cfg.dbl()) log_negative_weights(cfg, s, n, lse_s, scratch.log_w.data());
          acc.update(cfg, f, s, scratch.log_w.data(), n, c0, y);
        }
        acc_t* row_stats = stats_data + row * kNumRowStats;
        acc.finish_stats(row_stats);
        loss_data[row] = acc.loss(cfg, row_stats, y);
      }
    });
  });
  return {losses.to(student_logits.scalar_type()), stats};
}

at::Tensor distillation_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& student_logits, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& teacher_logits, const at::Tensor& stats, double hard_weight,
    double soft_weight, double double_weight, double temperature, c10::string_view negative_weighting,
    double negative_scale, double negative_shift, double label_smoothing, int64_t ignore_index) {
  const LossConfig cfg0 = make_config(hard_weight, soft_weight, double_weight, temperature,
                                      std::string(negative_weighting), negative_scale, negative_shift,
                                      label_smoothing, ignore_index,
                                      student_logits.dim() == 2 ? student_logits.size(1) : 0);
  check_dense_inputs(cfg0, student_logits, target, teacher_logits);
  const int64_t B = student_logits.size(0), V = student_logits.size(1);
  const auto stats_type = student_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_backward_inputs(grad_losses, stats, B, stats_type, "distillation_loss_forward", student_logits,
                        "student_logits");
  const at::Tensor f_all = student_logits.contiguous();
  const at::Tensor s_all = cfg0.needs_teacher() ? teacher_logits->contiguous() : at::Tensor();
  const at::Tensor t_all = target.has_value() ? target->contiguous() : at::Tensor();
  const at::Tensor g_all = grad_losses.to(stats_type).contiguous();
  const at::Tensor st_all = stats.contiguous();
  at::Tensor grad = at::empty({B, V}, student_logits.options().memory_format(at::MemoryFormat::Contiguous));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_logits.scalar_type(),
                                  "distillation_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossConfig cfg = cfg0;
    const scalar_t* f_data = f_all.data_ptr<scalar_t>();
    const scalar_t* s_data = s_all.defined() ? s_all.data_ptr<scalar_t>() : nullptr;
    BatchTargets targets;
    targets.target = t_all.defined() ? t_all.data_ptr<int64_t>() : nullptr;
    targets.ignore_index = cfg.ignore_index;
    const acc_t* g_data = g_all.data_ptr<acc_t>();
    const acc_t* stats_data = st_all.data_ptr<acc_t>();
    scalar_t* grad_data = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* out_row = grad_data + row * V;
        RowTarget y;
        if (!targets.row(row, y)) {
          std::fill(out_row, out_row + V, scalar_t(0));
          continue;
        }
        const scalar_t* f_row = f_data + row * V;
        const scalar_t* s_row = s_data ? s_data + row * V : nullptr;
        const acc_t* row_stats = stats_data + row * kNumRowStats;
        for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
          const int64_t n = std::min(kChunk, V - c0);
          const acc_t* f = load_chunk(f_row + c0, n, scratch.f.data());
          const acc_t* s = s_row ? load_chunk(s_row + c0, n, scratch.s.data()) : nullptr;
          if (cfg.dbl()) {
            log_negative_weights(cfg, s, n, LogPartition<acc_t>{row_stats[kMaxS], row_stats[kLogSumS]},
                                 scratch.log_w.data());
          }
          acc_t* g = store_buffer(out_row + c0, scratch.grad.data());
          gradient_chunk(cfg, row_stats, f, s, scratch.log_w.data(), n, c0, y, g_data[row], g);
          store_chunk(g, n, out_row + c0);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("distillation_loss_forward", &distillation_loss_forward_cpu);
  m.impl("distillation_loss_backward", &distillation_loss_backward_cpu);
}

}  // namespace kdfast::cpu
