// Self-test kernels of the execution model (tests/test_cuda_harness.py): shuffles, ballots,
// block reductions, static and dynamic shared memory, and faults the host runtime must report.
// Tiny; built into the harness modules only (fastbert._C_host, and fastbert._C_harness for the GPU
// run of the same expectations), never into fastbert._C.
#include "common/launch.cuh"
#include "common/platform.cuh"
#include "common/warp.cuh"

namespace fb {
namespace {

struct Gathered {
  int lane;
  float weight[3];
};

// out: int32 [grid * block, 4]; each thread writes its four results.
__global__ void harness_kernel(int mode, int* out) {
  const unsigned t = thread_rank(), lane = lane_id(), n = block_size();
  int* o = out + (static_cast<long long>(blockIdx.x) * n + t) * 4;
  const auto plus = [](int a, int b) { return a + b; };
  if (mode == 0) {  // shuffles and ballot
    o[0] = warp_allreduce(static_cast<int>(lane), plus);
    o[1] = shfl(static_cast<int>(lane) * 10, 3);
    o[2] = shfl_down(static_cast<int>(lane), 1u);
    o[3] = static_cast<int>(ballot(lane & 1u));
  } else if (mode == 1) {  // block reduction, static and dynamic shared memory
    __shared__ int scratch[32];
    __shared__ int tile[1024];
    FB_DYNAMIC_SMEM(int, dyn);
    o[0] = block_allreduce(static_cast<int>(t), plus, scratch);
    tile[t] = static_cast<int>(t + 1000 * blockIdx.x);
    o[2] = dyn[t];  // before any write: 0xFFFFFFFF on the host (poisoned), undefined on a GPU
    __syncthreads();
    o[1] = tile[n - 1 - t];
    dyn[t] = static_cast<int>(2 * t);
    __syncthreads();
    o[3] = dyn[(t + 1) % n];
  } else if (mode == 2) {  // fault: a warp op whose mask names lanes that exited
    if (lane >= 16) return;
    o[0] = shfl(static_cast<int>(lane), 0);
  } else if (mode == 3) {  // fault: half a warp at a block barrier, half in a warp op
    if (lane < 16)
      __syncthreads();
    else
      o[0] = shfl(static_cast<int>(lane), 0);
  } else if (mode == 4) {  // fault: lanes of one warp in different warp ops
    if (lane < 16)
      o[0] = shfl(static_cast<int>(lane), 0);
    else
      o[0] = static_cast<int>(shfl(static_cast<long long>(lane), 0));
  } else if (mode == 6) {  // fault: a shuffle reads a lane outside its mask
    if (lane < 16) o[0] = shfl(static_cast<int>(lane), 20, 0x0000ffffu);
  } else if (mode == 5) {  // the generic warp exchange (host build only)
#if FB_HOST_BUILD
    const Gathered mine{static_cast<int>(lane), {0.5f * lane, 1.0f, -1.0f}};
    const auto all = host::warp_all_gather(kFullMask, mine);
    int sum = 0;
    for (unsigned i = 0; i < 32; ++i) sum += all[i].lane + static_cast<int>(all[i].weight[0] * 2.0f);
    o[0] = sum;
    o[1] = all[(lane + 5) & 31u].lane;
#endif
  }
}

}  // namespace

void harness(int mode, int* out, unsigned grid, unsigned block, std::size_t smem_bytes, Stream stream) {
  FB_CHECK_ARG(mode >= 0 && mode <= 6, "mode: expected 0..6, got ", mode);
  launch(harness_kernel, dim3(grid), dim3(block), smem_bytes, stream, mode, out);
}

}  // namespace fb
