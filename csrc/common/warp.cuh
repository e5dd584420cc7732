// Warp-intrinsic wrappers (both builds) and warp/block reductions built on them.
//
//   fb::shfl_xor(v, lane_mask[, mask])   == __shfl_xor_sync(mask, v, lane_mask)
//   fb::shfl(v, src_lane[, mask])        == __shfl_sync(mask, v, src_lane)
//   fb::shfl_down(v, delta[, mask])      == __shfl_down_sync(mask, v, delta)
//   fb::ballot(pred[, mask])             == __ballot_sync(mask, pred)
//   fb::syncwarp([mask])                 == __syncwarp(mask)
// Width is always 32. T may be any trivially copyable type whose size is a multiple of 4 bytes
// (structs shuffle word by word on the GPU). Host build: one exchange per call (host/host_runtime.h).
#pragma once

#include <cstring>
#include <type_traits>

#include "fault.h"
#include "platform.cuh"

namespace fb {

namespace detail {
#if !FB_HOST_BUILD
template <class T, class F>
FB_DEVICE T shuffle_words(T v, F&& f) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % 4 == 0, "shuffle: T must be 4-byte words");
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, int> || std::is_same_v<T, unsigned>) {
    return f(v);
  } else {
    constexpr int n = sizeof(T) / 4;
    unsigned w[n];
    memcpy(w, &v, sizeof(T));
#pragma unroll
    for (int i = 0; i < n; ++i) w[i] = f(w[i]);
    memcpy(&v, w, sizeof(T));
    return v;
  }
}
#else
template <class T>
T read_lane(const host::WarpSlots<T>& s, unsigned mask, unsigned src) {
  // Reading a source lane outside the mask is undefined on the GPU: a fault here.
  if (!((mask >> src) & 1u)) host::fault("shuffle reads a source lane outside its mask");
  return s[src];
}
#endif
}  // namespace detail

template <class T>
FB_DEVICE T shfl_xor(T v, int lane_mask, unsigned mask = kFullMask) {
#if FB_HOST_BUILD
  const auto s = host::warp_all_gather(mask, v);
  return detail::read_lane(s, mask, (lane_id() ^ static_cast<unsigned>(lane_mask)) & 31u);
#else
  return detail::shuffle_words(v, [&](auto w) { return __shfl_xor_sync(mask, w, lane_mask); });
#endif
}

template <class T>
FB_DEVICE T shfl(T v, int src_lane, unsigned mask = kFullMask) {
#if FB_HOST_BUILD
  const auto s = host::warp_all_gather(mask, v);
  return detail::read_lane(s, mask, static_cast<unsigned>(src_lane) & 31u);
#else
  return detail::shuffle_words(v, [&](auto w) { return __shfl_sync(mask, w, src_lane); });
#endif
}

template <class T>
FB_DEVICE T shfl_down(T v, unsigned delta, unsigned mask = kFullMask) {
#if FB_HOST_BUILD
  const auto s = host::warp_all_gather(mask, v);
  const unsigned src = lane_id() + delta;
  return src < 32 ? detail::read_lane(s, mask, src) : v;
#else
  return detail::shuffle_words(v, [&](auto w) { return __shfl_down_sync(mask, w, delta); });
#endif
}

FB_DEVICE unsigned ballot(bool pred, unsigned mask = kFullMask) {
#if FB_HOST_BUILD
  const auto s = host::warp_all_gather(mask, static_cast<unsigned char>(pred));
  unsigned out = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && s[i]) out |= 1u << i;
  return out;
#else
  return __ballot_sync(mask, pred);
#endif
}

FB_DEVICE void syncwarp(unsigned mask = kFullMask) {
#if FB_HOST_BUILD
  host::warp_exchange(mask, nullptr, 0);
#else
  __syncwarp(mask);
#endif
}

// Butterfly all-reduce over the 32 lanes with `op(a, b)`; every lane gets the result. The tree
// is fixed, so the result is deterministic (and identical on every lane).
template <class T, class Op>
FB_DEVICE T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, shfl_xor(v, offset));
  return v;
}

// All-reduce over the whole block (block size a multiple of 32, <= 1024 threads); every thread
// gets the result. `scratch` is __shared__ storage of >= 32 T. Contains two __syncthreads(), so
// every thread of the block must call it. fault == 2 drops the barrier that publishes the
// per-warp partials (the planted race the host harness must catch).
template <class T, class Op>
FB_DEVICE T block_allreduce(T v, Op op, T* scratch, int fault = 0) {
  v = warp_allreduce(v, op);
  const unsigned nwarps = block_size() / 32;
  if (nwarps == 1) return v;
  if (lane_id() == 0) scratch[warp_id()] = v;
  if (!FB_FAULT(fault == 2)) __syncthreads();
  T r = scratch[0];
  for (unsigned w = 1; w < nwarps; ++w) r = op(r, scratch[w]);
  __syncthreads();  // scratch may be reused right after
  return r;
}

}  // namespace fb
