// Torch glue of the CUDA kernels (csrc/cuda/*.cu): argument checks, tile loops
// and GEMMs, registered with TORCH_LIBRARY_IMPL(kdfast, CUDA, m). Built only for
// a CUDA torch (setup.py); `make cuda-check` syntax-checks it anywhere nvcc is.
//
// The fused linear loss takes one of two paths:
// - fused (csrc/cuda/fused_linear.cu), for bf16 / fp16 inputs with d <= 128,
//   and float ones where torch allows TF32 (fused_input) with d <= 112, or 64
//   with a teacher (float's tiles take twice the bytes; the forward and the
//   backward take one path, fused_linear_supported): logit tiles made by
//   tensor cores in shared memory and reduced there, so no logits reach global
//   memory; a block whose gradient entries are all negligible skips its
//   gradient GEMMs. KDFAST_CUDA_FUSED=0 turns it off (for comparisons).
// - tiled, for the rest (exact float32 among them): each class tile's logits
//   are made by a cuBLAS GEMM (at::mm; bf16/fp16 on tensor cores with float32
//   output, float32 as torch's TF32 setting says) into a [B, tile] float buffer
//   that the kernels of csrc/cuda/loss_tiles.cu reduce; tiles run in order on
//   the current stream.
//   So the logits of one tile, not of the batch, reach global memory. The
//   backward's gradient filter gives the CPU's results (a tile whose every
//   dL/dF entry is negligible adds nothing), but its GEMMs still run.
// The one_minus_prob weights' pre-pass over a dense or linear teacher (its
// log-partition) runs fused or tiled with the rest. Teacher top-k labeling takes
// the same two paths: fused for bf16 / fp16 (and TF32 float), tiled (cuBLAS, then
// csrc/cuda/teacher_topk.cu) for the rest.
// The forward ops check index values on the device (csrc/cuda/index_checks.h:
// a bad value stops the kernel with a device-side assertion, as PyTorch's own
// CUDA index checks do), so no op waits for the device; KDFAST_CUDA_HOST_CHECKS=1
// checks them on the host instead (catchable ValueErrors, one sync a call). The
// backward ops do not check them again.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "cpu/fused_inputs.h"
#include "cpu/kernel_utils.h"
#include "cpu/loss_math.h"
#include "cpu/tiles.h"
#include "cuda/fused_linear.h"
#include "cuda/index_checks.h"
#include "cuda/loss_tiles.h"
#include "cuda/teacher_topk.h"

namespace kdfast::cuda_glue {
namespace {

using namespace kdfast::cuda;  // LossTerms, Targets and the kernel launchers
using cpu::FusedInputs;
using cpu::LossConfig;
using cpu::TeacherKind;
using OptTensor = std::optional<at::Tensor>;

LossTerms loss_terms(const LossConfig& cfg) {
  LossTerms t;
  t.hard_weight = cfg.hard_weight;
  t.soft_weight = cfg.soft_weight;
  t.double_weight = cfg.double_weight;
  t.temperature = cfg.temperature;
  t.negative_weighting =
      cfg.negative_weighting == cpu::NegativeWeighting::Sigmoid ? kWeightSigmoid : kWeightOneMinusProb;
  t.negative_scale = cfg.negative_scale;
  t.negative_shift = cfg.negative_shift;
  t.label_smoothing = cfg.label_smoothing;
  t.num_classes = cfg.num_classes;
  return t;
}

Targets device_targets(const FusedInputs& in, int64_t ignore_index) {
  const cpu::BatchTargets b = in.targets(ignore_index);
  Targets t;
  t.target = b.target;
  t.indptr = b.indptr;
  t.indices = b.indices;
  t.num_indices = in.indices.defined() ? in.indices.numel() : 0;
  t.ignore_index = b.ignore_index;
  return t;
}

// Whether environment variable `name` is set to `value` (read at each call).
bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, value) == 0;
}

// KDFAST_CUDA_HOST_CHECKS=1: index values are checked on the host (a copy there,
// one sync; errors are ValueErrors that leave the CUDA context usable), except
// while the current stream is captured into a CUDA graph, where that copy is not
// allowed. Otherwise, and then, they are checked on the device (index_checks.h).
bool host_index_checks() {
  return env_is("KDFAST_CUDA_HOST_CHECKS", "1") &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The device-side checks of what prepare_call did not check on the host.
void check_index_values_on_device(const FusedInputs& in, int64_t ignore_index) {
  if (in.target.defined())
    check_target_values(in.target.data_ptr<int64_t>(), in.B, in.V, ignore_index, current_stream());
  if (in.indptr.defined())
    check_csr_targets(in.indptr.data_ptr<int64_t>(), in.indices.data_ptr<int64_t>(), in.B, in.indices.numel(), in.V,
                      current_stream());
  if (in.topk_indices.defined())
    check_topk_indices(in.topk_indices.data_ptr<int64_t>(), in.B, in.topk_indices.size(1), in.V, current_stream());
}

// Class tile: the [B, tile] student, teacher and gradient buffers in about
// 96 MiB, a multiple of 128 (at most V).
int64_t cuda_tile(int64_t requested, int64_t B, int64_t V, int64_t acc_bytes) {
  // the kernels run one block per row, and a grid has at most 2^31 - 1 blocks
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), "a batch of ", B,
                    " rows is over the 2^31 - 1 the CUDA kernels take at once; split it");
  int64_t tile = requested;
  if (tile <= 0) {
    const int64_t budget_bytes = int64_t(96) << 20;
    tile = budget_bytes / (std::max<int64_t>(B, 1) * 3 * acc_bytes);
    tile = std::clamp<int64_t>(tile / 128 * 128, 128, 65536);
  }
  return std::min(tile, V);
}

// A failed kernel launch (bad configuration) surfaces here, once per op, as an
// error naming the op rather than at some later call.
void check_launches() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// out [B, n] (acc dtype) = x W[c0:c0+n]^T + b[c0:c0+n]; x and W in the input
// dtype: a bf16/fp16 GEMM writes float32 directly.
void linear_tile(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t c0, int64_t n,
                 at::Tensor out) {
  const at::Tensor w = weight.narrow(0, c0, n);
  if (x.scalar_type() == out.scalar_type()) {
    at::mm_out(out, x, w.t());
  } else {
    at::mm_out(out, x, w.t(), out.scalar_type());
  }
  if (bias.defined()) out.add_(bias.narrow(0, c0, n));
}

// The teacher logits of classes [c0, c0 + n) into s [B, n].
template <typename acc_t>
void teacher_tile(const FusedInputs& in, int64_t c0, int64_t n, at::Tensor s) {
  switch (in.teacher) {
    case TeacherKind::Dense:
      s.copy_(in.teacher_logits.narrow(1, c0, n));
      break;
    case TeacherKind::Linear:
      linear_tile(in.teacher_hidden_in, in.teacher_weight, in.teacher_bias, c0, n, s);
      break;
    case TeacherKind::TopK:
      topk_teacher_tile<acc_t>(in.topk_indices.data_ptr<int64_t>(), in.topk_logits.data_ptr<acc_t>(), in.B,
                               in.topk_indices.size(1), c0, n, s.data_ptr<acc_t>(), current_stream());
      break;
    case TeacherKind::None:
      break;
  }
}

// A stored top-k teacher's log-partition lse [B] as the kernels take it: [B, 2]
// (max, log-sum) = (lse, 0).
at::Tensor stored_lse_pairs(const at::Tensor& lse) { return at::stack({lse, at::zeros_like(lse)}, 1).contiguous(); }

// [B, 2] (max, log-sum) of the log-partition one_minus_prob weights use, or an
// undefined tensor for sigmoid weights. Forward: the stored lse of a top-k
// teacher, else a pre-pass over teacher tiles; backward: from the stats.
template <typename acc_t>
at::Tensor weights_lse_forward(const LossConfig& cfg, const FusedInputs& in, int64_t tile, at::Tensor& s_buf) {
  if (!cfg.needs_teacher_prepass()) return at::Tensor();
  if (in.teacher == TeacherKind::TopK) return stored_lse_pairs(in.topk_lse);
  at::Tensor lse = at::empty({in.B, 2}, in.hidden.options());
  init_lse<acc_t>(lse.data_ptr<acc_t>(), in.B, current_stream());
  for (int64_t c0 = 0; c0 < in.V; c0 += tile) {
    const int64_t n = std::min(tile, in.V - c0);
    at::Tensor s = cpu::tile_view(s_buf, in.B, n);
    teacher_tile<acc_t>(in, c0, n, s);
    accumulate_lse_tile<acc_t>(s.data_ptr<acc_t>(), in.B, n, lse.data_ptr<acc_t>(), current_stream());
  }
  finish_lse<acc_t>(lse.data_ptr<acc_t>(), in.B, current_stream());
  return lse;
}

at::Tensor weights_lse_backward(const LossConfig& cfg, const at::Tensor& stats, const at::Tensor& topk_lse) {
  if (!cfg.needs_teacher_prepass()) return at::Tensor();
  if (topk_lse.defined()) return stored_lse_pairs(topk_lse);
  return at::stack({stats.select(1, cpu::kMaxS), stats.select(1, cpu::kLogSumS)}, 1).contiguous();
}

// The student's logits of classes [c0, c0 + n) and, when a term reads it, the
// teacher's, as [B, n] views of the tile buffers.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> logit_tiles(const LossConfig& cfg, const FusedInputs& in, int64_t c0, int64_t n,
                                              const at::Tensor& f_buf, const at::Tensor& s_buf) {
  at::Tensor f = cpu::tile_view(f_buf, in.B, n);
  linear_tile(in.hidden_in, in.weight, in.bias, c0, n, f);
  at::Tensor s;
  if (cfg.needs_teacher()) {
    s = cpu::tile_view(s_buf, in.B, n);
    teacher_tile<acc_t>(in, c0, n, s);
  }
  return {f, s};
}

// KDFAST_CUDA_FUSED=0: every op takes its tiled path (for comparisons).
bool fused_path_off() { return env_is("KDFAST_CUDA_FUSED", "0"); }

// KDFAST_CUDA_MAX_SPLITS=n: the fused forward passes use at most n class splits
// (for tests: with few, each split takes several class tiles, as at a large V).
int64_t max_splits() {
  const char* env = std::getenv("KDFAST_CUDA_MAX_SPLITS");
  return env ? std::atoll(env) : 0;
}

// The fused kernels' input kind for tensors of this dtype: bf16, fp16, and float
// where torch allows TF32 for float matmuls (torch.backends.cuda.matmul.allow_tf32,
// or float32 matmul precision "high"; the fused kernels multiply float in tf32,
// so exact float32 takes the tiled path); nullopt for the rest, or with
// KDFAST_CUDA_FUSED=0.
std::optional<FusedInput> fused_input(at::ScalarType dtype) {
  if (fused_path_off()) return std::nullopt;
  if (dtype == at::kBFloat16) return FusedInput::BFloat16;
  if (dtype == at::kHalf) return FusedInput::Float16;
  if (dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()) return FusedInput::Float32;
  return std::nullopt;
}

// The fused kernels' arguments for these inputs, or nullopt where they do not
// take them (fused_input, fused_linear.h). The pointers are into in's tensors
// and lse_w.
std::optional<FusedLinearArgs> fused_args(const LossConfig& cfg, const FusedInputs& in, const at::Tensor& lse_w) {
  const auto input = fused_input(in.hidden_in.scalar_type());
  if (!input) return std::nullopt;
  FusedLinearArgs a;
  a.input = *input;
  a.B = in.B;
  a.V = in.V;
  a.d = in.d;
  a.hidden = in.hidden_in.data_ptr();
  a.weight = in.weight.data_ptr();
  a.bias = ptr_or_null<float>(in.bias);
  switch (cfg.needs_teacher() ? in.teacher : TeacherKind::None) {
    case TeacherKind::None:
      break;
    case TeacherKind::Dense:
      a.teacher = FusedTeacher::Dense;
      a.teacher_logits = in.teacher_logits.data_ptr();
      break;
    case TeacherKind::Linear:
      a.teacher = FusedTeacher::Linear;
      a.d_t = in.teacher_weight.size(1);
      a.teacher_hidden = in.teacher_hidden_in.data_ptr();
      a.teacher_weight = in.teacher_weight.data_ptr();
      a.teacher_bias = ptr_or_null<float>(in.teacher_bias);
      break;
    case TeacherKind::TopK:
      a.teacher = FusedTeacher::TopK;
      a.k = in.topk_indices.size(1);
      a.topk_indices = in.topk_indices.data_ptr<int64_t>();
      a.topk_logits = in.topk_logits.data_ptr<float>();
      break;
  }
  a.lse_w = ptr_or_null<float>(lse_w);
  if (!fused_linear_supported(a)) return std::nullopt;
  return a;
}

std::tuple<at::Tensor, at::Tensor> fused_linear_loss_forward_cuda(KDFAST_FUSED_INPUT_ARGS, KDFAST_LOSS_PARAMS,
                                                                  int64_t tile_size, double /*filter_eps*/) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs must not re-enter autograd
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  // (not structured bindings: C++17 lambdas, as AT_DISPATCH's, cannot capture them)
  const bool on_host = host_index_checks();
  const auto call = cpu::prepare_call(on_host, KDFAST_FUSED_INPUT_NAMES, KDFAST_LOSS_NAMES);
  const LossConfig& cfg = call.first;
  const FusedInputs& in = call.second;
  if (!on_host) check_index_values_on_device(in, cfg.ignore_index);
  const int64_t tile = cuda_tile(tile_size, in.B, in.V, at::elementSize(in.acc_type));
  const auto opts = in.hidden.options();
  at::Tensor losses = at::empty({in.B}, opts);
  at::Tensor stats = at::empty({in.B, cpu::kNumRowStats}, opts);
  const LossTerms terms = loss_terms(cfg);
  const Targets targets = device_targets(in, cfg.ignore_index);
  if (auto fa = fused_args(cfg, in, at::Tensor())) {
    const int64_t splits = fused_forward_splits(in.B, in.V, max_splits());
    at::Tensor lse_w;  // the one_minus_prob weights' log-partition: stored (top-k) or a fused pre-pass
    if (cfg.needs_teacher_prepass()) {
      if (in.teacher == TeacherKind::TopK) {
        lse_w = stored_lse_pairs(in.topk_lse);
      } else {
        lse_w = at::empty({in.B, 2}, opts);
        at::Tensor lse_partial = at::empty({splits, in.B, 2}, opts);
        fused_teacher_lse(*fa, splits, lse_partial.data_ptr<float>(), lse_w.data_ptr<float>(), current_stream());
      }
      fa->lse_w = lse_w.data_ptr<float>();
    }
    at::Tensor partial = at::empty({splits, in.B, kNumRowState}, opts);
    at::Tensor state = at::empty({in.B, kNumRowState}, opts);
    fused_linear_forward(terms, targets, *fa, splits, partial.data_ptr<float>(), state.data_ptr<float>(),
                         current_stream());
    finish_rows<float>(terms, targets, state.data_ptr<float>(), in.B, losses.data_ptr<float>(),
                       stats.data_ptr<float>(), current_stream());
    check_launches();
    return {losses.to(hidden.scalar_type()), stats};
  }
  AT_DISPATCH_FLOATING_TYPES(in.acc_type, "fused_linear_loss_forward_cuda", [&] {
    at::Tensor f_buf = at::empty({in.B * tile}, opts);
    at::Tensor s_buf = cfg.needs_teacher() ? at::empty({in.B * tile}, opts) : at::Tensor();
    at::Tensor state = at::empty({in.B, kNumRowState}, opts);
    init_row_state<scalar_t>(state.data_ptr<scalar_t>(), in.B, current_stream());
    const at::Tensor lse_w = weights_lse_forward<scalar_t>(cfg, in, tile, s_buf);
    for (int64_t c0 = 0; c0 < in.V; c0 += tile) {
      const int64_t n = std::min(tile, in.V - c0);
      const auto [f, s] = logit_tiles<scalar_t>(cfg, in, c0, n, f_buf, s_buf);
      accumulate_tile<scalar_t>(terms, targets, f.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(s),
                                ptr_or_null<scalar_t>(lse_w), in.B, n, c0, state.data_ptr<scalar_t>(),
                                current_stream());
    }
    finish_rows<scalar_t>(terms, targets, state.data_ptr<scalar_t>(), in.B, losses.data_ptr<scalar_t>(),
                          stats.data_ptr<scalar_t>(), current_stream());
  });
  check_launches();
  return {losses.to(hidden.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_loss_backward_cuda(
    const at::Tensor& grad_losses, KDFAST_FUSED_INPUT_ARGS, const at::Tensor& stats, KDFAST_LOSS_PARAMS,
    int64_t tile_size, double filter_eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  // (not structured bindings: C++17 lambdas, as AT_DISPATCH's, cannot capture them)
  // index values are not checked again: the forward checked these tensors, and
  // the kernels stay in bounds on any values
  const auto call = cpu::prepare_call(false, KDFAST_FUSED_INPUT_NAMES, KDFAST_LOSS_NAMES);
  const LossConfig& cfg = call.first;
  const FusedInputs& in = call.second;
  cpu::check_backward_inputs(grad_losses, stats, in.B, in.acc_type, "fused_linear_loss_forward", hidden,
                             "student_hidden");
  const int64_t tile = cuda_tile(tile_size, in.B, in.V, at::elementSize(in.acc_type));
  const auto opts = in.hidden.options();
  const at::Tensor g = grad_losses.to(in.acc_type).contiguous();
  const at::Tensor st = stats.contiguous();
  const at::Tensor lse_w =
      weights_lse_backward(cfg, st, in.teacher == TeacherKind::TopK ? in.topk_lse : at::Tensor());
  // bf16: dL/dF rounded to bf16 for the tensor-core GEMMs, as Cut Cross-Entropy.
  // Not fp16 here: its range would flush the background entries (~1/(B V) under a
  // mean reduction, 4e-10 at B = 4096, V = 670k) to 0, so the tiled fp16 path runs
  // float GEMMs (the fused kernel scales its tiles instead).
  const bool low_precision = in.hidden_in.scalar_type() == at::kBFloat16;
  at::Tensor grad_hidden = at::zeros({in.B, in.d}, opts);
  at::Tensor grad_weight = at::empty({in.V, in.d}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_bias = bias.has_value() ? at::empty({in.V}, opts) : at::Tensor();
  const LossTerms terms = loss_terms(cfg);
  const Targets targets = device_targets(in, cfg.ignore_index);
  const bool filtering = filter_eps > 0;
  if (const auto fa = fused_args(cfg, in, lse_w)) {
    // the filter's class groups: the requested tile where it is under the kernels' own
    const int64_t group = tile_size > 0 && tile_size < kFusedClasses ? tile_size : kFusedClasses;
    float* grad_bias_ptr = grad_bias.defined() ? grad_bias.data_ptr<float>() : nullptr;
    fused_linear_backward(terms, targets, *fa, st.data_ptr<float>(), g.data_ptr<float>(), filtering ? filter_eps : 0.0,
                          group, grad_hidden.data_ptr<float>(), grad_weight.data_ptr(), grad_bias_ptr,
                          current_stream());
    check_launches();
    return {grad_hidden.to(hidden.scalar_type()), grad_weight,
            bias.has_value() ? grad_bias.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
  }
  // gradient filter: one flag per tile, set on the device when the tile is kept
  const int64_t num_tiles = (in.V + tile - 1) / tile;
  at::Tensor keep_flags = filtering ? at::zeros({num_tiles}, opts.dtype(at::kInt)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.acc_type, "fused_linear_loss_backward_cuda", [&] {
    at::Tensor f_buf = at::empty({in.B * tile}, opts);
    at::Tensor s_buf = cfg.needs_teacher() ? at::empty({in.B * tile}, opts) : at::Tensor();
    at::Tensor g_buf = at::empty({in.B * tile}, opts);
    at::Tensor g_low = low_precision ? at::empty({in.B * tile}, in.hidden_in.options()) : at::Tensor();
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int64_t c0 = t * tile, n = std::min(tile, in.V - c0);
      const auto [f, s] = logit_tiles<scalar_t>(cfg, in, c0, n, f_buf, s_buf);
      at::Tensor G = cpu::tile_view(g_buf, in.B, n);
      gradient_tile<scalar_t>(terms, targets, st.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(lse_w),
                              f.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(s), g.data_ptr<scalar_t>(), in.B, n, c0,
                              G.data_ptr<scalar_t>(), filter_eps, filtering ? keep_flags.data_ptr<int>() + t : nullptr,
                              current_stream());
      const at::Tensor w_tile = in.weight.narrow(0, c0, n);
      at::Tensor gw_tile = grad_weight.narrow(0, c0, n);
      at::Tensor gh_tile;  // this tile's share of grad_hidden
      if (low_precision) {
        at::Tensor G_low = cpu::tile_view(g_low, in.B, n);
        G_low.copy_(G);
        gh_tile = at::mm(G_low, w_tile, in.acc_type);
        gw_tile.copy_(at::mm(G_low.t(), in.hidden_in, in.acc_type));
      } else if (w_tile.scalar_type() == in.acc_type) {
        if (filtering) {
          gh_tile = at::mm(G, w_tile);
        } else {
          grad_hidden.addmm_(G, w_tile);
        }
        at::mm_out(gw_tile, G.t(), in.hidden);
      } else {  // fp16 weights: float GEMMs, the gradient tile rounded once at the end
        gh_tile = at::mm(G, w_tile.to(in.acc_type));
        gw_tile.copy_(at::mm(G.t(), in.hidden));
      }
      at::Tensor gb_tile = grad_bias.defined() ? grad_bias.narrow(0, c0, n) : at::Tensor();
      if (gb_tile.defined()) gb_tile.copy_(G.sum(0));
      if (filtering) {
        // a skipped tile, as on the CPU: zero grad_weight and grad_bias rows, nothing
        // added to grad_hidden (masks on the device: no sync)
        const at::Tensor skip = keep_flags.narrow(0, t, 1).eq(0);
        gw_tile.masked_fill_(skip, 0);
        if (gb_tile.defined()) gb_tile.masked_fill_(skip, 0);
        if (gh_tile.defined()) gh_tile.masked_fill_(skip, 0);
      }
      if (gh_tile.defined()) grad_hidden.add_(gh_tile);
    }
  });
  check_launches();
  return {grad_hidden.to(hidden.scalar_type()), grad_weight,
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
}

// The dense loss: logits [B, V] in the input dtype, walked in class tiles that
// are converted to the acc dtype in a buffer.
std::tuple<at::Tensor, at::Tensor> distillation_loss_forward_cuda(
    const at::Tensor& student_logits, const OptTensor& target, const OptTensor& teacher_logits, double hard_weight,
    double soft_weight, double double_weight, double temperature, c10::string_view negative_weighting,
    double negative_scale, double negative_shift, double label_smoothing, int64_t ignore_index) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const LossConfig cfg = cpu::make_config(hard_weight, soft_weight, double_weight, temperature,
                                          std::string(negative_weighting), negative_scale, negative_shift,
                                          label_smoothing, ignore_index,
                                          student_logits.dim() == 2 ? student_logits.size(1) : 0);
  cpu::check_dense_inputs(cfg, student_logits, target, teacher_logits);
  const int64_t B = student_logits.size(0), V = student_logits.size(1);
  const at::Tensor t_all = target.has_value() ? target->contiguous() : at::Tensor();
  if (t_all.defined()) {
    if (host_index_checks()) {
      cpu::check_target_values(t_all, V, ignore_index);
    } else {
      check_target_values(t_all.data_ptr<int64_t>(), B, V, ignore_index, current_stream());
    }
  }
  const auto acc_type = student_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = student_logits.options().dtype(acc_type);
  const int64_t tile = cuda_tile(0, B, V, at::elementSize(acc_type));
  at::Tensor losses = at::empty({B}, opts);
  at::Tensor stats = at::empty({B, cpu::kNumRowStats}, opts);
  const LossTerms terms = loss_terms(cfg);
  Targets targets;
  targets.target = ptr_or_null<int64_t>(t_all);
  targets.ignore_index = ignore_index;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "distillation_loss_forward_cuda", [&] {
    at::Tensor f_buf = at::empty({B * tile}, opts);
    at::Tensor s_buf = cfg.needs_teacher() ? at::empty({B * tile}, opts) : at::Tensor();
    at::Tensor state = at::empty({B, kNumRowState}, opts);
    init_row_state<scalar_t>(state.data_ptr<scalar_t>(), B, current_stream());
    at::Tensor lse_w;
    if (cfg.needs_teacher_prepass()) {
      lse_w = at::empty({B, 2}, opts);
      init_lse<scalar_t>(lse_w.data_ptr<scalar_t>(), B, current_stream());
      for (int64_t c0 = 0; c0 < V; c0 += tile) {
        const int64_t n = std::min(tile, V - c0);
        at::Tensor s = cpu::tile_view(s_buf, B, n);
        s.copy_(teacher_logits->narrow(1, c0, n));
        accumulate_lse_tile<scalar_t>(s.data_ptr<scalar_t>(), B, n, lse_w.data_ptr<scalar_t>(), current_stream());
      }
      finish_lse<scalar_t>(lse_w.data_ptr<scalar_t>(), B, current_stream());
    }
    for (int64_t c0 = 0; c0 < V; c0 += tile) {
      const int64_t n = std::min(tile, V - c0);
      at::Tensor f = cpu::tile_view(f_buf, B, n);
      f.copy_(student_logits.narrow(1, c0, n));
      at::Tensor s;
      if (cfg.needs_teacher()) {
        s = cpu::tile_view(s_buf, B, n);
        s.copy_(teacher_logits->narrow(1, c0, n));
      }
      accumulate_tile<scalar_t>(terms, targets, f.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(s),
                                ptr_or_null<scalar_t>(lse_w), B, n, c0, state.data_ptr<scalar_t>(),
                                current_stream());
    }
    finish_rows<scalar_t>(terms, targets, state.data_ptr<scalar_t>(), B, losses.data_ptr<scalar_t>(),
                          stats.data_ptr<scalar_t>(), current_stream());
  });
  check_launches();
  return {losses.to(student_logits.scalar_type()), stats};
}

at::Tensor distillation_loss_backward_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                                           const OptTensor& target, const OptTensor& teacher_logits,
                                           const at::Tensor& stats, double hard_weight, double soft_weight,
                                           double double_weight, double temperature,
                                           c10::string_view negative_weighting, double negative_scale,
                                           double negative_shift, double label_smoothing, int64_t ignore_index) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const LossConfig cfg = cpu::make_config(hard_weight, soft_weight, double_weight, temperature,
                                          std::string(negative_weighting), negative_scale, negative_shift,
                                          label_smoothing, ignore_index,
                                          student_logits.dim() == 2 ? student_logits.size(1) : 0);
  cpu::check_dense_inputs(cfg, student_logits, target, teacher_logits);
  const int64_t B = student_logits.size(0), V = student_logits.size(1);
  const auto acc_type = student_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  cpu::check_backward_inputs(grad_losses, stats, B, acc_type, "distillation_loss_forward", student_logits,
                             "student_logits");
  const auto opts = student_logits.options().dtype(acc_type);
  const int64_t tile = cuda_tile(0, B, V, at::elementSize(acc_type));
  const at::Tensor t_all = target.has_value() ? target->contiguous() : at::Tensor();
  const at::Tensor g = grad_losses.to(acc_type).contiguous();
  const at::Tensor st = stats.contiguous();
  const at::Tensor lse_w = weights_lse_backward(cfg, st, at::Tensor());
  at::Tensor grad = at::empty({B, V}, student_logits.options().memory_format(at::MemoryFormat::Contiguous));
  const LossTerms terms = loss_terms(cfg);
  Targets targets;
  targets.target = ptr_or_null<int64_t>(t_all);
  targets.ignore_index = ignore_index;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "distillation_loss_backward_cuda", [&] {
    at::Tensor f_buf = at::empty({B * tile}, opts);
    at::Tensor s_buf = cfg.needs_teacher() ? at::empty({B * tile}, opts) : at::Tensor();
    at::Tensor g_buf = at::empty({B * tile}, opts);
    for (int64_t c0 = 0; c0 < V; c0 += tile) {
      const int64_t n = std::min(tile, V - c0);
      at::Tensor f = cpu::tile_view(f_buf, B, n);
      f.copy_(student_logits.narrow(1, c0, n));
      at::Tensor s;
      if (cfg.needs_teacher()) {
        s = cpu::tile_view(s_buf, B, n);
        s.copy_(teacher_logits->narrow(1, c0, n));
      }
      at::Tensor G = cpu::tile_view(g_buf, B, n);
      gradient_tile<scalar_t>(terms, targets, st.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(lse_w),
                              f.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(s), g.data_ptr<scalar_t>(), B, n, c0,
                              G.data_ptr<scalar_t>(), 0.0, nullptr, current_stream());
      grad.narrow(1, c0, n).copy_(G);
    }
  });
  check_launches();
  return grad;
}

// The fused top-k kernel's arguments (the teacher's hidden and weight as a
// linear teacher's), or nullopt where it does not take them (fused_input,
// fused_linear.h).
std::optional<FusedLinearArgs> fused_topk_args(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                                               int64_t k) {
  const auto input = fused_input(h.scalar_type());
  if (!input) return std::nullopt;
  FusedLinearArgs a;
  a.input = *input;
  a.B = h.size(0);
  a.V = w.size(0);
  a.teacher = FusedTeacher::Linear;
  a.d_t = h.size(1);
  a.teacher_hidden = h.data_ptr();
  a.teacher_weight = w.data_ptr();
  a.teacher_bias = ptr_or_null<float>(b);
  if (!fused_topk_supported(a, k)) return std::nullopt;
  return a;
}

// Teacher top-k labeling: fused for bf16 / fp16 (and TF32 float) inputs
// (csrc/cuda/fused_linear.cu: the logits made in shared memory and selected
// there, per class split, then the splits merged), otherwise a GEMM per class
// tile (as linear_tile) and the selection kernels of csrc/cuda/teacher_topk.cu.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> teacher_topk_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, int64_t k, double temperature,
    int64_t tile_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  cpu::check_teacher_topk_inputs(hidden, weight, bias, k, temperature);
  TORCH_CHECK_VALUE(k <= kMaxTopK, "k must be at most ", kMaxTopK, " on CUDA, got ", k);
  const int64_t B = hidden.size(0), V = weight.size(0);
  const auto acc_type = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = hidden.options().dtype(acc_type);
  const at::Tensor b = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor h = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor indices = at::empty({B, k}, opts.dtype(at::kLong));
  at::Tensor logits = at::empty({B, k}, opts);
  at::Tensor lse = at::empty({B}, opts), entropy = at::empty({B}, opts), covered = at::empty({B}, opts);
  at::Tensor stats = at::empty({B, kNumSoftmaxStats}, opts);
  if (const auto fa = fused_topk_args(h, w, b, k)) {
    const int64_t splits = fused_topk_splits(B, V, k, max_splits());
    at::Tensor part_logit = at::empty({splits, B, k}, opts), part_index = at::empty({splits, B, k}, indices.options());
    at::Tensor part_count = at::empty({splits, B}, indices.options());
    at::Tensor part_stats = at::empty({splits, B, kNumSoftmaxStats}, opts);
    FusedTopkPartial partial;
    partial.logit = part_logit.data_ptr<float>();
    partial.index = part_index.data_ptr<int64_t>();
    partial.count = part_count.data_ptr<int64_t>();
    partial.stats = part_stats.data_ptr<float>();
    fused_teacher_topk(*fa, k, temperature, splits, partial, logits.data_ptr<float>(), indices.data_ptr<int64_t>(),
                       stats.data_ptr<float>(), current_stream());
  } else {
    at::Tensor count = at::empty({B}, opts.dtype(at::kLong));
    const int64_t tile = cuda_tile(tile_size, B, V, at::elementSize(acc_type));
    AT_DISPATCH_FLOATING_TYPES(acc_type, "teacher_topk_cuda", [&] {
      topk_init<scalar_t>(logits.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                          stats.data_ptr<scalar_t>(), B, k, current_stream());
      at::Tensor x_buf = at::empty({B * tile}, opts);
      for (int64_t c0 = 0; c0 < V; c0 += tile) {
        const int64_t n = std::min(tile, V - c0);
        at::Tensor x = cpu::tile_view(x_buf, B, n);
        linear_tile(h, w, b, c0, n, x);
        topk_tile<scalar_t>(x.data_ptr<scalar_t>(), B, n, c0, k, temperature, logits.data_ptr<scalar_t>(),
                            indices.data_ptr<int64_t>(), count.data_ptr<int64_t>(), stats.data_ptr<scalar_t>(),
                            current_stream());
      }
    });
  }
  AT_DISPATCH_FLOATING_TYPES(acc_type, "teacher_topk_cuda_finish", [&] {
    topk_finish<scalar_t>(logits.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), B, k, temperature,
                          lse.data_ptr<scalar_t>(), entropy.data_ptr<scalar_t>(), covered.data_ptr<scalar_t>(),
                          current_stream());
  });
  check_launches();
  return {indices, logits, lse, entropy, covered};
}

}  // namespace

// The CPU emulation build of the tests (tests/cuda_emu) sets CPU: this glue then
// replaces the CPU kernels of these ops, so that the CPU tests run the CUDA code.
#ifndef KDFAST_CUDA_DISPATCH_KEY
#define KDFAST_CUDA_DISPATCH_KEY CUDA
#endif
TORCH_LIBRARY_IMPL(kdfast, KDFAST_CUDA_DISPATCH_KEY, m) {
  m.impl("distillation_loss_forward", &distillation_loss_forward_cuda);
  m.impl("distillation_loss_backward", &distillation_loss_backward_cuda);
  m.impl("fused_linear_loss_forward", &fused_linear_loss_forward_cuda);
  m.impl("fused_linear_loss_backward", &fused_linear_loss_backward_cuda);
  m.impl("teacher_topk", &teacher_topk_cuda);
}

}  // namespace kdfast::cuda_glue
