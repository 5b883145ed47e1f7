// Autograd kernels of the ops whose outputs are data, not functions to
// differentiate (teacher labels): they run the op below autograd, so outputs
// never require grad, whatever the inputs do.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> teacher_topk_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
    double temperature, int64_t tile_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::teacher_topk", "")
                             .typed<decltype(teacher_topk_autograd)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(hidden, weight, bias, k, temperature, tile_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  m.impl("teacher_topk", &teacher_topk_autograd);
}

}  // namespace kdfast
