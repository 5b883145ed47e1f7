// The fiber scheduler of the CUDA emulation (cuda_emu.h): one block at a time,
// its threads as fibers on the calling thread.
#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

// The racecheck build (CUDA_EMU_SANITIZE=thread, README.md): the kernels are built with
// ThreadSanitizer, this file without it (the scheduler's own bookkeeping is shared by the
// fibers on purpose) but with CUDA_EMU_RACECHECK, which tells ThreadSanitizer what the
// GPU orders: each emulated thread is a ThreadSanitizer fiber; a block's threads start
// after everything the host did before (its memset of shared memory, earlier blocks and
// launches) and the host goes on after they end; within the block only __syncthreads and
// __syncwarp order one thread's accesses before another's. Shuffles, ballots and WMMA calls
// do not (no memory ordering is promised for them), so two threads that touch the same
// address with one of them writing, with no barrier between, are a reported race.
#ifdef CUDA_EMU_RACECHECK
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

#if defined(__x86_64__)
// A fiber switch without ucontext's signal-mask system call (the self-test block sum ran
// 6x faster, and the suite switches fibers millions of times): push the callee-saved registers and
// the SSE/x87 control words, swap stack pointers, pop the other side's.
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

namespace cuda_emu {
namespace {

// The racecheck build's calls into ThreadSanitizer (no-ops in the other builds).
namespace race {
#ifdef CUDA_EMU_RACECHECK
constexpr unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync
void* current() { return __tsan_get_current_fiber(); }
void* create() { return __tsan_create_fiber(0); }
void destroy(void* fiber) { __tsan_destroy_fiber(fiber); }
// sync: what the current fiber did happens before what `fiber` does next
void switch_to(void* fiber, bool sync) { __tsan_switch_to_fiber(fiber, sync ? 0 : kNoSync); }
void release(void* sync_object) { __tsan_release(sync_object); }
void acquire(void* sync_object) { __tsan_acquire(sync_object); }
#else
void* current() { return nullptr; }
void* create() { return nullptr; }
void destroy(void*) {}
void switch_to(void*, bool) {}
void release(void*) {}
void acquire(void*) {}
#endif
}  // namespace race

// A saved execution context: a fiber's or the scheduler's.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  cuda_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// A context that starts entry() on the given stack; entry must never return.
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
#if defined(__x86_64__)
  // what cuda_emu_switch pops: the control words (the current ones), six
  // registers, then entry as the return address, at a 16-byte boundary so that
  // entry starts with the stack as a call leaves it
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 2;  // sp[1]: a dummy above the return address
  sp[0] = reinterpret_cast<uint64_t>(entry);
  sp[1] = 0;
  sp -= 6;
  for (int r = 0; r < 6; ++r) sp[r] = 0;
  sp -= 1;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

#ifdef CUDA_EMU_RACECHECK
constexpr size_t kStackBytes = 256 * 1024;  // ThreadSanitizer's instrumented frames are larger
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif
constexpr unsigned kMaxThreads = 1024;

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  dim3 index;
  int linear = 0;
  bool done = false;
  // where the fiber waits: 0 running, 1 block barrier, 2 warp exchange
  int waiting = 0;
  uint64_t wait_generation = 0;
  // racecheck build: the thread's ThreadSanitizer fiber; whether it has run in this block;
  // whether it was stopped midway (its fiber then has frames that never return: replaced)
  void* race_fiber = nullptr;
  bool started = false;
  bool stopped = false;
};

// Two sets of slots, used by alternate exchanges: a lane that takes its value
// from one set and runs on to the next exchange writes the other, and cannot
// come back to this one before every lane has arrived there, i.e. taken its value.
struct Warp {
  int arrived = 0;
  uint64_t generation = 0;
  uint64_t slots[2][32] = {};
  int kind = -1;  // what the lanes arriving now do (exchange() in this file)
  char sync_objects[2] = {};  // racecheck build: what __syncwarp releases and acquires, by generation
};

struct Block {
  dim3 index, dim, grid;
  int num_threads = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  // block barrier
  int arrived = 0;
  uint64_t generation = 0;
  int or_accumulated = 0, or_result = 0;
  char sync_objects[2] = {};  // racecheck build: what __syncthreads releases and acquires, by generation
  void* host_fiber = nullptr;  // racecheck build: the launching thread's ThreadSanitizer fiber
  bool failed = false;
  // dynamic shared memory: dynamic_bytes from a 128-byte boundary of the buffer
  std::vector<unsigned char> dynamic_buffer;
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_bytes = 0;
};

// Dynamic shared memory a launch may ask for: 48 KiB, or up to what the kernel opted
// in to with cudaFuncSetAttribute, at most 163 KiB (sm_80's limit, the smaller of the
// two architectures kdfast builds for).
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 163 * 1024;
std::mutex g_launch_mutex;  // guards the kernels' opt-ins and the launch counts
std::map<const void*, size_t> g_max_dynamic_shared;
std::map<std::string, uint64_t> g_kernel_launches;  // launches so far, per kernel name

thread_local Block* g_block = nullptr;
thread_local std::vector<Fiber> g_fibers;  // stacks kept between launches
thread_local std::string g_error;
thread_local cudaError_t g_error_code = cudaSuccess;
thread_local std::mt19937_64 g_rng(std::getenv("CUDA_EMU_SEED") ? std::strtoull(std::getenv("CUDA_EMU_SEED"), nullptr, 10)
                                                                 : 1);

void set_error(cudaError_t code, const std::string& message) {
  if (g_error_code == cudaSuccess) {
    g_error_code = code;
    g_error = message;
  }
}

Block& block() {
  if (!g_block) {
    std::fprintf(stderr, "cuda_emu: device code called outside a kernel launch\n");
    std::abort();
  }
  return *g_block;
}

void yield_to_scheduler() {
  Block& b = block();
  race::switch_to(b.host_fiber, false);
  switch_context(b.current->context, b.scheduler);
}

// Back to the scheduler for good: the thread ended (or was stopped).
void leave_block(Block& b) {
  b.current->done = true;
  race::switch_to(b.host_fiber, true);
  switch_context(b.current->context, b.scheduler);
}

void fiber_main() {
  Block& b = block();
  (*b.body)();
  leave_block(b);
}

std::string where(const Block& b, const Fiber& f) {
  return "block (" + std::to_string(b.index.x) + "," + std::to_string(b.index.y) + "," + std::to_string(b.index.z) +
         ") thread (" + std::to_string(f.index.x) + "," + std::to_string(f.index.y) + "," + std::to_string(f.index.z) +
         ")";
}

// A failed block's threads that had not ended are left midway (stopped: their fibers are
// replaced before the next launch), and the host goes on after what they did, as after the
// others (a switch of ThreadSanitizer's current fiber there and back; the thread's own
// context stays untouched). Returns false, the failed block's result.
bool abandon_block(Block& b) {
  for (int t = 0; t < b.num_threads; ++t) {
    Fiber& left = (*b.fibers)[t];
    if (left.done) continue;
    left.stopped = true;
    if (left.started) {
      race::switch_to(left.race_fiber, true);
      race::switch_to(b.host_fiber, true);
    }
  }
  return false;
}

// Runs one block to the end; false when it failed.
bool run_block(Block& b) {
  std::vector<Fiber>& fibers = *b.fibers;
  for (int t = 0; t < b.num_threads; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
#ifdef __SANITIZE_ADDRESS__
    // a thread stopped by fail() or an assertion never returned from its frames,
    // whose redzones would poison this launch's use of the stack
    __asan_unpoison_memory_region(f.stack.get(), kStackBytes);
#endif
    f.linear = t;
    f.index = dim3(t % b.dim.x, (t / b.dim.x) % b.dim.y, t / (b.dim.x * b.dim.y));
    f.done = false;
    f.waiting = 0;
    if (!f.race_fiber || f.stopped) {
      if (f.race_fiber) race::destroy(f.race_fiber);
      f.race_fiber = race::create();
      f.stopped = false;
    }
    f.started = false;
    // each stack's top moved by a different multiple of 64 bytes: the fibers' hot
    // frames otherwise share their offset in a page, hence their cache sets
    const size_t color = (size_t(t) * 64 * 37) % 4096;
    make_context(f.context, f.stack.get(), kStackBytes - color, fiber_main);
  }
  std::vector<int> order(b.num_threads);
  for (int t = 0; t < b.num_threads; ++t) order[t] = t;
  while (true) {
    std::shuffle(order.begin(), order.end(), g_rng);
    int live = 0, ran = 0;
    for (int t : order) {
      Fiber& f = fibers[t];
      if (f.done) continue;
      ++live;
      // a waiting fiber resumes only once its barrier or exchange has moved on
      if (f.waiting == 1 && b.generation == f.wait_generation) continue;
      if (f.waiting == 2 && b.warps[t / 32].generation == f.wait_generation) continue;
      f.waiting = 0;
      b.current = &f;
      race::switch_to(f.race_fiber, !f.started);  // a thread starts after what the host did
      f.started = true;
      switch_context(b.scheduler, f.context);
      b.current = nullptr;
      ++ran;
      if (b.failed) return abandon_block(b);
    }
    if (live == 0) return true;
    if (ran == 0) {
      // every live thread waits on a barrier or an exchange the others never reach
      int exited = 0;
      const Fiber* waiter = nullptr;
      for (int t = 0; t < b.num_threads; ++t) {
        if (fibers[t].done) ++exited;
        else if (!waiter) waiter = &fibers[t];
      }
      set_error(cudaErrorLaunchFailure,
                std::string(waiter->waiting == 1 ? "__syncthreads" : "warp shuffle") + " not reached by every thread: " +
                    std::to_string(exited) + " of " + std::to_string(b.num_threads) +
                    " threads had exited or wait elsewhere, e.g. " + where(b, *waiter) + " waits");
      return abandon_block(b);
    }
  }
}

}  // namespace

const dim3& thread_idx() { return block().current->index; }
const dim3& block_idx() { return block().index; }
const dim3& block_dim() { return block().dim; }
const dim3& grid_dim() { return block().grid; }

int sync_block(int pred) {
  Block& b = block();
  Fiber& f = *b.current;
  // (every thread releases before the last arrives, and acquires after: alternate objects,
  // as no thread can reach the barrier after next before every thread has left this one)
  void* sync_object = &b.sync_objects[b.generation % 2];
  race::release(sync_object);
  b.or_accumulated |= pred != 0;
  if (++b.arrived == b.num_threads) {
    b.arrived = 0;
    b.or_result = b.or_accumulated;
    b.or_accumulated = 0;
    ++b.generation;
    race::acquire(sync_object);
    return b.or_result;  // the others resume on the new generation
  }
  f.waiting = 1;
  f.wait_generation = b.generation;
  yield_to_scheduler();
  race::acquire(sync_object);
  return b.or_result;
}

void sync_warp(unsigned mask) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask (the emulation supports full warps only)");
  Block& b = block();
  Warp& w = b.warps[b.current->linear / 32];
  void* sync_object = &w.sync_objects[w.generation % 2];  // (the exchange this lane joins now)
  race::release(sync_object);
  warp_exchange(mask, 0, 0);
  race::acquire(sync_object);
}

void* dynamic_shared() {
  Block& b = block();
  if (b.dynamic_bytes == 0) fail("dynamic shared memory used by a launch that asked for none");
  return b.dynamic_shared;
}

int lane_id() { return block().current->linear % 32; }

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || size_t(bytes) > kMaxDynamicShared) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_max_dynamic_shared[kernel] = size_t(bytes);
  return cudaSuccess;
}

namespace {
// Every lane of the warp puts value; returns the warp's 32 slots once all have.
// kind: what the lanes do (an xor shuffle with this lane mask, >= 0, or
// kIndexedShuffle, kBallot); the lanes of one exchange must agree on it.
constexpr int kIndexedShuffle = -2, kBallot = -3;
const uint64_t* exchange(unsigned mask, uint64_t value, int kind) {
  Block& b = block();
  Fiber& f = *b.current;
  if (b.num_threads % 32 != 0) fail("warp shuffle in a block whose size is not a multiple of 32");
  if (mask != 0xffffffffu) fail("warp shuffle with a partial mask (the emulation supports full warps only)");
  Warp& w = b.warps[f.linear / 32];
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail("the lanes of a warp shuffle with different lane masks or kinds of shuffle");
  }
  uint64_t* slots = w.slots[w.generation % 2];
  slots[f.linear % 32] = value;
  // every lane puts its value; the last one releases the others
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
  } else {
    f.waiting = 2;
    f.wait_generation = w.generation;
    yield_to_scheduler();
  }
  // (the slots stay valid until this lane's next exchange: the others cannot get two ahead)
  return slots;
}
}  // namespace

uint64_t warp_exchange(unsigned mask, uint64_t value, int partner_xor) {
  if (partner_xor < 0 || partner_xor > 31) fail("warp shuffle lane mask outside [0, 31]");
  return exchange(mask, value, partner_xor)[lane_id() ^ partner_xor];
}

uint64_t warp_exchange_from(unsigned mask, uint64_t value, int src_lane) {
  return exchange(mask, value, kIndexedShuffle)[src_lane & 31];  // as __shfl_sync: src_lane modulo the width
}

unsigned warp_ballot(unsigned mask, bool pred) {
  const uint64_t* slots = exchange(mask, pred ? 1 : 0, kBallot);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= unsigned(slots[lane]) << lane;
  return bits;
}

// Ends the current thread and fails its launch with this error.
[[noreturn]] static void stop_thread(cudaError_t code, const std::string& message) {
  Block& b = block();
  set_error(code, message + " (" + where(b, *b.current) + ")");
  b.failed = true;
  b.current->stopped = true;
  leave_block(b);
  std::abort();  // never resumed
}

void fail(const char* message) { stop_thread(cudaErrorLaunchFailure, message); }

void device_assert(const char* assertion, const char* file, unsigned line, const char* function) {
  stop_thread(cudaErrorAssert, std::string("device-side assert triggered: ") + file + ":" + std::to_string(line) +
                                   ": " + function + ": Assertion `" + assertion + "` failed.");
}

void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block_size, size_t shared_bytes,
              const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block_size.x) * block_size.y * block_size.z;
  if (threads == 0 || threads > kMaxThreads || block_size.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid launch configuration: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                  std::to_string(grid.z) + ") block (" + std::to_string(block_size.x) + "," +
                  std::to_string(block_size.y) + "," + std::to_string(block_size.z) + ")");
    return;
  }
  size_t max_shared = kDefaultDynamicShared;
  {
    const std::lock_guard<std::mutex> lock(g_launch_mutex);
    const auto it = g_max_dynamic_shared.find(kernel);
    if (it != g_max_dynamic_shared.end()) max_shared = std::max(max_shared, it->second);
  }
  if (shared_bytes > max_shared) {
    set_error(cudaErrorInvalidConfiguration,
              "a launch asks for " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, over the " +
                  std::to_string(max_shared) + " its kernel may use (cudaFuncSetAttribute opts in to more)");
    return;
  }
  if (g_block) {
    std::fprintf(stderr, "cuda_emu: a kernel launched from device code\n");
    std::abort();
  }
  static const bool trace = std::getenv("CUDA_EMU_TRACE") != nullptr;
  if (trace) {
    std::fprintf(stderr, "cuda_emu: launch grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x, grid.y, grid.z, block_size.x,
                 block_size.y, block_size.z);
  }
  {
    const std::lock_guard<std::mutex> lock(g_launch_mutex);
    ++g_kernel_launches[name];
  }
  if (g_fibers.size() < threads) g_fibers.resize(threads);
  Block b;
  b.dim = block_size;
  b.grid = grid;
  b.num_threads = static_cast<int>(threads);
  b.fibers = &g_fibers;
  b.warps.resize((threads + 31) / 32);
  b.dynamic_bytes = shared_bytes;
  b.dynamic_buffer.resize(shared_bytes + 128);
  b.dynamic_shared = b.dynamic_buffer.data() + (128 - reinterpret_cast<uintptr_t>(b.dynamic_buffer.data()) % 128);
  b.body = &body;
  b.host_fiber = race::current();
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.index = dim3(x, y, z);
        b.arrived = 0;
        b.or_accumulated = 0;
        for (Warp& w : b.warps) w.arrived = 0;
        // what a block finds in its dynamic shared memory is undefined: NaN, not zeros
        std::memset(b.dynamic_shared, 0xff, b.dynamic_bytes);
        if (!run_block(b)) {
          g_block = nullptr;
          return;
        }
      }
    }
  }
  g_block = nullptr;
}

uint64_t launch_count() {
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  uint64_t total = 0;
  for (const auto& [name, count] : g_kernel_launches) total += count;
  return total;
}

std::string kernel_launches() {
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::string out;
  for (const auto& [name, count] : g_kernel_launches) out += name + "=" + std::to_string(count) + ";";
  return out;
}

cudaError_t take_last_error(const char** message) {
  static thread_local std::string last;
  const cudaError_t code = g_error_code;
  last = g_error;
  if (message) *message = last.c_str();
  g_error_code = cudaSuccess;
  g_error.clear();
  return code;
}

}  // namespace cuda_emu

// For the Python side (cuda_emulation.py's launch_count, through ctypes).
extern "C" uint64_t cuda_emu_launch_count() { return cuda_emu::launch_count(); }
// "name=count;..." of the launches so far per kernel name (valid until the next call).
extern "C" const char* cuda_emu_kernel_launches() {
  static std::string text;
  text = cuda_emu::kernel_launches();
  return text.c_str();
}
// Reseeds the calling thread's shuffle of the fibers' order (CUDA_EMU_SEED at start).
extern "C" void cuda_emu_seed(uint64_t seed) { cuda_emu::g_rng.seed(seed); }
