// bf16 x bf16 -> float32 GEMMs for the CPU tile loops: see gemm.h.
#include "gemm.h"

#include <ATen/cpu/Utils.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// MKL's mixed-precision GEMM (mkl_cblas.h, LP64 interface: MKL_INT is int, the
// CBLAS enums are ints, MKL_BF16 is uint16_t). Weak: null when the loaded torch
// does not export it.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace kdfast::cpu {
namespace {

constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

bool have_mkl_gemm() { return cblas_gemm_bf16bf16f32 != nullptr; }

bool cpu_has_amx_bf16() {
  static const bool has = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    // the kernel must also grant the process the AMX tile state (Linux asks once)
    return it != caps.end() && it->second.isBool() && it->second.toBool() && at::cpu::init_amx();
  }();
  return has;
}

// "0", "1" or "auto" (also for unset or anything else)
const char* mode() {
  const char* v = std::getenv("KDFAST_CPU_BF16_GEMM");
  if (v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0)) return v;
  return "auto";
}

int checked_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "internal: bf16 GEMM dimension ", v,
              " is over MKL's 32-bit int");
  return static_cast<int>(v);
}

}  // namespace

bool bf16_gemm_enabled() {
  if (!have_mkl_gemm()) return false;
  const char* m = mode();
  if (std::strcmp(m, "0") == 0) return false;
  if (std::strcmp(m, "1") == 0) return true;
  return cpu_has_amx_bf16();
}

std::string bf16_gemm_status() {
  const std::string m = mode();
  if (!have_mkl_gemm()) return "off: this torch does not export MKL's cblas_gemm_bf16bf16f32";
  if (m == "0") return "off: KDFAST_CPU_BF16_GEMM=0";
  if (m == "1") return "on: KDFAST_CPU_BF16_GEMM=1 (MKL cblas_gemm_bf16bf16f32)";
  return cpu_has_amx_bf16() ? "on: MKL cblas_gemm_bf16bf16f32, the CPU has AMX-BF16"
                            : "off: the CPU has no AMX-BF16 (KDFAST_CPU_BF16_GEMM=1 forces it on)";
}

void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const at::BFloat16* a,
                   int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  TORCH_CHECK(have_mkl_gemm(), "internal: the bf16 GEMM is not available");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (MKL would reject the leading dimension 0)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  cblas_gemm_bf16bf16f32(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans,
                         checked_int(m), checked_int(n), checked_int(k), 1.0f, reinterpret_cast<const uint16_t*>(a),
                         checked_int(lda), reinterpret_cast<const uint16_t*>(b), checked_int(ldb), beta, c,
                         checked_int(ldc));
}

void split_bf16(const float* x, int64_t count, at::BFloat16* hi, at::BFloat16* lo) {
  using fVec = at::vec::Vectorized<float>;
  using bVec = at::vec::Vectorized<at::BFloat16>;
  constexpr int64_t step = bVec::size();  // two float vectors
  int64_t j = 0;
  for (; j + step <= count; j += step) {
    const fVec x0 = fVec::loadu(x + j), x1 = fVec::loadu(x + j + fVec::size());
    const bVec h = at::vec::convert_float_bfloat16(x0, x1);
    auto [h0, h1] = at::vec::convert_bfloat16_float(h);
    const fVec zero(0.0f);
    const fVec r0 = fVec::blendv(x0 - h0, zero, x0 == h0), r1 = fVec::blendv(x1 - h1, zero, x1 == h1);
    h.store(hi + j);
    at::vec::convert_float_bfloat16(r0, r1).store(lo + j);
  }
  for (; j < count; ++j) {
    const at::BFloat16 h(x[j]);
    hi[j] = h;
    lo[j] = at::BFloat16(x[j] == float(h) ? 0.0f : x[j] - float(h));
  }
}

void linear_tile_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t c0, int64_t n,
                      const at::Tensor& out) {
  const int64_t rows = x.size(0), d = x.size(1);
  float* c = out.data_ptr<float>();
  float beta = 0.0f;
  if (bias.defined()) {  // C starts as the bias rows
    const float* b = bias.data_ptr<float>() + c0;
    for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * n, b, n * sizeof(float));
    beta = 1.0f;
  }
  gemm_bf16_f32(false, true, rows, n, d, x.data_ptr<at::BFloat16>(), d, weight.data_ptr<at::BFloat16>() + c0 * d, d,
                beta, c, n);
}

}  // namespace kdfast::cpu
