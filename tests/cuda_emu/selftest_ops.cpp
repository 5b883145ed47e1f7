// Torch ops around selftest.cu's kernels (torch.ops.cuda_emu_selftest.*), for
// tests/test_cuda_emulated.py.
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <ATen/ATen.h>

namespace cuda_emu_selftest {
void block_sum(const float* x, float* out, float* out_xor, int blocks, int threads, cudaStream_t stream);
void lane_exchange(const float* x, float* rotated, unsigned* ballot, int shift, int blocks, int threads,
                   cudaStream_t stream);
void divergent_barrier(int* out, int threads, cudaStream_t stream);
void racy_write(int* out, int threads, cudaStream_t stream);
void tf32_product(const float* a, const float* b, float* c, cudaStream_t stream);
void wmma_product(const void* a, const void* b, float* c, float* sum, bool sync, int shared_bytes, int opt_in_bytes,
                  cudaStream_t stream);

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
std::tuple<at::Tensor, at::Tensor> lane_exchange_op(const at::Tensor& x, int64_t shift, int64_t threads) {
  const at::Tensor xc = x.contiguous();
  at::Tensor rotated = at::empty_like(xc);
  at::Tensor ballot = at::zeros({x.numel() / 32}, at::kInt);
  lane_exchange(xc.data_ptr<float>(), rotated.data_ptr<float>(), reinterpret_cast<unsigned*>(ballot.data_ptr<int>()),
                static_cast<int>(shift), x.numel() / threads, threads, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rotated, ballot};
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
std::tuple<at::Tensor, at::Tensor> wmma_product_op(const at::Tensor& a, const at::Tensor& b, bool sync,
                                                   int64_t shared_bytes, int64_t opt_in_bytes) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.numel() == 256 &&
              b.numel() == 256, "a and b: 16 x 16 bf16");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor c = at::empty({16, 16}, at::kFloat);
  at::Tensor sum = at::empty({}, at::kFloat);
  wmma_product(ac.data_ptr(), bc.data_ptr(), c.data_ptr<float>(), sum.data_ptr<float>(), sync, int(shared_bytes),
               int(opt_in_bytes), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {c, sum};
}
at::Tensor tf32_product_op(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.numel() == 128 &&
              b.numel() == 128, "a: 16 x 8, b: 8 x 16, float");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor c = at::empty({16, 16}, at::kFloat);
  tf32_product(ac.data_ptr<float>(), bc.data_ptr<float>(), c.data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}
}  // namespace
}  // namespace cuda_emu_selftest

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("block_sum(Tensor x, int threads) -> (Tensor, Tensor)", &cuda_emu_selftest::block_sum_op);
  m.def("lane_exchange(Tensor x, int shift, int threads) -> (Tensor, Tensor)", &cuda_emu_selftest::lane_exchange_op);
  m.def("divergent_barrier(int threads) -> Tensor", &cuda_emu_selftest::divergent_barrier_op);
  m.def("racy_write(int threads) -> int", &cuda_emu_selftest::racy_write_op);
  m.def("tf32_product(Tensor a, Tensor b) -> Tensor", &cuda_emu_selftest::tf32_product_op);
  m.def("wmma_product(Tensor a, Tensor b, bool sync, int shared_bytes, int opt_in_bytes) -> (Tensor, Tensor)",
        &cuda_emu_selftest::wmma_product_op);
}
