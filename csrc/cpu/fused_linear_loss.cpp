// CPU kernels of the fused linear distillation loss: the student's last linear
// layer and the whole loss in one op, never a [B, V] tensor.
//
// Classes are cut into tiles; threads take contiguous runs of tiles. For each
// tile the student logits F = H W_tile^T + b (and the teacher's, for an
// on-the-fly or top-k teacher) are made by one GEMM into a per-thread [B, tile]
// buffer and folded at once into per-thread row accumulators (loss_math.h),
// which are merged at the end. The backward recomputes each tile, forms
// G = dL/dF from the saved row statistics, and accumulates
// grad_hidden += G W_tile and grad_weight[tile] = G^T H; a tile whose every
// |G| entry is below filter_eps (times the row's upstream gradient) is skipped.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "fused_inputs.h"
#include "gemm.h"
#include "grad_buffers.h"
#include "kernel_utils.h"
#include "loss_math.h"
#include "tiles.h"

namespace kdfast::cpu {
namespace {

// The student's and an on-the-fly teacher's rows in bf16 when their tile GEMMs
// take the bf16 GEMM (tiles.h, bf16_rows), else undefined: chosen once per op.
struct LowRows {
  at::Tensor student, teacher;
  explicit LowRows(const FusedInputs& in)
      : student(bf16_rows(in.hidden_in, in.weight)),
        teacher(in.teacher == TeacherKind::Linear ? bf16_rows(in.teacher_hidden_in, in.teacher_weight)
                                                  : at::Tensor()) {}
};

// Per-thread tile buffers for the student and teacher logits of a tile.
// teacher_present[i] is false when a top-k teacher has no class of row i in the
// tile: the row's teacher terms then skip the tile's teacher work (q = 0, w = 1).
struct TileBuffers {
  at::Tensor f, s, w, wt, log_w;
  std::vector<char> teacher_present;
  LowRows low;
  TileBuffers(const FusedInputs& in, int64_t tile, const LowRows& low_rows) : low(low_rows) {
    const auto opts = in.hidden.options();
    f = at::empty({in.B * tile}, opts);
    if (in.teacher != TeacherKind::None) s = at::empty({in.B * tile}, opts);
    // weight tiles upcast to acc dtype, unless the bf16 GEMM reads them as they are
    if (in.weight.scalar_type() != in.acc_type && !low.student.defined()) w = at::empty({tile * in.d}, opts);
    if (in.teacher == TeacherKind::Linear && in.teacher_weight.scalar_type() != in.acc_type &&
        !low.teacher.defined()) {
      wt = at::empty({tile * in.teacher_weight.size(1)}, opts);
    }
    log_w = at::empty({tile}, opts);
    teacher_present.assign(in.B, 1);
  }

  // Row i's teacher logits in the current [B, n] tile, or null when absent.
  template <typename acc_t>
  const acc_t* teacher_row(int64_t i, int64_t n) const {
    if (!s.defined() || !teacher_present[i]) return nullptr;
    return s.data_ptr<acc_t>() + i * n;
  }
};

// Teacher logits of classes [c0, c0 + n) into the buffer s as [B, n].
void teacher_tile(const FusedInputs& in, int64_t c0, int64_t n, TileBuffers& buf) {
  const at::Tensor s = tile_view(buf.s, in.B, n);
  switch (in.teacher) {
    case TeacherKind::Dense:
      s.copy_(in.teacher_logits.narrow(1, c0, n));
      break;
    case TeacherKind::Linear:
      linear_tile(in.teacher_hidden, buf.low.teacher, in.teacher_weight, in.teacher_bias, c0, n, buf.wt, s);
      break;
    case TeacherKind::TopK: {
      // the stored logits at their classes, -inf elsewhere: softmax over the tile's
      // top-k entries (renormalized over k), weight 1 outside
      // only rows with a top-k class in the tile get their -inf row written
      const int64_t k = in.topk_indices.size(1);
      const int64_t* idx = in.topk_indices.data_ptr<int64_t>();
      AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "topk_tile", [&] {
        const scalar_t* logits = in.topk_logits.data_ptr<scalar_t>();
        scalar_t* out = s.data_ptr<scalar_t>();
        for (int64_t i = 0; i < in.B; ++i) {
          bool present = false;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t c = idx[i * k + j];
            if (c < c0 || c >= c0 + n) continue;
            if (!present) std::fill(out + i * n, out + (i + 1) * n, -std::numeric_limits<scalar_t>::infinity());
            present = true;
            out[i * n + (c - c0)] = logits[i * k + j];
          }
          buf.teacher_present[i] = present;
        }
      });
      break;
    }
    case TeacherKind::None:
      break;
  }
}

// log w needs LSE(s) over all classes for one_minus_prob weights: stored with a
// top-k teacher, else one pass of teacher tiles before the main pass.
template <typename acc_t>
std::vector<LogPartition<acc_t>> teacher_log_partition(const LossConfig& cfg, const FusedInputs& in, int64_t tile,
                                                       const LowRows& low) {
  std::vector<LogPartition<acc_t>> lse(in.B, LogPartition<acc_t>{0, 0});
  if (!cfg.needs_teacher_prepass()) return lse;
  if (in.teacher == TeacherKind::TopK) {
    for (int64_t i = 0; i < in.B; ++i) lse[i] = {in.topk_lse.data_ptr<acc_t>()[i], acc_t(0)};
    return lse;
  }
  const int64_t num_tiles = (in.V + tile - 1) / tile;
  OrderedParts<std::vector<LogSumExp<acc_t>>> parts;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: again in each worker
    TileBuffers buf(in, tile, low);
    std::vector<LogSumExp<acc_t>> part(in.B);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, n = std::min(tile, in.V - c0);
      teacher_tile(in, c0, n, buf);
      const acc_t* s = buf.s.data_ptr<acc_t>();
      for (int64_t i = 0; i < in.B; ++i) part[i].update(s + i * n, n);
    }
    parts.add(begin, std::move(part));
  });
  std::vector<LogSumExp<acc_t>> total(in.B);
  parts.fold([&](const std::vector<LogSumExp<acc_t>>& part) {
    for (int64_t i = 0; i < in.B; ++i) total[i].merge(part[i]);
  });
  for (int64_t i = 0; i < in.B; ++i) lse[i] = total[i].value();
  return lse;
}

template <typename acc_t>
void forward_kernel(const LossConfig& cfg, const FusedInputs& in, int64_t tile, at::Tensor& losses,
                    at::Tensor& stats) {
  const BatchTargets targets = in.targets(cfg.ignore_index);
  const LowRows low(in);
  const std::vector<LogPartition<acc_t>> lse_s = teacher_log_partition<acc_t>(cfg, in, tile, low);
  const int64_t num_tiles = (in.V + tile - 1) / tile;
  OrderedParts<std::vector<RowAccumulator<acc_t>>> parts;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: again in each worker
    TileBuffers buf(in, tile, low);
    std::vector<RowAccumulator<acc_t>> part(in.B);
    acc_t* log_w = buf.log_w.data_ptr<acc_t>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, n = std::min(tile, in.V - c0);
      linear_tile(in.hidden, buf.low.student, in.weight, in.bias, c0, n, buf.w, tile_view(buf.f, in.B, n));
      if (cfg.needs_teacher()) teacher_tile(in, c0, n, buf);
      const acc_t* f = buf.f.data_ptr<acc_t>();
      for (int64_t i = 0; i < in.B; ++i) {
        RowTarget y;
        if (!targets.row(i, y)) continue;
        const acc_t* s_row = buf.teacher_row<acc_t>(i, n);
        if (cfg.dbl() && s_row) log_negative_weights(cfg, s_row, n, lse_s[i], log_w);
        part[i].update(cfg, f + i * n, s_row, s_row ? log_w : nullptr, n, c0, y);
      }
    }
    parts.add(begin, std::move(part));
  });
  std::vector<RowAccumulator<acc_t>> total(in.B);
  parts.fold([&](const std::vector<RowAccumulator<acc_t>>& part) {
    for (int64_t i = 0; i < in.B; ++i) total[i].merge(cfg, part[i]);
  });
  acc_t* loss_data = losses.data_ptr<acc_t>();
  acc_t* stats_data = stats.data_ptr<acc_t>();
  for (int64_t i = 0; i < in.B; ++i) {
    RowTarget y;
    if (!targets.row(i, y)) continue;
    total[i].finish_stats(stats_data + i * kNumRowStats);
    loss_data[i] = total[i].loss(cfg, stats_data + i * kNumRowStats, y);
  }
}

// The log-partition log w is computed against: the row's LSE(s) for a dense or
// on-the-fly teacher, the stored one for a top-k teacher.
template <typename acc_t>
LogPartition<acc_t> weights_lse(const FusedInputs& in, const acc_t* row_stats, int64_t row) {
  if (in.teacher == TeacherKind::TopK) return {in.topk_lse.data_ptr<acc_t>()[row], acc_t(0)};
  return {row_stats[kMaxS], row_stats[kLogSumS]};
}

// A kept tile's gradient GEMMs by the bf16 GEMM (gemm.h), for bf16 inputs:
// grad_hidden += G W[c0:c0+n] and gw [n, d] = G^T H, with the float32 G [B, n]
// split into bf16 hi + lo (g_hi, g_lo: buffers of at least B n).
void gradient_gemms_bf16(const at::Tensor& G, const at::Tensor& weight, const at::Tensor& hidden_low, int64_t c0,
                         at::Tensor& g_hi, at::Tensor& g_lo, at::Tensor& grad_hidden, at::Tensor& gw) {
  const int64_t B = G.size(0), n = G.size(1), d = weight.size(1);
  at::BFloat16* hi = g_hi.data_ptr<at::BFloat16>();
  at::BFloat16* lo = g_lo.data_ptr<at::BFloat16>();
  split_bf16(G.data_ptr<float>(), B * n, hi, lo);
  const at::BFloat16* w = weight.data_ptr<at::BFloat16>() + c0 * d;
  const at::BFloat16* h = hidden_low.data_ptr<at::BFloat16>();
  float* gh = grad_hidden.data_ptr<float>();
  float* gw_data = gw.data_ptr<float>();
  for (const at::BFloat16* part : {hi, lo}) {
    const float beta = part == hi ? 0.0f : 1.0f;
    gemm_bf16_f32(false, false, B, d, n, part, n, w, d, 1.0f, gh, d);          // [B, n] [n, d]
    gemm_bf16_f32(true, false, n, d, B, part, n, h, d, beta, gw_data, d);      // [n, B] [B, d]
  }
}

template <typename acc_t>
void backward_kernel(const LossConfig& cfg, const FusedInputs& in, int64_t tile, double filter_eps,
                     const at::Tensor& grad_losses, const at::Tensor& stats, at::Tensor& grad_hidden,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const BatchTargets targets = in.targets(cfg.ignore_index);
  const int64_t num_tiles = (in.V + tile - 1) / tile;
  const acc_t* g_data = grad_losses.data_ptr<acc_t>();
  const acc_t* stats_data = stats.data_ptr<acc_t>();
  const bool weight_in_acc = grad_weight.scalar_type() == in.acc_type;
  const LowRows low(in);
  OrderedParts<at::Tensor> parts;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: again in each worker
    TileBuffers buf(in, tile, low);
    at::Tensor g_buf = at::empty({in.B * tile}, in.hidden.options());
    at::Tensor gw_buf = weight_in_acc ? at::Tensor() : at::empty({tile, in.d}, in.hidden.options());
    at::Tensor part_grad_hidden = at::zeros({in.B, in.d}, in.hidden.options());
    // dL/dF as bf16 hi + lo for the bf16 GEMMs
    at::Tensor g_hi, g_lo;
    if (low.student.defined()) {
      g_hi = at::empty({in.B * tile}, low.student.options());
      g_lo = at::empty({in.B * tile}, low.student.options());
    }
    acc_t* log_w = buf.log_w.data_ptr<acc_t>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, n = std::min(tile, in.V - c0);
      linear_tile(in.hidden, buf.low.student, in.weight, in.bias, c0, n, buf.w, tile_view(buf.f, in.B, n));
      if (cfg.needs_teacher()) teacher_tile(in, c0, n, buf);
      const acc_t* f = buf.f.data_ptr<acc_t>();
      acc_t* g = g_buf.data_ptr<acc_t>();
      bool keep = filter_eps <= 0;
      for (int64_t i = 0; i < in.B; ++i) {
        acc_t* g_row = g + i * n;
        RowTarget y;
        if (!targets.row(i, y)) {
          std::fill(g_row, g_row + n, acc_t(0));
          continue;
        }
        const acc_t* row_stats = stats_data + i * kNumRowStats;
        const acc_t* s_row = buf.teacher_row<acc_t>(i, n);
        if (cfg.dbl() && s_row) log_negative_weights(cfg, s_row, n, weights_lse(in, row_stats, i), log_w);
        gradient_chunk(cfg, row_stats, f + i * n, s_row, s_row ? log_w : nullptr, n, c0, y, g_data[i], g_row);
        if (!keep) {
          const acc_t limit = static_cast<acc_t>(filter_eps) * std::abs(g_data[i]);
          for (int64_t j = 0; j < n && !keep; ++j) keep = !(std::abs(g_row[j]) <= limit);  // NaN keeps
        }
      }
      at::Tensor gw_tile = grad_weight.narrow(0, c0, n);
      if (!keep) {  // gradient filtering: every entry negligible
        gw_tile.zero_();
        if (grad_bias.defined()) grad_bias.narrow(0, c0, n).zero_();
        continue;
      }
      const at::Tensor G = tile_view(g_buf, in.B, n);
      if (low.student.defined()) {
        at::Tensor gw = gw_buf.narrow(0, 0, n);
        gradient_gemms_bf16(G, in.weight, low.student, c0, g_hi, g_lo, part_grad_hidden, gw);
        gw_tile.copy_(gw);
        if (grad_bias.defined()) grad_bias.narrow(0, c0, n).copy_(G.sum(0));
        continue;
      }
      at::Tensor w_tile = in.weight.narrow(0, c0, n);
      if (!weight_in_acc) {
        // buf.w already holds this tile in acc dtype (linear_tile converted it)
        w_tile = buf.w.view(-1).narrow(0, 0, n * in.d).view({n, in.d});
      }
      part_grad_hidden.addmm_(G, w_tile);
      if (weight_in_acc) {
        at::mm_out(gw_tile, G.t(), in.hidden);
      } else {
        at::Tensor gw = gw_buf.narrow(0, 0, n);
        at::mm_out(gw, G.t(), in.hidden);
        gw_tile.copy_(gw);
      }
      if (grad_bias.defined()) grad_bias.narrow(0, c0, n).copy_(G.sum(0));
    }
    parts.add(begin, std::move(part_grad_hidden));
  });
  parts.fold([&](const at::Tensor& part) { grad_hidden.add_(part); });
}

std::tuple<at::Tensor, at::Tensor> fused_linear_loss_forward_cpu(KDFAST_FUSED_INPUT_ARGS, KDFAST_LOSS_PARAMS,
                                                                 int64_t tile_size, double /*filter_eps*/) {
  // the tile GEMMs below must not re-enter autograd (the inputs require grad)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // (not structured bindings: C++17 lambdas, as AT_DISPATCH's, cannot capture them)
  const auto call = prepare_call(true, KDFAST_FUSED_INPUT_NAMES, KDFAST_LOSS_NAMES);
  const LossConfig& cfg = call.first;
  const FusedInputs& in = call.second;
  const int64_t tile = choose_tile(tile_size, in.B, in.V);
  at::Tensor losses = at::zeros({in.B}, in.hidden.options());
  at::Tensor stats = at::zeros({in.B, kNumRowStats}, in.hidden.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc_type, "fused_linear_loss_forward_cpu",
                             [&] { forward_kernel<scalar_t>(cfg, in, tile, losses, stats); });
  return {losses.to(hidden.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_loss_backward_cpu(
    const at::Tensor& grad_losses, KDFAST_FUSED_INPUT_ARGS, const at::Tensor& stats, KDFAST_LOSS_PARAMS,
    int64_t tile_size, double filter_eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto call = prepare_call(true, KDFAST_FUSED_INPUT_NAMES, KDFAST_LOSS_NAMES);
  const LossConfig& cfg = call.first;
  const FusedInputs& in = call.second;
  check_backward_inputs(grad_losses, stats, in.B, in.acc_type, "fused_linear_loss_forward", hidden, "student_hidden");
  const int64_t tile = choose_tile(tile_size, in.B, in.V);
  const at::Tensor g = grad_losses.to(in.acc_type).contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor grad_hidden = at::zeros({in.B, in.d}, in.hidden.options());
  // V x d, the one large output (grad_buffers.h); the tile loop writes every row
  at::Tensor grad_weight = empty_grad_buffer({in.V, in.d}, weight.options());
  at::Tensor grad_bias = bias.has_value() ? at::empty({in.V}, in.hidden.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.acc_type, "fused_linear_loss_backward_cpu", [&] {
    backward_kernel<scalar_t>(cfg, in, tile, filter_eps, g, st, grad_hidden, grad_weight, grad_bias);
  });
  return {grad_hidden.to(hidden.scalar_type()), grad_weight,
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("fused_linear_loss_forward", &fused_linear_loss_forward_cpu);
  m.impl("fused_linear_loss_backward", &fused_linear_loss_backward_cpu);
}

}  // namespace kdfast::cpu
