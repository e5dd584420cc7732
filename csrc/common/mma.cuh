// sm_80 tensor-core and async-copy wrappers, each with a host emulation for the host build.
//
//   mma_m16n8k16<T>   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix_x4/_x2   ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16
//   cp_async_16       cp.async.cg.shared.global (16 bytes) + commit / wait_group / wait_all
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Warp-level matrix load instruction: ldmatrix"), with lane = 4 * g + t (g = lane / 4, t = lane % 4);
// a 32-bit register holds two 16-bit elements, the lower-indexed one in the low half:
//   A (16x16, row-major): a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                         a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16x8,  "col"):     b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..2t+9][g]
//   C/D (16x8 fp32):      c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
//   ldmatrix: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m of a lane holds
//     M[g][2t..2t+1] (plain) or M[2t][g], M[2t+1][g] (.trans).
//
// The host emulation gathers every lane's operands through the execution model's warp exchange and
// lets each lane compute its own part, in fp32 with products summed in k order (the hardware's
// summation order is unspecified; results can differ in the last bits). cp.async is a plain
// synchronous 16-byte copy, so commit/wait are no-ops there.
#pragma once

#include <cstdint>
#include <cstring>

#include <type_traits>

#include "platform.cuh"

namespace fb {

// 16-bit element bits -> float, T = __half or __nv_bfloat16 (host emulation helper).
template <class T>
inline float elem_bits_to_float(uint16_t bits) {
  T x;
  std::memcpy(static_cast<void*>(&x), &bits, sizeof(bits));
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

// Pack two floats into one register of two 16-bit T (round to nearest even); lo -> low half.
template <class T>
FB_DEVICE uint32_t pack2(float lo, float hi) {
#if !FB_HOST_BUILD
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#else
  T l, h;
  if constexpr (std::is_same_v<T, __half>) {
    l = __float2half_rn(lo);
    h = __float2half_rn(hi);
  } else {
    l = __float2bfloat16_rn(lo);
    h = __float2bfloat16_rn(hi);
  }
  uint16_t lb, hb;
  std::memcpy(&lb, &l, sizeof(lb));
  std::memcpy(&hb, &h, sizeof(hb));
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
#endif
}

// D = A * B + C for one warp: m16n8k16, T = __half or __nv_bfloat16, fp32 accumulate (c in place).
template <class T>
FB_DEVICE void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if !FB_HOST_BUILD
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  struct Operands {
    uint32_t a[4];
    uint32_t b[2];
  };
  Operands mine;
  for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
  for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
  const auto all = host::warp_all_gather(kFullMask, mine);
  // This lane needs rows g and g+8 of A (held by lanes 4g..4g+3) and columns 2t, 2t+1 of B
  // (column n is held by lanes 4n..4n+3).
  const int lane = static_cast<int>(lane_id());
  const int g = lane >> 2, t = lane & 3;
  const auto lo = [](uint32_t r) { return elem_bits_to_float<T>(static_cast<uint16_t>(r & 0xffffu)); };
  const auto hi = [](uint32_t r) { return elem_bits_to_float<T>(static_cast<uint16_t>(r >> 16)); };
  float arow[2][16], bcol[2][16];
  for (int q = 0; q < 4; ++q) {
    const Operands op = all[4 * g + q];
    for (int half = 0; half < 2; ++half) {  // a[0]/a[2]: row g, a[1]/a[3]: row g+8
      arow[half][2 * q] = lo(op.a[half]);
      arow[half][2 * q + 1] = hi(op.a[half]);
      arow[half][2 * q + 8] = lo(op.a[half + 2]);
      arow[half][2 * q + 9] = hi(op.a[half + 2]);
    }
    for (int n = 0; n < 2; ++n) {
      const Operands ob = all[4 * (2 * t + n) + q];
      bcol[n][2 * q] = lo(ob.b[0]);
      bcol[n][2 * q + 1] = hi(ob.b[0]);
      bcol[n][2 * q + 8] = lo(ob.b[1]);
      bcol[n][2 * q + 9] = hi(ob.b[1]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int kk = 0; kk < 16; ++kk) acc += arow[i >> 1][kk] * bcol[i & 1][kk];
    c[i] = acc;
  }
#endif
}

#if FB_HOST_BUILD
namespace detail {
// ldmatrix emulation: lanes 8m..8m+7 address the rows of matrix m (m < num_matrices).
template <int kNum>
inline void ldmatrix_emulate(uint32_t (&r)[kNum], const void* row_addr, bool trans) {
  const auto addrs = host::warp_all_gather(kFullMask, row_addr);
  const int lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
  for (int m = 0; m < kNum; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(addrs[8 * m + g]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(addrs[8 * m + 2 * t])[g];
      hi = static_cast<const uint16_t*>(addrs[8 * m + 2 * t + 1])[g];
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}
}  // namespace detail
#endif

// Four 8x8 b16 matrices from shared memory; this lane's row address is `row_addr` (16-byte aligned).
FB_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#if !FB_HOST_BUILD
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  detail::ldmatrix_emulate<4>(r, row_addr, false);
#endif
}

FB_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#if !FB_HOST_BUILD
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  detail::ldmatrix_emulate<4>(r, row_addr, true);
#endif
}

// Two 8x8 matrices: lanes 0..15 give the addresses (the others' are ignored but must be valid).
FB_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row_addr) {
#if !FB_HOST_BUILD
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
#else
  detail::ldmatrix_emulate<2>(r, row_addr, false);
#endif
}

FB_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_addr) {
#if !FB_HOST_BUILD
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
#else
  detail::ldmatrix_emulate<2>(r, row_addr, true);
#endif
}

// 16-byte global -> shared copy (both addresses 16-byte aligned), asynchronous on sm_80+.
FB_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
#if !FB_HOST_BUILD
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src));
#else
  std::memcpy(smem_dst, gmem_src, 16);
#endif
}

FB_DEVICE void cp_async_commit() {
#if !FB_HOST_BUILD
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's most recent cp.async groups are still in flight (other
// threads still need a barrier before they read the data).
template <int N>
FB_DEVICE void cp_async_wait_group() {
#if !FB_HOST_BUILD
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Wait until every cp.async this thread issued has landed (other threads still need a barrier).
FB_DEVICE void cp_async_wait_all() {
#if !FB_HOST_BUILD
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace fb
