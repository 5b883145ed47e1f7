// The fused loss's grad_weight on the CPU: huge pages, and the last freed
// buffer reused (grad_buffers.cpp).
//
// grad_weight is V x d: 171 MB in float32 at Amazon-670K's V = 670,091 and
// d = 64, 1.4 GB for a d = 512 teacher. A training step frees it
// (optimizer.zero_grad() sets .grad to None) and the next backward allocates it
// again; malloc hands such a block straight back to the kernel, so every step
// faulted 42,000 fresh, zeroed 4 KiB pages in while the tile loop wrote them
// (a malloc + memset + free loop of 171 MB: 76 ms a round on the 2-core Xeon;
// the hard-CE step there went from 0.47 to 0.42-0.43 s without it).
//
// Here a block of at least 2 MiB is
// - on 2 MiB-aligned memory advised for transparent huge pages (madvise
//   MADV_HUGEPAGE, as torch does for all its CPU memory under
//   THP_MEM_ALLOC_ENABLE=1): ~85 faults instead of 42,000 when it is fresh;
// - kept when its tensor is freed, one block at a time, and handed to the next
//   request of the same rounded size: no faults and no zeroing at all in a
//   steady training loop. The peak is unchanged (the block is in use again at
//   the same point of the next step), but between steps it stays resident
//   where malloc would have returned it to the kernel. empty_cpu_cache() frees it.
//
// KDFAST_CPU_GRAD_CACHE=0 (read at each allocation) turns both off: plain
// at::empty. Smaller tensors are always plain at::empty.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace kdfast::cpu {

// at::empty(sizes, options) for a CPU tensor, contiguous, as described above.
// The storage is resizable; every element must be written by the caller (a
// reused block holds the previous step's values).
at::Tensor empty_grad_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the kept block, if any; returns the bytes freed.
int64_t empty_cpu_cache();

// Bytes of the kept block (0 if none).
int64_t cpu_cache_bytes();

}  // namespace kdfast::cpu
