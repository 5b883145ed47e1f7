// The fused loss's grad_weight on the CPU: see grad_buffers.h for why.
#include "grad_buffers.h"

#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfast::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

bool cache_enabled() {
  const char* env = std::getenv("KDFAST_CPU_GRAD_CACHE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

struct Block {
  void* ptr;
  size_t bytes;
};

// The kept block, and the bytes in live tensors for torch.profiler's memory
// events (reported as torch's own CPU allocator does: + on hand-out, - on return).
// The mutex and the allocator are never destroyed: a tensor may be freed during
// interpreter shutdown, after this library's static destructors would have run.
std::mutex& mutex() {
  static auto* m = new std::mutex;
  return *m;
}
Block* kept = nullptr;
size_t live_bytes = 0;

void report(const Block& block, bool out) {
  const size_t reserved = live_bytes + (kept ? kept->bytes : 0);
  c10::reportMemoryUsageToProfiler(block.ptr, out ? int64_t(block.bytes) : -int64_t(block.bytes), live_bytes,
                                   reserved, c10::Device(c10::DeviceType::CPU));
}

void free_block(Block* block) {
  std::free(block->ptr);
  delete block;
}

// The DataPtr deleter: keep the block if none is kept, else free it.
void return_block(void* context) {
  auto* block = static_cast<Block*>(context);
  Block* to_free = block;
  {
    std::lock_guard<std::mutex> lock(mutex());
    live_bytes -= block->bytes;
    if (kept == nullptr && cache_enabled()) {
      kept = block;
      to_free = nullptr;
    }
    report(*block, false);
  }
  if (to_free) free_block(to_free);
}

class GradBufferAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device device(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, nullptr, device};
    // whole huge pages, so that the last one is shared with no other allocation
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = nullptr;
    Block* stale = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex());
      if (kept != nullptr && kept->bytes == bytes) {
        block = kept;
      } else {
        stale = kept;  // a block of another size: freed, so that at most one block is idle
      }
      kept = nullptr;
    }
    if (stale) free_block(stale);
    if (block == nullptr) {
      void* ptr = nullptr;
      TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0 && ptr != nullptr, "kdfast: could not allocate ",
                  bytes, " bytes on the CPU");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: ordinary pages where the kernel says no
#endif
      block = new Block{ptr, bytes};
    }
    {
      std::lock_guard<std::mutex> lock(mutex());
      live_bytes += block->bytes;
      report(*block, true);
    }
    return {block->ptr, block, &return_block, device};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GradBufferAllocator* grad_buffer_allocator() {
  static auto* allocator = new GradBufferAllocator;
  return allocator;
}

}  // namespace

at::Tensor empty_grad_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_grad_buffer: a CPU tensor, got ", options.device());
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes < kHugePage || !cache_enabled()) return at::empty(sizes, options);
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, grad_buffer_allocator()->allocate(nbytes),
                       grad_buffer_allocator(), /*resizable=*/true);
  return at::empty({0}, options).set_(std::move(storage), 0, sizes);
}

int64_t empty_cpu_cache() {
  Block* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex());
    std::swap(block, kept);
  }
  if (block == nullptr) return 0;
  const auto bytes = static_cast<int64_t>(block->bytes);
  free_block(block);
  return bytes;
}

int64_t cpu_cache_bytes() {
  std::lock_guard<std::mutex> lock(mutex());
  return kept ? static_cast<int64_t>(kept->bytes) : 0;
}

}  // namespace kdfast::cpu
