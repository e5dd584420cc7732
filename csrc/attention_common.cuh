// Pieces shared by the attention forward and backward kernels (attention_fwd.cu, attention_bwd.cu).
//
// Work split: one warp owns 16 rows of the "row" operand (queries in the forward and dq kernels,
// keys in the dk/dv kernel) and keeps its accumulators in the m16n8 C-fragment layout of
// mma.cuh: element e of n-tile j of lane (g, t) sits at row g + 8 * (e / 2), column
// 8 * j + 2 * t + e % 2. Masking, softmax, dropout and the dS formula act on that layout; only the
// two matrix products differ between the tensor-core path (fp16/bf16: ldmatrix + mma.sync) and the
// plain path (fp32: scalar FMAs from shared memory), so both run the same masking code.
//
// Shared-memory tiles are [rows][kLds] with rows beyond the sequence and columns beyond head_dim
// zero-filled, so a head_dim smaller than its bucket (DP = 64/128/256) costs no special case in
// the products: the padded lanes multiply zeros. Loops over k-steps and output column tiles stop at
// head_dim at run time.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "common/fault.h"
#include "common/mma.cuh"
#include "common/philox.cuh"
#include "common/platform.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"

namespace fb::attn {

constexpr float kLog2e = 1.4426950408889634f;

// Scores stay in natural units in every path, and the exponentials take the (bounded) differences
// s - m: exp(d) is exp2f(d * log2(e)) on the tensor-core paths (one MUFU op) and expf on the fp32
// path (fewer roundings: fp32 gradients are held to fp32 accuracy). Scaling the scores themselves
// by log2(e) would overflow a finite finfo(fp32).min score to -inf and empty a row that the
// contract says averages V.
template <class T>
FB_DEVICE float exp_unit(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(x);
  } else {
    return exp2f(x * kLog2e);
  }
}

template <class T>
constexpr bool kTensorCores = !std::is_same_v<T, float>;

// Row pitch of a shared tile: DP + 16 bytes, so the 8 rows of an ldmatrix hit 8 distinct 16-byte
// bank groups and every row start stays 16-byte aligned.
template <class T, int DP>
constexpr int kLds = DP + 16 / static_cast<int>(sizeof(T));

// Head-dim bucket (the tile width) for a supported head_dim. Three buckets keep the build short;
// a smaller head_dim skips the padded k-steps and column tiles at run time, so it costs registers
// and shared memory, not tensor-core work.
inline int head_dim_bucket(int head_dim) {
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
}

// f(std::integral_constant<int, DP>{}) for head_dim's bucket DP: the launch of each kernel template.
template <class F>
void with_head_dim_bucket(int head_dim, F&& f) {
  switch (head_dim_bucket(head_dim)) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

// Where sequence b starts (token row of its first element) and how long it is.
struct SeqInfo {
  int64_t q_row0, k_row0;
  int seqlen_q, seqlen_k;
};

FB_DEVICE SeqInfo seq_info(const AttnParams& p, int b) {
  if (p.cu_seqlens != nullptr) {
    const int start = p.cu_seqlens[b], end = p.cu_seqlens[b + 1];
    return SeqInfo{start, start, end - start, end - start};
  }
  return SeqInfo{0, 0, p.max_seqlen_q, p.max_seqlen_k};
}

// Row `row` (token row: varlen rows include the sequence start) of head h of sequence b.
template <class T>
FB_DEVICE T* row_ptr(const AttnTensor& t, int b, int h, int64_t row) {
  return static_cast<T*>(t.ptr) + b * t.stride_batch + row * t.stride_seq + h * t.stride_head;
}

// Every row of a tile.
struct AllRows {
  FB_DEVICE bool operator()(int) const { return true; }
};

// Copy rows [0, nrows) x columns [0, head_dim) of a global [rows][row_stride] block into the shared
// tile s[ROWS][kLds]; every other element of the tile's first DP columns is zeroed, and so is every
// row r for which !row_ok(r) (keys masked by attention_mask: replaced by zero rows, so whatever
// they hold, NaN or Inf, has no influence on any product). 16-byte chunks: cp.async when the rows
// are 16-byte aligned, element copies otherwise. The caller commits, waits and synchronises.
template <class T, int ROWS, int DP, int NTHREADS, class RowOk = AllRows>
FB_DEVICE void load_tile(T* s, const T* g, int64_t row_stride, int nrows, int head_dim, bool aligned16,
                         RowOk row_ok = RowOk{}) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = DP / kChunk;
  constexpr int kLd = kLds<T, DP>;
  for (int c = static_cast<int>(thread_rank()); c < ROWS * kChunksPerRow; c += NTHREADS) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
    T* dst = s + r * kLd + col;
    if (r < nrows && col < head_dim && row_ok(r)) {
      const T* src = g + r * row_stride + col;
      if (aligned16) {
        cp_async_16(dst, src);
      } else {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) dst[e] = src[e];
      }
    } else {
      store_vec(dst, Vec<T>{});
    }
  }
}

// acc[16 x 8*NT] += A[16 x head_dim] * B[8*NT x head_dim]^T, with A = the warp's 16 rows of a
// shared tile (sA) and B = NT*8 rows of another (sB), both [rows][kLds].
template <class T, int NT, int DP>
FB_DEVICE void gemm_nt(float (&acc)[NT][4], const T* sA, const T* sB, int head_dim) {
  constexpr int kLd = kLds<T, DP>;
  const int lane = static_cast<int>(lane_id());
  if constexpr (kTensorCores<T>) {
    static_assert(NT % 2 == 0, "gemm_nt: NT must be even");
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      if (kk * 16 < head_dim) {
        uint32_t a[4];
        // A fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15).
        ldmatrix_x4(a, sA + (lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          // B fragments of n-tiles j and j+1: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
          // (n 8-15, k 0-7), (n 8-15, k 8-15) of the [n][k] tile.
          uint32_t bq[4];
          ldmatrix_x4(bq, sB + (j * 8 + lane % 8 + 8 * (lane / 16)) * kLd + kk * 16 + 8 * ((lane / 8) % 2));
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
          mma_m16n8k16<T>(acc[j], a, b0);
          mma_m16n8k16<T>(acc[j + 1], a, b1);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
    for (int k = 0; k < head_dim; k += 4) {
      const Vec<float> a0 = load_vec(sA + g * kLd + k), a1 = load_vec(sA + (g + 8) * kLd + k);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const Vec<float> b0 = load_vec(sB + (8 * j + 2 * t) * kLd + k);
        const Vec<float> b1 = load_vec(sB + (8 * j + 2 * t + 1) * kLd + k);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[j][0] += a0.v[e] * b0.v[e];
          acc[j][1] += a0.v[e] * b1.v[e];
          acc[j][2] += a1.v[e] * b0.v[e];
          acc[j][3] += a1.v[e] * b1.v[e];
        }
      }
    }
  }
}

// acc[16 x 8*DT] += P[16 x 8*NP] * B[8*NP x head_dim], with P in C-fragment registers (rounded to
// T first: the tensor-core path feeds them to mma as A fragments, the FA2 register reuse) and B a
// shared tile [8*NP rows][kLds]. The plain path stages P through the warp's `scratch`
// ([16][8*NP + 4] floats) instead.
template <class T, int NP, int DT, int DP>
FB_DEVICE void gemm_pn(float (&acc)[DT][4], const float (&pf)[NP][4], const T* sB, float* scratch,
                       int head_dim) {
  constexpr int kLd = kLds<T, DP>;
  const int lane = static_cast<int>(lane_id());
  if constexpr (kTensorCores<T>) {
    static_assert(NP % 2 == 0 && DT % 2 == 0, "gemm_pn: NP and DT must be even");
    (void)scratch;
#pragma unroll
    for (int kk = 0; kk < NP / 2; ++kk) {
      // C fragments of n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk.
      const uint32_t a[4] = {pack2<T>(pf[2 * kk][0], pf[2 * kk][1]), pack2<T>(pf[2 * kk][2], pf[2 * kk][3]),
                             pack2<T>(pf[2 * kk + 1][0], pf[2 * kk + 1][1]),
                             pack2<T>(pf[2 * kk + 1][2], pf[2 * kk + 1][3])};
#pragma unroll
      for (int jd = 0; jd < DT; jd += 2) {
        if (jd * 8 < head_dim) {
          // B fragments of column tiles jd, jd+1 from the [k][n] tile, transposed on load:
          // matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
          uint32_t bq[4];
          ldmatrix_x4_trans(bq, sB + (kk * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * kLd + jd * 8 + 8 * (lane / 16));
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
          mma_m16n8k16<T>(acc[jd], a, b0);
          mma_m16n8k16<T>(acc[jd + 1], a, b1);
        }
      }
    }
  } else {
    constexpr int kLdp = 8 * NP + 4;
    const int g = lane >> 2, t = lane & 3;
    syncwarp();  // every lane is done reading the previous P
#pragma unroll
    for (int j = 0; j < NP; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) scratch[(g + 8 * (e >> 1)) * kLdp + 8 * j + 2 * t + (e & 1)] = pf[j][e];
    }
    syncwarp();
    for (int k = 0; k < 8 * NP; ++k) {
      const float p0 = scratch[g * kLdp + k], p1 = scratch[(g + 8) * kLdp + k];
#pragma unroll
      for (int jd = 0; jd < DT; ++jd) {
        if (jd * 8 < head_dim) {
          const float b0 = sB[k * kLd + jd * 8 + 2 * t], b1 = sB[k * kLd + jd * 8 + 2 * t + 1];
          acc[jd][0] += p0 * b0;
          acc[jd][1] += p0 * b1;
          acc[jd][2] += p1 * b0;
          acc[jd][3] += p1 * b1;
        }
      }
    }
  }
}

// attn_bias[b, h, i, j] as float (its dtype may differ from q's).
FB_DEVICE float load_bias(const AttnParams& p, int b, int h, int i, int j) {
  const int64_t off = b * p.bias_stride[0] + h * p.bias_stride[1] + static_cast<int64_t>(i) * p.bias_stride[2] +
                      static_cast<int64_t>(j) * p.bias_stride[3];
  return load_float(p.attn_bias, p.bias_dtype, off);
}

// Whether key j may be attended at all in sequence b (tile bound + attention_mask); the planted
// fault lets key seqlen_k through.
FB_DEVICE bool key_allowed(const AttnParams& p, int b, int j, int seqlen_k) {
  const int bound = seqlen_k + (FB_FAULT(p.fault == AttnFault::kKeyBoundOffByOne) ? 1 : 0);
  if (j >= bound) return false;
  if (j < seqlen_k && p.attention_mask != nullptr)
    return p.attention_mask[b * p.mask_stride_batch + static_cast<int64_t>(j) * p.mask_stride_key] != 0;
  return true;
}

// load_tile's row predicate for a tile of keys starting at key n0: the key is not masked.
struct KeyRows {
  const AttnParams& p;
  int b, n0, seqlen_k;
  FB_DEVICE bool operator()(int r) const { return key_allowed(p, b, n0 + r, seqlen_k); }
};

// One cp.async group of a key loop (committed also when n0 >= hi, empty, so the groups stay
// counted): rows n0.. of t (K or V) of head h of sequence b into the shared tile s, masked keys as
// zero rows, and, unless `flags` is nullptr (decided at compile time), key_allowed of those keys
// into flags[0, ROWS).
template <class T, int ROWS, int DP, int NTHREADS, class Flags>
FB_DEVICE void load_key_step(T* s, Flags flags, const AttnTensor& t, const AttnParams& p, int b, int h,
                             const SeqInfo& seq, int n0, int hi) {
  if (n0 < hi) {
    load_tile<T, ROWS, DP, NTHREADS>(s, row_ptr<const T>(t, b, h, seq.k_row0 + n0), t.stride_seq, seq.seqlen_k - n0,
                                     p.head_dim, p.aligned16, KeyRows{p, b, n0, seq.seqlen_k});
    if constexpr (!std::is_same_v<Flags, std::nullptr_t>) {
      for (int c = static_cast<int>(thread_rank()); c < ROWS; c += NTHREADS)
        flags[c] = key_allowed(p, b, n0 + c, seq.seqlen_k) ? 1 : 0;
    }
  }
  cp_async_commit();
}

// ---- Sliding window (attention.h: query i sees key j iff i - window_left <= j <= i + window_right)
// Every operand below is a position or window bound in [0, 2^30 + 2 * tile), so the differences
// never overflow int32 (sums of a position and a bound are avoided).

// Whether key j lies in query i's window.
FB_DEVICE bool in_window(const AttnParams& p, int i, int j) {
  return i - j <= p.window_left && j - i <= p.window_right;
}

// The positions [lo, hi) of the walked operand (keys in the forward and dq kernels, queries in the
// dk/dv kernel) that owned rows first..last can see, when row r sees r - before .. r + after,
// clamped to [0, len); lo is rounded down to a multiple of `tile` so that tiles keep their usual
// boundaries (dropout's 8-key groups, the dbias tiling). Empty: lo == hi <= len (rows past the
// other sequence's end plus the window), a loop from lo to hi runs no step and the rows are empty.
struct Span {
  int lo, hi;
};

FB_DEVICE Span window_span(int first, int last, int before, int after, int len, int tile) {
  const int lo = (first > before ? first - before : 0) / tile * tile;
  const int hi = after >= len - last ? len : last + 1 + after;
  return Span{lo < hi ? lo : hi, hi};
}

// Whether every pair (owned row r in [first, last], walked position t in [t0, t1]) lies in the
// window: such an interior tile needs no per-element window test.
FB_DEVICE bool window_covers(int first, int last, int t0, int t1, int before, int after) {
  return last - t0 <= before && t1 - first <= after;
}

// The Philox counter of the 8-key group holding key j, for query i of head h of sequence b (the
// shared scheme v2: (j / 8, i, h, b)), and the words of its call.
FB_DEVICE void dropout_counter(uint32_t (&c)[4], int b, int h, int i, int j) {
  c[0] = static_cast<uint32_t>(j) >> 3;
  c[1] = static_cast<uint32_t>(i);
  c[2] = static_cast<uint32_t>(h);
  c[3] = static_cast<uint32_t>(b);
}

FB_DEVICE PhiloxWords dropout_words(PhiloxKey key, int b, int h, int i, int j) {
  uint32_t c[4];
  dropout_counter(c, b, h, i, j);
  return philox4x32(c[0], c[1], c[2], c[3], key);
}

// Store two adjacent elements (columns col, col+1 < head_dim) of an output row.
template <class T>
FB_DEVICE void store2(T* row, int col, float x0, float x1) {
  row[col] = from_float<T>(x0);
  row[col + 1] = from_float<T>(x1);
}

// A query row's softmax statistics from the forward: row max m and log of the row sum l (natural).
struct RowLse {
  float m, log_l;
};

// Per-row statistics of a tile of ROWS query rows for the backward kernels:
//   sD[r]   = D_r = sum_d dO[r, d] * O[r, d]   (= rowsum(dP * P), FA2's "delta")
//   sLse[r] = (m_r, log l_r): the forward's row max and log row sum (the two planes of lse, see
//             attention.h), (+inf, 0) beyond nrows (so exp(s - m - log l) = 0 there).
// sdO is the shared dO tile; O and lse are read from global memory.
template <class T, int ROWS, int DP, int NTHREADS>
FB_DEVICE void row_stats(float* sD, RowLse* sLse, const T* sdO, const T* o_rows, int64_t o_stride,
                         const float* lse_rows, int64_t lse_plane, int nrows, int head_dim) {
  constexpr int kPerRow = NTHREADS / ROWS;
  static_assert(kPerRow >= 1 && kPerRow <= 32 && (kPerRow & (kPerRow - 1)) == 0, "row_stats: bad split");
  constexpr int kLd = kLds<T, DP>;
  const int r = static_cast<int>(thread_rank()) / kPerRow, part = static_cast<int>(thread_rank()) % kPerRow;
  float acc = 0.0f;
  if (r < nrows) {
    for (int d = part; d < head_dim; d += kPerRow) acc += to_float(sdO[r * kLd + d]) * to_float(o_rows[r * o_stride + d]);
  }
#pragma unroll
  for (int off = 1; off < kPerRow; off <<= 1) acc += shfl_xor(acc, off);
  if (part == 0) {
    sD[r] = acc;
    sLse[r] = r < nrows ? RowLse{lse_rows[r], lse_rows[lse_plane + r]} : RowLse{INFINITY, 0.0f};
  }
}

// P of a score x (natural units, bias included) from its row's (m, log l): exp((x - m) - log l).
// x - m is exact near the max even where m is huge (a row all biased finfo.min), where m + log l
// would round log l away.
template <class T>
FB_DEVICE float recompute_p(float x, RowLse lse) {
  return exp_unit<T>((x - lse.m) - lse.log_l);
}

}  // namespace fb::attn
