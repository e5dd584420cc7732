// fb::launch: the one way kernels are launched, in both builds.
//
//   fb::launch(kernel, grid, block, smem_bytes, stream, args...);
//
// Device build: kernel<<<grid, block, smem_bytes, stream>>>(args...), raising the dynamic shared
// memory limit first when smem_bytes > 48 KiB, then cudaGetLastError() -> fb::RuntimeError.
// Host build: runs the grid on the CPU fibers of host/host_runtime.h, synchronously; `stream` ignored.
// Both check the launch shape first (fb::ArgError).
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "error.h"
#include "platform.cuh"
#include "stream.h"

#if !FB_HOST_BUILD
// FB_CUDA_CHECK(cudaCall(...)): throws fb::RuntimeError with the CUDA error name and string.
#define FB_CUDA_CHECK(expr)                                                                     \
  do {                                                                                          \
    const cudaError_t fb_err_ = (expr);                                                         \
    if (fb_err_ != cudaSuccess)                                                                 \
      throw ::fb::RuntimeError(::fb::str_cat("CUDA error ", cudaGetErrorName(fb_err_), ": ",    \
                                             cudaGetErrorString(fb_err_), " (", #expr, " at ", \
                                             __FILE__, ":", __LINE__, ")"));                   \
  } while (0)
#endif

namespace fb {

inline void check_launch_shape(dim3 grid, dim3 block, std::size_t smem_bytes) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  FB_CHECK_ARG(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535u &&
                   grid.z <= 65535u,
               "launch: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") out of range");
  FB_CHECK_ARG(threads >= 1 && threads <= 1024, "launch: block of ", threads, " threads, expected 1..1024");
  FB_CHECK_ARG(smem_bytes <= 227u * 1024u, "launch: ", smem_bytes, " bytes of dynamic shared memory > 227 KiB");
}

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Stream stream,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "fb::launch: wrong number of kernel arguments");
  check_launch_shape(grid, block, smem_bytes);
#if FB_HOST_BUILD
  (void)stream;
  std::tuple<std::decay_t<Params>...> packed(std::forward<Args>(args)...);
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...>* args;
  } ctx{kernel, &packed};
  // Every fiber calls the kernel with its own copies of the arguments, as a GPU thread would.
  host::run_grid(grid, block, smem_bytes,
                 [](void* p) {
                   auto* c = static_cast<Ctx*>(p);
                   std::apply(c->kernel, *c->args);
                 },
                 &ctx);
#else
  if (smem_bytes > 48u * 1024u)
    FB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem_bytes)));
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  FB_CUDA_CHECK(cudaGetLastError());
#endif
}

}  // namespace fb
