// Element conversions and 16-byte vector accesses (both builds).
//
//   fb::to_float(x) / fb::from_float<T>(f)     for float, __half, __nv_bfloat16
//   fb::load_float(ptr, dtype, i)              runtime-dtype element read (parameters such as
//                                              an fp32 weight beside fp16 activations)
//   fb::Vec<T>  (16 bytes: 4 floats or 8 halves) with fb::load_vec / fb::store_vec
//   fb::is_aligned16(ptr)
#pragma once

#include <cstring>

#include "dtype.h"
#include "platform.cuh"

namespace fb {

FB_DEVICE float to_float(float x) { return x; }
FB_DEVICE float to_float(__half x) { return __half2float(x); }
FB_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
FB_DEVICE T from_float(float x);
template <>
FB_DEVICE float from_float<float>(float x) { return x; }
template <>
FB_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
FB_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round a float through T and back (the value a store of T keeps).
template <class T>
FB_DEVICE float round_to(float x) { return to_float(from_float<T>(x)); }

// Element i of a float32/float16/bfloat16 array whose dtype is known only at run time
// (a uniform branch: every thread of a launch takes the same one).
FB_DEVICE float load_float(const void* p, DType dtype, long long i) {
  switch (dtype) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

template <class T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

FB_HOST_DEVICE bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte load/store; `p` must be 16-byte aligned.
template <class T>
FB_DEVICE Vec<T> load_vec(const T* p) {
  Vec<T> r;
#if FB_HOST_BUILD
  std::memcpy(static_cast<void*>(&r), p, 16);
#else
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
#endif
  return r;
}

template <class T>
FB_DEVICE void store_vec(T* p, const Vec<T>& v) {
#if FB_HOST_BUILD
  std::memcpy(static_cast<void*>(p), &v, 16);
#else
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
#endif
}

}  // namespace fb
