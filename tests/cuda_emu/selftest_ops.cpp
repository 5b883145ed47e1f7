// Torch ops around selftest.cu's kernels (torch.ops.cuda_emu_selftest.*), for
// tests/test_cuda_emulated.py.
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <ATen/ATen.h>

namespace cuda_emu_selftest {
void block_sum(const float* x, float* out, float* out_xor, int blocks, int threads, cudaStream_t stream);
void divergent_barrier(int* out, int threads, cudaStream_t stream);
void racy_write(int* out, int threads, cudaStream_t stream);

namespace {
std::tuple<at::Tensor, at::Tensor> block_sum_op(const at::Tensor& x, int64_t threads) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.numel() / threads}, x.options());
  at::Tensor out_xor = at::empty_like(xc);
  block_sum(xc.data_ptr<float>(), out.data_ptr<float>(), out_xor.data_ptr<float>(), x.numel() / threads, threads,
            nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, out_xor};
}
at::Tensor divergent_barrier_op(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::kInt);
  divergent_barrier(out.data_ptr<int>(), threads, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
int64_t racy_write_op(int64_t threads) {
  at::Tensor out = at::zeros({1}, at::kInt);
  racy_write(out.data_ptr<int>(), threads, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.item<int>();
}
}  // namespace
}  // namespace cuda_emu_selftest

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("block_sum(Tensor x, int threads) -> (Tensor, Tensor)", &cuda_emu_selftest::block_sum_op);
  m.def("divergent_barrier(int threads) -> Tensor", &cuda_emu_selftest::divergent_barrier_op);
  m.def("racy_write(int threads) -> int", &cuda_emu_selftest::racy_write_op);
}
