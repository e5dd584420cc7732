// Element dtypes crossing the binding boundary (plain C++, both builds). The codes are the ones
// fastbert/backends/_cuda_ops.py passes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cstddef>

namespace fb {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline std::size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}

}  // namespace fb
