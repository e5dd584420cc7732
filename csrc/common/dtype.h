// Element dtypes crossing the binding boundary (plain C++, both builds). The codes are the ones
// fastbert/backends/cuda/_ext.py passes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cstddef>

namespace fb {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline std::size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}

}  // namespace fb

// FB_DTYPE_SWITCH(dtype, T, statements...): runs the statements with the type alias T = __half,
// __nv_bfloat16 or float for DType::kFloat16 / kBFloat16 / kFloat32: the one place where a run-time
// dtype picks a kernel template. Expand it in kernel files (platform.cuh provides the types). The
// binding validated the code, so anything else is float32.
#define FB_DTYPE_SWITCH(dtype, T, ...) \
  switch (dtype) {                     \
    case ::fb::DType::kFloat16: {      \
      using T = __half;                \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
    case ::fb::DType::kBFloat16: {     \
      using T = __nv_bfloat16;         \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
    default: {                         \
      using T = float;                 \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
  }
