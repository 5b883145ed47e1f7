// Device-side checks of the CUDA ops' index values (plain C++ interface, as
// loss_tiles.h): an int target, CSR positives, a stored teacher's top-k classes.
// They are the CUDA ops' default, so that no op waits for the device: checking
// on the host means copying the indices there, one sync per call
// (csrc/cpu/fused_inputs.h; KDFAST_CUDA_HOST_CHECKS=1 in csrc/cuda_ops.cpp).
//
// A bad value prints a line naming the argument, the entry and the value (the
// host checks' words, after "kdfast: ") and stops the kernel with a device-side
// assertion, as PyTorch's own CUDA index checks do: the error (cudaErrorAssert,
// "device-side assert triggered") surfaces at the next call that waits for the
// device, and the process's CUDA context is lost. The check is one small kernel
// on the stream, so a CUDA graph captures it too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdfast::cuda {

// target [n]: each entry ignore_index or in [0, num_classes).
void check_target_values(const int64_t* target, int64_t n, int64_t num_classes, int64_t ignore_index,
                         cudaStream_t stream);

// indptr [B + 1] from 0 to num_indices, non-decreasing; each row's indices in
// [0, V) and sorted ascending.
void check_csr_targets(const int64_t* indptr, const int64_t* indices, int64_t B, int64_t num_indices, int64_t V,
                       cudaStream_t stream);

// indices [B, k]: each in [0, V), no class twice in a row.
void check_topk_indices(const int64_t* indices, int64_t B, int64_t k, int64_t V, cudaStream_t stream);

}  // namespace kdfast::cuda
