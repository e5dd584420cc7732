// Planted faults: bugs put in on purpose so the tests can prove that the harness catches a kernel
// bug (tests/test_cuda_harness.py; csrc/README.md, "Fault injection"). Plain C++, both builds.
//
// One compile-time switch, FASTBERT_HARNESS, which CMake sets only for the harness modules
// (fastbert._C_host and the device check's fastbert._C_harness). Kernels test every fault as
// FB_FAULT(p.fault == n): in a harness build that is the condition; in the production fastbert._C
// it is the constant false, so no hook is left in a hot path, and the bindings reject a nonzero
// `fault_injection` (fb::bind::check_fault_injection).
#pragma once

namespace fb {

#ifdef FASTBERT_HARNESS
inline constexpr bool kHarnessBuild = true;
#else
inline constexpr bool kHarnessBuild = false;
#endif

}  // namespace fb

#define FB_FAULT(cond) (::fb::kHarnessBuild && (cond))
