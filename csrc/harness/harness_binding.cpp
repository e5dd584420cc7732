// pybind11 entry point of the execution-model self-test kernels (harness.cu): _harness. Linked only
// into the harness modules (fastbert._C_host, fastbert._C_harness; CMakeLists.txt), never into
// fastbert._C.
#include <cstddef>
#include <cstdint>

#include "common/binding_util.h"
#include "common/stream.h"

#ifndef FASTBERT_HARNESS
#error "the harness is built only into the harness modules (FASTBERT_HARNESS, CMakeLists.txt)"
#endif

namespace fb {

void harness(int mode, int* out, unsigned grid, unsigned block, std::size_t smem_bytes, Stream stream);

void register_harness(py::module_& m) {
  m.def(
      "_harness",
      [](int mode, std::uintptr_t out, unsigned grid, unsigned block, std::size_t smem_bytes, std::uintptr_t stream,
         int device) {
        int* o = static_cast<int*>(bind::mut_ptr("out", out, 4, true));
        bind::positive("grid", grid);
        bind::positive("block", block);
        bind::DeviceGuard guard(device);
        harness(mode, o, grid, block, smem_bytes, bind::stream(stream));
      },
      py::kw_only(), "mode"_a, "out"_a, "grid"_a, "block"_a, "smem_bytes"_a = 0, "stream"_a = 0, "device"_a,
      "Execution-model self-test kernels (tests/test_cuda_harness.py); out: int32 [grid * block, 4].");
}

FB_REGISTER_BINDING(harness, register_harness);

}  // namespace fb
