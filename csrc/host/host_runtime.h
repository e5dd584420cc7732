// Host execution model (issue #6): runs CUDA kernels written against platform.cuh on the CPU.
//
// - Each thread block runs its threads as user-space fibers (ucontext to start, _setjmp/_longjmp
//   to switch: no syscall per switch); blocks run one after another, in blockIdx order (x fastest).
// - A fiber runs until it reaches __syncthreads() or a warp operation, then yields. A block barrier
//   releases when every live thread of the block has arrived (threads that have exited count as
//   arrived, as on sm_70+); a warp operation releases when every lane of its mask has arrived.
//   Scheduling is round-robin in thread order, so a run is deterministic.
// - __shared__ is `static` storage: correct because one block runs at a time (and one launch at a
//   time per process). Dynamic shared memory is a per-launch buffer, filled with 0xFF (NaN for
//   floats) before each block so a read before write shows.
// - Warp intrinsics go through a per-warp exchange: every lane deposits a value, all lanes read
//   all 32 after the sync point (warp_all_gather). Faults a GPU would hide or hang on (a lane not
//   in its own mask, lanes of one warp passing different masks or payload sizes, a mask naming an
//   exited or missing lane, a shuffle reading a lane outside its mask, a deadlock between a block
//   barrier and a warp op) raise RuntimeError.
// What it cannot show: races and timing (everything between two sync points runs as one atomic
// step per thread), memory-model effects, the GPU's math-function ulps, occupancy, and Hopper-only
// paths (wgmma/TMA). See csrc/README.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(FASTBERT_HOST_CUDA_HEADERS)
// CUDA's own host-capable types: dim3/uint3 and __half/__nv_bfloat16 with their conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>
#else
#include "host_types.h"
#endif

// CUDA's headers define the qualifiers as annotations for the host compiler; the execution model
// needs its own meaning for some of them.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __launch_bounds__(...)

// Per-fiber built-ins: the scheduler writes them before it resumes a fiber (one launch at a time).
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace fb::host {

// Largest payload one lane may contribute to a warp exchange.
constexpr std::size_t kSlotBytes = 256;

// Block barrier (the implementation of __syncthreads()).
void syncthreads();

// Deposit `bytes` (<= kSlotBytes) from the calling lane, wait until every lane in `mask` has done
// the same, and return the base of the 32 slots of this exchange (slot i at base + i * kSlotBytes).
// The slots stay valid until the calling lane's next warp operation.
const unsigned char* warp_exchange(unsigned mask, const void* data, std::size_t bytes);

// Abort the running launch with fb::RuntimeError("<block/thread>: <what>") (a fault a GPU would
// leave undefined, e.g. reading a shuffle source lane outside the mask).
[[noreturn]] void fault(const char* what);

// Dynamic shared memory of the running launch.
unsigned char* dynamic_smem();

// Run `body(ctx)` once per thread of every block of the grid, as described above. Throws
// fb::RuntimeError on an execution-model fault, naming the block and thread.
void run_grid(dim3 grid, dim3 block, std::size_t smem_bytes, void (*body)(void*), void* ctx);

// The 32 values of one warp exchange, indexed by lane.
template <class T>
struct WarpSlots {
  const unsigned char* base;
  T operator[](unsigned lane) const {
    T v;
    std::memcpy(&v, base + lane * kSlotBytes, sizeof(T));
    return v;
  }
};

// The generic warp primitive: each lane of `mask` contributes `value`; after the warp-level sync
// point every lane reads all 32 contributions (lanes outside `mask` hold stale data). Used by the
// shuffles below and to emulate mma.sync / ldmatrix fragment exchanges (mma.cuh).
template <class T>
WarpSlots<T> warp_all_gather(unsigned mask, const T& value) {
  static_assert(std::is_trivially_copyable_v<T>, "warp_all_gather: T must be trivially copyable");
  static_assert(sizeof(T) <= kSlotBytes, "warp_all_gather: payload larger than a slot");
  return WarpSlots<T>{warp_exchange(mask, &value, sizeof(T))};
}

}  // namespace fb::host

inline void __syncthreads() { fb::host::syncthreads(); }
