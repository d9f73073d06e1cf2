// Runtime of the CUDA emulation (cuda_emu.h): launches, the per-block fiber scheduler,
// barriers, warp exchanges, the last-error state. One copy per emulated library.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {
namespace detail {

thread_local Thread* tl_thread = nullptr;
thread_local Block* tl_block = nullptr;
thread_local BlockGeom tl_geom;

namespace {

// ------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// switch_to(&save, load): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save, and resumes the context whose
// stack pointer is load (System V x86-64 ABI).
extern "C" void cuda_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
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
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (plus a guard page)
constexpr size_t kCanaryBytes = 64;          // past the dynamic shared memory
constexpr unsigned char kCanary = 0xA5;
constexpr unsigned char kPoison = 0xFF;     // NaN in every float format

struct Stack {
  char* base = nullptr;  // guard page, then kStackBytes
  size_t bytes = 0;
};

struct Warp {
  int size = 0;       // lanes that exist (32 but for a partial last warp)
  int live = 0;       // lanes not exited
  int arrived = 0;
  uint64_t gen = 0;
  alignas(16) unsigned char slot[2][32][16];
  uint32_t stamp[2][32];
};

}  // namespace

struct Block {
  const char* kernel = nullptr;
  const char* file = nullptr;
  int line = 0;
  int nthreads = 0;
  int live = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Stack> stacks;
  Entry entry = nullptr;
  void* ctx = nullptr;
  unsigned char* smem = nullptr;  // dynamic shared memory (+ canary)
  size_t smem_bytes = 0;
  std::vector<unsigned char> smem_store;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
  std::vector<ucontext_t> ucs;
#endif
  std::string error;
};

namespace {

thread_local cudaError_t tl_last_error = cudaSuccess;
thread_local std::string tl_message;
thread_local Block* tl_pool = nullptr;  // this host thread's block state (stacks reused)
// Scheduling order of the emulated threads (cuda_emu_set_schedule): 0 in thread order, the
// releasing thread of a barrier running on; 1 reverse order; 2 a seeded random order per
// pass, each eligible thread being left behind for a pass with probability 1/2. With 1 and 2
// the thread that releases a barrier yields too, so that which thread runs first after a
// barrier varies. 3: priority scheduling, warps in a seeded random priority order (lanes
// random within a warp), always running the highest-priority thread that can run. A correct kernel gives bitwise the same results under all.
int g_schedule = 0;
uint64_t g_seed = 0;
thread_local std::string tl_log;  // "kernel grid(x,y,z) block(x,y,z) smem\n" per launch

[[noreturn]] void fatal(const char* msg) {
  std::fprintf(stderr, "cuda_emu: %s\n", msg);
  std::abort();
}

void set_error(cudaError_t err, const std::string& msg) {
  tl_last_error = err;
  tl_message = msg;
}

std::string where(const Block* b) {
  return std::string(b->kernel) + " (launched at " + b->file + ":" + std::to_string(b->line) +
         ")";
}

std::string thread_name(const Block* b, const Thread* t) {
  const BlockGeom& g = tl_geom;
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", g.block_idx.x,
                g.block_idx.y, g.block_idx.z, t->idx.x, t->idx.y, t->idx.z);
  (void)b;
  return buf;
}

void fiber_main();

#if defined(__x86_64__)
void fiber_start() {  // entered by `ret` from cuda_emu_switch on a fresh stack
  fiber_main();
}
#endif

void to_scheduler(Thread* t) {
  Block* b = tl_block;
#if defined(__x86_64__)
  cuda_emu_switch(&t->sp, b->sched_sp);
#else
  swapcontext(&b->ucs[t->linear], &b->sched_uc);
#endif
}

void resume(Block* b, Thread* t) {
  tl_thread = t;
#if defined(__x86_64__)
  cuda_emu_switch(&b->sched_sp, t->sp);
#else
  swapcontext(&b->sched_uc, &b->ucs[t->linear]);
#endif
  tl_thread = nullptr;
}

// Records a failure of the running block and suspends the fiber for good.
[[noreturn]] void fail(const std::string& msg) {
  Block* b = tl_block;
  Thread* t = tl_thread;
  if (b->error.empty()) b->error = where(b) + ": " + thread_name(b, t) + ": " + msg;
  t->state = State::kDone;
  to_scheduler(t);
  fatal("a failed fiber was resumed");
}

void release_block_barrier(Block* b) {
  b->bar_arrived = 0;
  ++b->bar_gen;
}

void release_warp_barrier(Warp& w) {
  w.arrived = 0;
  ++w.gen;
}

void fiber_main() {
  Block* b = tl_block;
  Thread* t = tl_thread;
  b->entry(b->ctx);
  // Exited: no longer awaited by the block's or the warp's barriers.
  t->state = State::kDone;
  --b->live;
  Warp& w = b->warps[t->warp];
  --w.live;
  if (b->bar_arrived > 0 && b->bar_arrived == b->live) release_block_barrier(b);
  if (w.arrived > 0 && w.arrived == w.live) release_warp_barrier(w);
  to_scheduler(t);
  fatal("an exited fiber was resumed");
}

Stack make_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  Stack s;
  s.bytes = kStackBytes + page;
  void* p = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fatal("cannot allocate a fiber stack");
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  s.base = static_cast<char*>(p);
  return s;
}

void init_fiber(Block* b, Thread* t) {
  const Stack& s = b->stacks[t->linear];
  char* top = s.base + s.bytes;
#if defined(__x86_64__)
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--sp = 0;  // fiber_start's (never used) return address: rsp = 8 mod 16 at its entry
  *--sp = reinterpret_cast<uint64_t>(&fiber_start);
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  t->sp = sp;
#else
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ucontext_t& uc = b->ucs[t->linear];
  getcontext(&uc);
  uc.uc_stack.ss_sp = s.base + page;
  uc.uc_stack.ss_size = s.bytes - page;
  uc.uc_link = nullptr;
  makecontext(&uc, fiber_main, 0);
  (void)top;
#endif
}

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kWaitBlock: return "at __syncthreads";
    case State::kWaitWarp: return "at a warp barrier (shuffle / __syncwarp)";
    case State::kDone: return "exited";
  }
  return "?";
}

std::string describe_deadlock(Block* b) {
  std::string s = where(b) + ": block (" + std::to_string(tl_geom.block_idx.x) + "," +
                  std::to_string(tl_geom.block_idx.y) + "," +
                  std::to_string(tl_geom.block_idx.z) +
                  "): deadlock, no barrier can be released (divergent __syncthreads or "
                  "shuffle?):";
  // Runs of threads in the same state.
  int i = 0;
  while (i < b->nthreads) {
    int j = i;
    while (j + 1 < b->nthreads && b->threads[j + 1].state == b->threads[i].state) ++j;
    s += " threads " + std::to_string(i) + ".." + std::to_string(j) + " " +
         state_name(b->threads[i].state) + ";";
    i = j + 1;
  }
  return s;
}

// Runs every thread of the current block to completion; false (b->error set) on failure.
bool run_block(Block* b) {
  b->live = b->nthreads;
  b->bar_arrived = 0;
  for (Warp& w : b->warps) {
    w.live = w.size;
    w.arrived = 0;
    std::memset(w.stamp, 0, sizeof w.stamp);
  }
  for (Thread& t : b->threads) {
    t.state = State::kRunnable;
    t.shfl_seq = 0;
    init_fiber(b, &t);
  }
  // Fresh dynamic shared memory: poisoned (NaN bytes), canary past its end.
  std::memset(b->smem, kPoison, b->smem_bytes);
  std::memset(b->smem + b->smem_bytes, kCanary, kCanaryBytes);

  std::vector<int> order(b->nthreads);
  for (int i = 0; i < b->nthreads; ++i) order[i] = g_schedule == 1 ? b->nthreads - 1 - i : i;
  uint64_t rng = g_seed * 0x9E3779B97F4A7C15ull + tl_geom.block_idx.x * 0xBF58476D1CE4E5B9ull +
                 tl_geom.block_idx.y + 1;
  auto next = [&rng]() {  // xorshift64
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  auto eligible = [b](const Thread& t) {
    if (t.state == State::kDone) return false;
    if (t.state == State::kWaitBlock && t.wait_gen == b->bar_gen) return false;
    if (t.state == State::kWaitWarp && t.wait_gen == b->warps[t.warp].gen) return false;
    return true;
  };
  if (g_schedule == 3) {  // warps in a random priority order, lanes random within a warp
    const int nw = static_cast<int>(b->warps.size());
    std::vector<int> wo(nw);
    for (int w = 0; w < nw; ++w) wo[w] = w;
    for (int i = nw - 1; i > 0; --i) std::swap(wo[i], wo[next() % static_cast<uint64_t>(i + 1)]);
    order.clear();
    for (int w : wo) {
      const size_t at = order.size();
      for (int l = 0; l < b->warps[w].size; ++l) order.push_back(32 * w + l);
      for (size_t i = order.size() - 1; i > at; --i)
        std::swap(order[i], order[at + next() % static_cast<uint64_t>(i - at + 1)]);
    }
    // Always the highest-priority thread that can run: high-priority warps race ahead as far
    // as the barriers let them, low-priority ones lag as far behind as possible.
    while (b->live > 0) {
      int pick = -1;
      for (int ti : order)
        if (eligible(b->threads[ti])) {
          pick = ti;
          break;
        }
      if (pick < 0) {
        b->error = describe_deadlock(b);
        return false;
      }
      Thread& t = b->threads[pick];
      t.state = State::kRunnable;
      resume(b, &t);
      if (!b->error.empty()) return false;
    }
  }
  while (b->live > 0) {
    if (g_schedule == 2) {  // random order (Fisher-Yates)
      for (int i = b->nthreads - 1; i > 0; --i)
        std::swap(order[i], order[next() % static_cast<uint64_t>(i + 1)]);
    }
    int resumed = 0, first = -1;
    for (int ti : order) {
      Thread& t = b->threads[ti];
      if (!eligible(t)) continue;
      if (first < 0) first = ti;
      // Random schedule: an eligible thread is left behind for this pass with probability
      // 1/2, so that threads (lanes of a warp included) drift apart by several barriers.
      if (g_schedule == 2 && (next() & 1u)) continue;
      t.state = State::kRunnable;
      resume(b, &t);
      ++resumed;
      if (!b->error.empty()) return false;
    }
    if (resumed == 0 && first >= 0) {  // every eligible thread was left behind: run one
      Thread& t = b->threads[first];
      t.state = State::kRunnable;
      resume(b, &t);
      ++resumed;
      if (!b->error.empty()) return false;
    }
    if (resumed == 0) {
      b->error = describe_deadlock(b);
      return false;
    }
  }
  for (size_t k = 0; k < kCanaryBytes; ++k) {
    if (b->smem[b->smem_bytes + k] != kCanary) {
      b->error = where(b) + ": write past the end of the " + std::to_string(b->smem_bytes) +
                 " bytes of dynamic shared memory";
      return false;
    }
  }
  return true;
}

bool valid_config(dim3 grid, dim3 block) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return false;
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) return false;
  if (block.x == 0 || block.y == 0 || block.z == 0) return false;
  if (block.x > 1024u || block.y > 1024u || block.z > 64u) return false;
  return static_cast<uint64_t>(block.x) * block.y * block.z <= 1024u;
}

constexpr size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute's opt-in

}  // namespace

[[noreturn]] void outside_kernel(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s used outside a kernel\n", what);
  std::abort();
}

void syncthreads() {
  Thread* t = current();
  Block* b = tl_block;
  t->wait_gen = b->bar_gen;
  if (++b->bar_arrived == b->live) {
    release_block_barrier(b);
    if (g_schedule != 0) to_scheduler(t);  // runnable: resumed in the schedule's order
    return;
  }
  t->state = State::kWaitBlock;
  to_scheduler(t);
}

namespace {
void warp_barrier(Thread* t, Block* b) {
  Warp& w = b->warps[t->warp];
  t->wait_gen = w.gen;
  if (++w.arrived == w.live) {
    release_warp_barrier(w);
    if (g_schedule != 0) to_scheduler(t);
    return;
  }
  t->state = State::kWaitWarp;
  to_scheduler(t);
}

uint32_t lanes_mask(int size) { return size >= 32 ? 0xffffffffu : ((1u << size) - 1u); }
}  // namespace

void syncwarp(unsigned int mask) {
  Thread* t = current();
  Block* b = tl_block;
  const Warp& w = b->warps[t->warp];
  if ((mask & lanes_mask(w.size)) != lanes_mask(w.size))
    fail("__syncwarp with a partial mask is not emulated");
  warp_barrier(t, b);
}

void shfl_exchange(unsigned int mask, const void* value, void* out, size_t bytes, int src_lane,
                   const char* what) {
  Thread* t = current();
  Block* b = tl_block;
  Warp& w = b->warps[t->warp];
  if ((mask & lanes_mask(w.size)) != lanes_mask(w.size))
    fail(std::string(what) + " with a partial mask is not emulated (every lane must take part)");
  if (w.live != w.size)
    fail(std::string(what) + " with a full mask after lanes of the warp exited (undefined)");
  if (src_lane < 0 || src_lane >= w.size)
    fail(std::string(what) + " reads lane " + std::to_string(src_lane) + " past the warp");
  const uint32_t seq = ++t->shfl_seq;
  const int buf = static_cast<int>(seq & 1u);  // double-buffered: one barrier per shuffle
  std::memcpy(w.slot[buf][t->lane], value, bytes);
  w.stamp[buf][t->lane] = seq;
  warp_barrier(t, b);
  if (w.stamp[buf][src_lane] != seq)
    fail(std::string(what) + ": lane " + std::to_string(src_lane) +
         " is not at the same shuffle (divergent warp)");
  std::memcpy(out, w.slot[buf][src_lane], bytes);
}

unsigned char* dynamic_smem_ptr() {
  if (tl_block == nullptr || tl_thread == nullptr) outside_kernel("extern __shared__");
  return tl_block->smem;
}

cudaError_t launch_raw(const char* kernel, const char* file, int line, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream, Entry entry, void* ctx) {
  (void)stream;  // one in-order queue: every launch completes before it returns
  const std::string name = std::string(kernel) + " (launched at " + file + ":" +
                           std::to_string(line) + ")";
  if (tl_block != nullptr) {
    set_error(cudaErrorNotSupported, name + ": launch from a kernel is not emulated");
    return tl_last_error;
  }
  if (!valid_config(grid, block)) {
    set_error(cudaErrorInvalidConfiguration,
              name + ": invalid configuration grid (" + std::to_string(grid.x) + "," +
                  std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" +
                  std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                  std::to_string(block.z) + ")");
    return tl_last_error;
  }
  if (smem > kMaxDynamicSmem) {
    set_error(cudaErrorInvalidValue, name + ": " + std::to_string(smem) +
                                         " bytes of dynamic shared memory exceed 48 KiB");
    return tl_last_error;
  }
  if (tl_pool == nullptr) tl_pool = new Block();  // per host thread, kept for its stacks
  Block* b = tl_pool;
  b->kernel = kernel;
  b->file = file;
  b->line = line;
  b->entry = entry;
  b->ctx = ctx;
  b->error.clear();
  b->nthreads = static_cast<int>(block.x * block.y * block.z);
  while (b->stacks.size() < static_cast<size_t>(b->nthreads)) b->stacks.push_back(make_stack());
#if !defined(__x86_64__)
  b->ucs.resize(b->nthreads);
#endif
  b->threads.assign(b->nthreads, Thread{});
  for (int i = 0; i < b->nthreads; ++i) {
    Thread& t = b->threads[i];
    t.linear = i;
    t.idx = uint3{static_cast<unsigned>(i) % block.x,
                  (static_cast<unsigned>(i) / block.x) % block.y,
                  static_cast<unsigned>(i) / (block.x * block.y)};
    t.lane = i % 32;
    t.warp = i / 32;
  }
  const int nwarps = (b->nthreads + 31) / 32;
  b->warps.assign(nwarps, Warp{});
  for (int w = 0; w < nwarps; ++w) b->warps[w].size = w + 1 < nwarps ? 32 : b->nthreads - 32 * w;
  b->smem_bytes = smem;
  b->smem_store.assign(smem + kCanaryBytes + 16, 0);
  b->smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(b->smem_store.data()) + 15) & ~uintptr_t{15});

  tl_log += std::string(kernel) + " grid(" + std::to_string(grid.x) + "," +
            std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block(" +
            std::to_string(block.x) + "," + std::to_string(block.y) + "," +
            std::to_string(block.z) + ") smem " + std::to_string(smem) + "\n";
  tl_geom.grid = grid;
  tl_geom.block = block;
  tl_block = b;
  bool ok = true;
  for (unsigned z = 0; ok && z < grid.z; ++z)
    for (unsigned y = 0; ok && y < grid.y; ++y)
      for (unsigned x = 0; ok && x < grid.x; ++x) {
        tl_geom.block_idx = uint3{x, y, z};
        ok = run_block(b);
      }
  tl_block = nullptr;
  tl_thread = nullptr;
  if (!ok) {
    set_error(cudaErrorLaunchFailure, b->error);
    return tl_last_error;
  }
  return cudaSuccess;
}

}  // namespace detail
}  // namespace cuda_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::detail::tl_last_error;
  cuda_emu::detail::tl_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_emu::detail::tl_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Diagnostics for the test harness: the message of the last failed launch ("" if none) and
// clearing it.
extern "C" const char* cuda_emu_last_message() {
  return cuda_emu::detail::tl_message.c_str();
}
extern "C" void cuda_emu_clear_message() { cuda_emu::detail::tl_message.clear(); }

// Scheduling order of the emulated threads: 0 thread order, 1 reverse, 2 random (seeded).
extern "C" void cuda_emu_set_schedule(int mode, uint64_t seed) {
  cuda_emu::detail::g_schedule = mode;
  cuda_emu::detail::g_seed = seed;
}

// The launches since the last call ("kernel grid(..) block(..) smem N" lines), then cleared.
extern "C" const char* cuda_emu_take_log() {
  thread_local std::string taken;
  taken.swap(cuda_emu::detail::tl_log);
  cuda_emu::detail::tl_log.clear();
  return taken.c_str();
}
