// First include of every kernel file: selects the device build (nvcc) or the host build
// (g++ with -DFASTBERT_HOST, the `cuda-host` test module). Kernels are written once against
//   __global__ / __device__ / __shared__ / __syncthreads() / threadIdx / blockIdx / blockDim /
//   gridDim  (same spelling in both builds)
//   fb::launch(...)                                    (launch.cuh)
//   fb::shfl_xor / shfl / shfl_down / ballot / syncwarp (warp.cuh)
//   FB_DYNAMIC_SMEM(type, name)                        (dynamic shared memory, below)
//   fb::rsqrt, fb::umulhi                              (instructions without a host twin)
// and never use a raw intrinsic, `extern __shared__` or `<<<>>>` directly.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FB_HOST_BUILD 0
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Dynamic shared memory of the launch (the `smem_bytes` argument of fb::launch), 16-byte aligned.
#define FB_DYNAMIC_SMEM(type, name)                        \
  extern __shared__ __align__(16) unsigned char fb_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(fb_dynamic_smem_)
#elif defined(FASTBERT_HOST)
#define FB_HOST_BUILD 1
#include "host/host_runtime.h"
#define FB_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::fb::host::dynamic_smem())
#else
#error "csrc kernels compile with nvcc (device build) or with -DFASTBERT_HOST (host build)"
#endif

#define FB_DEVICE __device__ __forceinline__
#define FB_HOST_DEVICE __host__ __device__ __forceinline__

namespace fb {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Linear thread index within the block, lane and warp (x fastest, as CUDA numbers them).
FB_DEVICE unsigned thread_rank() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
FB_DEVICE unsigned block_size() { return blockDim.x * blockDim.y * blockDim.z; }
FB_DEVICE unsigned lane_id() { return thread_rank() & 31u; }
FB_DEVICE unsigned warp_id() { return thread_rank() >> 5; }

// 1 / sqrt(x): the hardware approximation on the GPU (<= 2 ulp), exact division on the host.
FB_DEVICE float rsqrt(float x) {
#if FB_HOST_BUILD
  return 1.0f / std::sqrt(x);
#else
  return rsqrtf(x);
#endif
}

// High 32 bits of a 32x32-bit product.
FB_DEVICE uint32_t umulhi(uint32_t a, uint32_t b) {
#if FB_HOST_BUILD
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#else
  return __umulhi(a, b);
#endif
}

}  // namespace fb
