// bf16 x bf16 -> float32 GEMMs for the CPU tile loops (gemm.cpp).
//
// With bf16 inputs the tile GEMMs used to upcast a weight tile to float32 and run
// a float32 GEMM. The product of two bf16 values is exact in float32, so a GEMM
// that reads bf16 and accumulates in float32 makes the same logits (up to the
// order of the sum) at the speed of the CPU's bf16 matrix units: on a Xeon with
// AMX, per thread, ~5x a float32 GEMM at the fused loss's tile shapes (see
// BENCHMARKS.md). The backward's dL/dF is float32; it enters these GEMMs as
// two bf16 terms, hi = bf16(G) and lo = bf16(G - hi), whose sum carries 16 bits
// of G: its error (~2^-17 of |G|) is far below the one rounding of the bf16
// gradients returned.
//
// The GEMM is MKL's cblas_gemm_bf16bf16f32, which the x86-64 torch builds export
// from libtorch_cpu. It is a weak symbol here: a torch without it loads kdfast as
// before, and every tile takes the float32 path.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace kdfast::cpu {

// Whether the tile GEMMs of bf16 inputs use the bf16 GEMM now. The environment
// variable KDFAST_CPU_BF16_GEMM chooses, read at each call: "0" never; "1"
// whenever MKL's GEMM is there (any x86-64 CPU: MKL emulates what the CPU lacks);
// unset or "auto" when it is there and the CPU has AMX-BF16: the only kind it is
// faster on (benchmarks/bench_cpu_gemm_kinds.py: with AVX512-BF16 alone MKL's bf16
// GEMM ran at 0.6x float32, without BF16 instructions at 1x).
bool bf16_gemm_enabled();

// One line for users and tests: whether the bf16 GEMM is on, and why.
std::string bf16_gemm_status();

// Row-major C[m, n] = op(A) op(B) + beta C, with op(A) [m, k], op(B) [k, n]
// (trans_a: A is stored [k, m]; trans_b: B is stored [n, k]); bf16 A and B,
// float32 C. Only call when bf16_gemm_enabled().
void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const at::BFloat16* a,
                   int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// hi[i] = bf16(x[i]), lo[i] = bf16(x[i] - hi[i]) (0 where hi[i] == x[i], so that
// an infinite x stays in hi alone): hi + lo holds x to ~2^-17 relative.
void split_bf16(const float* x, int64_t count, at::BFloat16* hi, at::BFloat16* lo);

// out[rows, n] (float32, contiguous) = x[rows, d] W[c0:c0+n]^T (+ b[c0:c0+n]) with
// bf16 x and W (contiguous) and a float32 bias (or undefined).
void linear_tile_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t c0, int64_t n,
                      const at::Tensor& out);

}  // namespace kdfast::cpu
