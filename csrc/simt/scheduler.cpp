// The SIMT emulator's runtime (see dialect.h): fibers for CUDA threads, the release rules
// of barriers and shuffles, the checks that turn a kernel bug into an exception naming
// the file and line, and the schedules (orders of blocks and of threads) that expose
// races as differing results.
#include <fenv.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt/dialect.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Under AddressSanitizer every switch between the scheduler's stack and a fiber's is
// announced to it (start) and completed on the new stack (finish): otherwise it takes a
// fiber's stack for wild memory, ignores the stack unpoisoning a throw asks for (a C++
// exception out of a kernel), and the poisoned frames left behind give false
// stack-buffer-overflow reports in the next kernel run on that stack.
#if defined(__SANITIZE_ADDRESS__)
#define NEPTUNE_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NEPTUNE_SIMT_ASAN 1
#endif
#endif
#if defined(NEPTUNE_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif


#if defined(__x86_64__)
// void neptune_simt_switch(void** save_sp, void* next_sp): saves the callee-saved registers
// and the SSE/x87 control words on this stack, stores the stack pointer, and resumes the
// other context. No signal mask (ucontext's swapcontext makes two system calls per switch).
extern "C" void neptune_simt_switch(void** save_sp, void* next_sp) __attribute__((visibility("hidden")));
asm(R"(
  .text
  .globl neptune_simt_switch
  .hidden neptune_simt_switch
  .type neptune_simt_switch, @function
neptune_simt_switch:
  .cfi_startproc
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
  .cfi_endproc
  .size neptune_simt_switch, .-neptune_simt_switch
)");
#endif

namespace simt {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // kernel arguments are copied per thread (up to 32 KB)
constexpr size_t kSharedBytes = 48 * 1024;  // static shared memory per block, as CUDA's limit

enum class St : uint8_t { kRunnable, kBarrier, kShfl, kDone, kFault };

struct Site {
  const char* file = nullptr;
  int line = 0;
  const void* addr = nullptr;  // the call's return address: one per inlined copy
  bool operator==(const Site& o) const { return addr == o.addr && line == o.line; }
};

std::string where(const Site& s) {
  const char* f = s.file ? s.file : "?";
  const char* slash = strrchr(f, '/');
  return std::string(slash ? slash + 1 : f) + ":" + std::to_string(s.line);
}

struct Fiber {
  uint3 tid{};
  St st = St::kRunnable;
  Site site;
  unsigned mask = 0;
  int lane_mask = 0;
  uint64_t value = 0, out = 0;
  std::string fault;
  char* stack = nullptr;
#if defined(NEPTUNE_SIMT_ASAN)
  void* asan_fake_stack = nullptr;
#endif
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct LaunchState {
  const char* kernel;
  std::string launched_at;
  uint3 block_idx{}, block_dim{}, grid_dim{};
  void (*run)(void*);
  void* closure;
  std::vector<Fiber> fibers;
  alignas(64) unsigned char shared[kSharedBytes];
  std::vector<std::pair<const void*, size_t>> shared_slots;  // declaration key -> offset
  size_t shared_used = 0;
#if defined(NEPTUNE_SIMT_ASAN)
  const void* sched_stack_bottom = nullptr;  // the scheduler's stack, as ASan reports it to a fiber
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
  bool stacks_dirty = false;  // a block ended by an exception: its fibers' frames are still poisoned
#endif
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
};

thread_local LaunchState* t_launch = nullptr;
thread_local Fiber* t_fiber = nullptr;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local int t_schedule = 0;

std::mutex g_mu;  // one launch at a time, process-wide: one launch state, one pool of fiber stacks
std::vector<char*> g_stacks;
Stats g_stats{};

char* stack_at(size_t k) {
  while (g_stacks.size() <= k) {
    const long page = sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("SIMT emulator: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
    g_stacks.push_back(static_cast<char*>(p) + page);
  }
  return g_stacks[k];
}

[[noreturn]] void fail(const LaunchState& L, const std::string& what) {
  throw std::runtime_error("SIMT emulator: kernel " + std::string(L.kernel) + " (launched at " + L.launched_at +
                           "), block " + std::to_string(L.block_idx.x) + ": " + what);
}

// The fiber side of a switch. `final`: the fiber has finished and never runs again.
void yield_to_scheduler(Fiber* f, bool final = false) {
  LaunchState* L = t_launch;
#if defined(NEPTUNE_SIMT_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake_stack, L->sched_stack_bottom, L->sched_stack_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  neptune_simt_switch(&f->sp, L->sched_sp);
#else
  swapcontext(&f->uc, &L->sched_uc);
#endif
#if defined(NEPTUNE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &L->sched_stack_bottom, &L->sched_stack_size);
#endif
}

extern "C" [[noreturn]] void neptune_simt_fiber_main() {
#if !defined(__x86_64__)
  fesetenv(FE_DFL_ENV);  // the device's FP environment: round to nearest, subnormals kept
#endif
#if defined(NEPTUNE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &t_launch->sched_stack_bottom, &t_launch->sched_stack_size);
#endif
  Fiber* f = t_fiber;
  try {
    t_launch->run(t_launch->closure);
    f->st = St::kDone;
  } catch (const std::exception& e) {
    f->st = St::kFault;
    f->fault = e.what();
  } catch (...) {
    f->st = St::kFault;
    f->fault = "unknown exception";
  }
  yield_to_scheduler(f, /*final=*/true);
  __builtin_trap();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
#if defined(__x86_64__)
  // Initial frame as neptune_simt_switch leaves it: control words, six registers, then the
  // "return address" neptune_simt_fiber_main at a 16-byte aligned slot (so it starts with
  // the stack alignment of a called function).
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  top -= 2;           // 16-byte aligned slot for the entry address, and one above it
  top[1] = 0;
  top[0] = reinterpret_cast<uint64_t>(&neptune_simt_fiber_main);
  uint64_t* sp = top - 7;
  for (int k = 1; k < 7; ++k) sp[k] = 0;
  const uint32_t mxcsr = 0x1F80u;  // default: round to nearest, no DAZ/FTZ (as the device)
  const uint16_t fpucw = 0x037Fu;
  memcpy(&sp[0], &mxcsr, 4);
  memcpy(reinterpret_cast<char*>(&sp[0]) + 4, &fpucw, 2);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, (void (*)())neptune_simt_fiber_main, 0);
#endif
}

void resume(LaunchState& L, Fiber& f) {
  t_fiber = &f;
  ++g_stats.switches;
#if defined(NEPTUNE_SIMT_ASAN)
  __sanitizer_start_switch_fiber(&L.sched_fake_stack, f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  neptune_simt_switch(&L.sched_sp, f.sp);
#else
  swapcontext(&L.sched_uc, &f.uc);
#endif
#if defined(NEPTUNE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(L.sched_fake_stack, nullptr, nullptr);
#endif
  t_fiber = nullptr;
}

std::string hex(unsigned m) {
  char b[16];
  snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

// Releases what can be released; false when nothing could be (the caller reports why).
bool release_shuffles(LaunchState& L) {
  const int n = (int)L.fibers.size();
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    unsigned handled = 0;
    for (int l = 0; l < kWarp && w0 + l < n; ++l) {
      Fiber& f = L.fibers[w0 + l];
      if (f.st != St::kShfl || (handled >> l & 1u)) continue;
      const unsigned m = f.mask;
      handled |= m;
      bool all_here = true;
      for (int j = 0; j < kWarp; ++j) {
        if (!(m >> j & 1u)) continue;
        if (w0 + j >= n)
          fail(L, "__shfl_xor_sync at " + where(f.site) + " (mask " + hex(m) + "): lane " + std::to_string(j) +
                      " of warp " + std::to_string(w0 / kWarp) + " does not exist (the block has " +
                      std::to_string(n) + " threads)");
        const Fiber& g = L.fibers[w0 + j];
        if (g.st == St::kDone)
          fail(L, "__shfl_xor_sync at " + where(f.site) + " (mask " + hex(m) + "): lane " + std::to_string(j) +
                      " of warp " + std::to_string(w0 / kWarp) + " has exited");
        if (g.st != St::kShfl || !(g.site == f.site) || g.mask != m) all_here = false;
      }
      if (!all_here) continue;
      for (int j = 0; j < kWarp; ++j) {
        if (!(m >> j & 1u)) continue;
        Fiber& g = L.fibers[w0 + j];
        const int src = j ^ g.lane_mask;
        if (src < 0 || src >= kWarp || !(m >> src & 1u))
          fail(L, "__shfl_xor_sync at " + where(g.site) + ": lane " + std::to_string(j) + " reads lane " +
                      std::to_string(src) + ", outside the mask " + hex(m));
        g.out = L.fibers[w0 + src].value;
      }
      for (int j = 0; j < kWarp; ++j)
        if (m >> j & 1u) L.fibers[w0 + j].st = St::kRunnable;
      released = true;
    }
  }
  return released;
}

// Called when no thread can run: release a barrier, or report the kernel bug.
void release_or_fail(LaunchState& L) {
  if (release_shuffles(L)) return;
  const int n = (int)L.fibers.size();
  int done = 0, at_barrier = 0, at_shfl = 0;
  const Fiber* first_bar = nullptr;
  const Fiber* first_shfl = nullptr;
  for (const Fiber& f : L.fibers) {
    if (f.st == St::kDone) ++done;
    if (f.st == St::kBarrier) {
      ++at_barrier;
      if (!first_bar) first_bar = &f;
    }
    if (f.st == St::kShfl) {
      ++at_shfl;
      if (!first_shfl) first_shfl = &f;
    }
  }
  if (at_barrier > 0 && at_shfl == 0) {
    if (done > 0)
      fail(L, "__syncthreads at " + where(first_bar->site) + " reached by " + std::to_string(at_barrier) +
                  " threads after " + std::to_string(done) + " threads of the block exited");
    for (const Fiber& f : L.fibers)
      if (!(f.site == first_bar->site))
        fail(L, "threads of one block wait at different barriers: thread " + std::to_string(first_bar->tid.x) +
                    " at " + where(first_bar->site) + ", thread " + std::to_string(f.tid.x) + " at " +
                    where(f.site) + (f.site.line == first_bar->site.line ? " (another inlined copy)" : ""));
    for (Fiber& f : L.fibers) f.st = St::kRunnable;
    return;
  }
  if (first_shfl != nullptr) {
    // A shuffle that cannot complete: say where its missing lanes are.
    const int w0 = (int)(first_shfl->tid.x / kWarp) * kWarp;
    for (int j = 0; j < kWarp; ++j) {
      if (!(first_shfl->mask >> j & 1u) || w0 + j >= n) continue;
      const Fiber& g = L.fibers[w0 + j];
      std::string other;
      if (g.st == St::kBarrier) other = "waits at __syncthreads at " + where(g.site);
      else if (g.st == St::kShfl && !(g.site == first_shfl->site)) other = "waits at another shuffle, " + where(g.site);
      else if (g.st == St::kShfl && g.mask != first_shfl->mask) other = "waits with another mask, " + hex(g.mask);
      if (!other.empty())
        fail(L, "__shfl_xor_sync at " + where(first_shfl->site) + " (mask " + hex(first_shfl->mask) + ", warp " +
                    std::to_string(w0 / kWarp) + "): lane " +
                    std::to_string(j) + " " + other);
    }
  }
  fail(L, "deadlock: " + std::to_string(at_barrier) + " threads at barriers, " + std::to_string(at_shfl) +
              " at shuffles, " + std::to_string(done) + " exited, of " + std::to_string(n));
}

std::vector<int64_t> order_of(int64_t n, int schedule, uint64_t salt) {
  std::vector<int64_t> o((size_t)n);
  for (int64_t i = 0; i < n; ++i) o[(size_t)i] = i;
  if (schedule == 1) {
    std::reverse(o.begin(), o.end());
  } else if (schedule >= 2) {
    std::mt19937_64 rng((uint64_t)schedule * 0x9E3779B97F4A7C15ull ^ salt);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

void run_block(LaunchState& L, int64_t b) {
  memset(L.shared, 0xFF, sizeof L.shared);  // poison: a read before this block's write shows
  L.shared_slots.clear();
  L.shared_used = 0;
  L.block_idx = uint3{(unsigned)b, 0, 0};
  const int n = (int)L.block_dim.x;
#if defined(NEPTUNE_SIMT_ASAN)
  // The fibers of a block that failed never returned from their frames: clear their poison.
  if (L.stacks_dirty)
    for (char* s : g_stacks) ASAN_UNPOISON_MEMORY_REGION(s, kStackBytes);
  L.stacks_dirty = true;  // until this block ends normally
#endif
  L.fibers.assign((size_t)n, Fiber{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = L.fibers[(size_t)t];
    f.tid = uint3{(unsigned)t, 0, 0};
    f.stack = stack_at((size_t)t);
    start_fiber(f);
  }
  g_stats.threads += n;
  uint64_t round = 0;
  for (;;) {
    const std::vector<int64_t> order = order_of(n, t_schedule, ((uint64_t)b << 20) ^ round++);
    bool any_live = false;
    for (int64_t t : order) {
      Fiber& f = L.fibers[(size_t)t];
      if (f.st != St::kRunnable) continue;
      resume(L, f);
      if (f.st == St::kFault) fail(L, "thread " + std::to_string(t) + ": " + f.fault);
    }
    for (const Fiber& f : L.fibers) any_live = any_live || f.st != St::kDone;
    if (!any_live) break;
    release_or_fail(L);
  }
#if defined(NEPTUNE_SIMT_ASAN)
  L.stacks_dirty = false;
#endif
}

}  // namespace

const uint3& thread_idx() { return t_fiber->tid; }
const uint3& block_idx() { return t_launch->block_idx; }
const uint3& block_dim() { return t_launch->block_dim; }
const uint3& grid_dim() { return t_launch->grid_dim; }

void syncthreads(const char* file, int line) {
  Fiber* f = t_fiber;
  if (f == nullptr) throw std::logic_error("SIMT emulator: __syncthreads outside a kernel");
  f->site = Site{file, line, __builtin_return_address(0)};
  f->st = St::kBarrier;
  yield_to_scheduler(f);
}

uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, const char* file, int line) {
  Fiber* f = t_fiber;
  if (f == nullptr) throw std::logic_error("SIMT emulator: __shfl_xor_sync outside a kernel");
  const Site site{file, line, __builtin_return_address(0)};
  const int lane = (int)(f->tid.x % kWarp);
  if (!(mask >> lane & 1u))
    throw std::runtime_error("__shfl_xor_sync at " + where(site) + ": called by lane " + std::to_string(lane) +
                             ", which is not in its mask " + hex(mask));
  f->site = site;
  f->mask = mask;
  f->lane_mask = lane_mask;
  f->value = bits;
  f->st = St::kShfl;
  yield_to_scheduler(f);
  return f->out;
}

void* shared_array(const void* key, size_t bytes, size_t align) {
  LaunchState* L = t_launch;
  if (L == nullptr || t_fiber == nullptr) throw std::logic_error("SIMT emulator: shared memory outside a kernel");
  for (const auto& s : L->shared_slots)
    if (s.first == key) return L->shared + s.second;
  const size_t off = (L->shared_used + align - 1) / align * align;
  if (off + bytes > kSharedBytes)
    throw std::runtime_error("static shared memory over " + std::to_string(kSharedBytes) + " bytes per block");
  L->shared_slots.emplace_back(key, off);
  L->shared_used = off + bytes;
  return L->shared + off;
}

void check_vector_access(const void* p, const char* what, const char* file, int line) {
  if (((uintptr_t)p & 15u) == 0) return;
  char buf[64];
  snprintf(buf, sizeof buf, "%p", p);
  std::string msg = std::string("misaligned 16-byte vector ") + what + " at " + buf;
  if (file != nullptr) msg += " (" + where(Site{file, line, nullptr}) + ")";
  if (t_fiber != nullptr) throw std::runtime_error(msg);
  throw std::logic_error("SIMT emulator: " + msg);
}

void launch(const char* kernel, const char* file, int line, int64_t grid, int64_t block, void (*run)(void*),
            void* closure) {
  if (grid <= 0 || grid > INT_MAX || block <= 0 || block > kMaxThreads) {
    t_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  static LaunchState* const state = new LaunchState();  // 48 KB of shared memory: not on the stack
  LaunchState& L = *state;
  L.kernel = kernel;
  L.launched_at = where(Site{file, line, nullptr});
  L.block_dim = uint3{(unsigned)block, 1, 1};
  L.grid_dim = uint3{(unsigned)grid, 1, 1};
  L.run = run;
  L.closure = closure;
  struct Restore {
    LaunchState* saved;
    ~Restore() { t_launch = saved; t_fiber = nullptr; }
  } restore{t_launch};
  t_launch = &L;
  ++g_stats.launches;
  for (int64_t b : order_of(grid, t_schedule, 0x5EEDull)) {
    ++g_stats.blocks;
    run_block(L, b);
  }
}

cudaError_t take_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return t_last_error; }
void set_last_error(cudaError_t err) { t_last_error = err; }

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaError (unknown code)";
}

int schedule() { return t_schedule; }
ScheduleScope::ScheduleScope(int s) : saved_(t_schedule) {
  if (s < 0) throw std::invalid_argument("SIMT emulator: schedule must be >= 0, got " + std::to_string(s));
  t_schedule = s;
}
ScheduleScope::~ScheduleScope() { t_schedule = saved_; }

Stats stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_stats;
}

}  // namespace simt
