// Host execution model: the fiber scheduler behind host_runtime.h (host build only).
#include "host_runtime.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"

namespace fb::host {
namespace {

enum class State { kNotStarted, kRunnable, kBlockWait, kWarpWait, kDone };

struct Fiber {
  jmp_buf ctx;
  ucontext_t start;
  unsigned char* stack = nullptr;
  State state = State::kNotStarted;
  uint3 tid{0, 0, 0};
};

struct Warp {
  unsigned arrived = 0;   // lanes waiting in the current exchange
  unsigned mask = 0;      // mask of the current exchange (all lanes must pass the same one)
  std::size_t bytes = 0;  // payload size of the current exchange (divergent ops show up here)
  unsigned gen = 0;       // exchange generation; slots alternate between two buffers
  alignas(16) unsigned char slots[2][32][kSlotBytes];
};

struct Launch {
  dim3 grid, block;
  unsigned nthreads = 0;
  unsigned live = 0;           // threads of the block that have not exited
  unsigned block_arrived = 0;  // live threads waiting at __syncthreads()
  unsigned current = 0;        // fiber running now
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory (over-allocated for alignment)
  unsigned char* smem_base = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  jmp_buf sched;
  std::string error;
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;  // one launch at a time: __shared__ is static storage

// Fiber stacks, reused across launches; each has a guard page below it.
std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("FASTBERT_HOST_STACK_KIB");
    const long kib = env ? std::atol(env) : 64;
    return static_cast<std::size_t>(kib > 16 ? kib : 16) * 1024;
  }();
  return bytes;
}
constexpr std::size_t kGuard = 4096;
std::vector<unsigned char*> g_stacks;

unsigned char* stack_for(unsigned i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, stack_bytes() + kGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw fb::RuntimeError("fastbert host runtime: mmap of a fiber stack failed");
    mprotect(p, kGuard, PROT_NONE);
    g_stacks.push_back(static_cast<unsigned char*>(p));
  }
  return g_stacks[i];
}

Launch& L() { return *g_launch; }
Fiber& cur() { return L().fibers[L().current]; }

std::string where() {
  const Fiber& f = cur();
  return str_cat("block (", blockIdx.x, ",", blockIdx.y, ",", blockIdx.z, ") thread (", f.tid.x, ",",
                 f.tid.y, ",", f.tid.z, ")");
}

[[noreturn]] void fail(const std::string& msg) {
  L().error = "fastbert host runtime: " + msg;
  _longjmp(L().sched, 1);
}

void yield() {
  if (_setjmp(cur().ctx) == 0) _longjmp(L().sched, 1);
}

void trampoline() {
  L().body(L().ctx);
  Launch& l = L();
  Fiber& f = cur();
  f.state = State::kDone;
  --l.live;
  // Exited threads count as arrived: release a barrier the remaining threads all wait at.
  if (l.live > 0 && l.block_arrived == l.live) {
    for (Fiber& g : l.fibers)
      if (g.state == State::kBlockWait) g.state = State::kRunnable;
    l.block_arrived = 0;
  }
  _longjmp(l.sched, 1);
}

void resume(unsigned i) {
  Launch& l = L();
  l.current = i;
  Fiber& f = l.fibers[i];
  threadIdx = f.tid;
  if (_setjmp(l.sched) == 0) {
    if (f.state == State::kNotStarted) {
      f.state = State::kRunnable;
      setcontext(&f.start);
    }
    _longjmp(f.ctx, 1);
  }
}

std::string describe_stuck(const Launch& l) {
  std::string s;
  for (std::size_t w = 0; w < l.warps.size(); ++w)
    if (l.warps[w].arrived)
      s += str_cat("; warp ", w, " waits in a warp op (mask 0x", std::hex, l.warps[w].mask, ", arrived 0x",
                   l.warps[w].arrived, std::dec, ")");
  return str_cat(l.block_arrived, " of ", l.live, " live threads wait at __syncthreads()", s);
}

void run_block(Launch& l) {
  ucontext_t tmpl;
  getcontext(&tmpl);
  for (unsigned i = 0; i < l.nthreads; ++i) {
    Fiber& f = l.fibers[i];
    f.state = State::kNotStarted;
    f.tid = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
    f.start = tmpl;
    f.start.uc_stack.ss_sp = f.stack + kGuard;
    f.start.uc_stack.ss_size = stack_bytes();
    f.start.uc_link = nullptr;
    makecontext(&f.start, trampoline, 0);
  }
  for (Warp& w : l.warps) {
    w.arrived = 0;
    w.gen = 0;
  }
  l.live = l.nthreads;
  l.block_arrived = 0;
  if (!l.smem.empty()) std::memset(l.smem.data(), 0xff, l.smem.size());
  while (l.live > 0) {
    bool ran = false;
    for (unsigned i = 0; i < l.nthreads; ++i) {
      const State s = l.fibers[i].state;
      if (s != State::kRunnable && s != State::kNotStarted) continue;
      resume(i);
      ran = true;
      if (!l.error.empty()) throw fb::RuntimeError(l.error);
    }
    if (!ran && l.live > 0) {
      throw fb::RuntimeError(str_cat("fastbert host runtime: deadlock in block (", blockIdx.x, ",", blockIdx.y,
                                     ",", blockIdx.z, "): ", describe_stuck(l),
                                     " (a warp op waits for lanes that are at a barrier or have exited)"));
    }
  }
}

}  // namespace

void syncthreads() {
  Launch& l = L();
  Fiber& f = cur();
  ++l.block_arrived;
  if (l.block_arrived == l.live) {
    for (Fiber& g : l.fibers)
      if (g.state == State::kBlockWait) g.state = State::kRunnable;
    l.block_arrived = 0;
    return;
  }
  f.state = State::kBlockWait;
  yield();
}

const unsigned char* warp_exchange(unsigned mask, const void* data, std::size_t bytes) {
  Launch& l = L();
  const unsigned rank = l.current;
  const unsigned lane = rank & 31u, wi = rank >> 5;
  Warp& w = l.warps[wi];
  const unsigned lanes_in_warp = l.nthreads - wi * 32 >= 32 ? 32 : l.nthreads - wi * 32;
  const unsigned exists = lanes_in_warp == 32 ? 0xffffffffu : (1u << lanes_in_warp) - 1u;
  if (!((mask >> lane) & 1u)) fail(str_cat(where(), ": warp op with mask 0x", std::hex, mask, " excludes the calling lane"));
  if (mask & ~exists)
    fail(str_cat(where(), ": warp op mask 0x", std::hex, mask, " names lanes that do not exist (block of ",
                 std::dec, l.nthreads, " threads)"));
  if (bytes > kSlotBytes) fail(str_cat(where(), ": warp exchange payload of ", bytes, " bytes > ", kSlotBytes));
  if (w.arrived == 0) {
    w.mask = mask;
    w.bytes = bytes;
  } else if (w.mask != mask || w.bytes != bytes) {
    fail(str_cat(where(), ": lanes of warp ", wi, " are in different warp ops (mask 0x", std::hex, w.mask,
                 " vs 0x", mask, std::dec, ", payload ", w.bytes, " vs ", bytes, " bytes): divergent warp code"));
  }
  const unsigned g = w.gen & 1u;
  if (bytes) std::memcpy(w.slots[g][lane], data, bytes);
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    for (unsigned i = 0; i < 32; ++i)
      if (((mask >> i) & 1u) && i != lane) l.fibers[wi * 32 + i].state = State::kRunnable;
    w.arrived = 0;
    ++w.gen;
  } else {
    for (unsigned i = 0; i < 32; ++i)
      if (((mask >> i) & 1u) && l.fibers[wi * 32 + i].state == State::kDone)
        fail(str_cat(where(), ": warp op mask 0x", std::hex, mask, " names lane ", std::dec, i, " which has exited"));
    cur().state = State::kWarpWait;
    yield();
  }
  return &w.slots[g][0][0];
}

unsigned char* dynamic_smem() { return L().smem_base; }

void fault(const char* what) { fail(str_cat(where(), ": ", what)); }

void run_grid(dim3 grid, dim3 block, std::size_t smem_bytes, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.nthreads = block.x * block.y * block.z;
  l.body = body;
  l.ctx = ctx;
  l.fibers.resize(l.nthreads);
  l.warps.resize((l.nthreads + 31) / 32);
  for (unsigned i = 0; i < l.nthreads; ++i) l.fibers[i].stack = stack_for(i);
  if (smem_bytes) {
    l.smem.resize(smem_bytes + 16);
    l.smem_base = l.smem.data() + (16 - reinterpret_cast<std::uintptr_t>(l.smem.data()) % 16) % 16;
  }
  g_launch = &l;
  struct Reset {
    ~Reset() { g_launch = nullptr; }
  } reset;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(l);
      }
}

}  // namespace fb::host
