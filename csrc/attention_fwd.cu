// Fused masked multi-head attention, forward: out = dropout(softmax(scale * q k^T + bias)) v and
// lse = logsumexp of the masked scores (Vaswani et al. 2017, eq. 1), tiled with the online softmax
// of FlashAttention-2 (Dao 2023, Algorithm 1): per query row a running max m and sum l,
//   m' = max(m, rowmax(S_j)),  P_j = exp(S_j - m'),  l' = exp(m - m') l + rowsum(P_j),
//   O' = exp(m - m') O + dropout(P_j) V_j,   and at the end  O /= l,  lse = m + log(l).
// Scores stay in natural units (exp_unit: exp2 of the scaled difference on the tensor-core paths).
//
// Grid: (batch * num_heads, ceil(max_seqlen_q / kBlockM)); a block of kWarps warps owns kBlockM =
// 16 * kWarps query rows (16 per warp) and walks the key tiles of kBlockN keys that its rows' sliding
// windows reach (all of them without a window; window_span), testing the window per element only on
// the edge tiles. A row with no key to attend (every key masked, biased -inf or outside its window)
// is empty: out = 0, lse = (+inf, 0). Keys masked by
// attention_mask are loaded as zero K and V rows (load_tile's row predicate), so NaN or Inf held
// there never reaches a product. Dropout (the shared
// Philox scheme) multiplies P after its row sum, so lse excludes it.
#include "attention_common.cuh"
#include "common/launch.cuh"

namespace fb::attn {
namespace {

template <class T, int DP>
struct FwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kTensorCores<T> ? (DP <= 128 ? 64 : 32) : 32;
  static constexpr int kLd = kLds<T, DP>;
  static constexpr int kScratchLd = kBlockN + 4;  // plain path: per-warp P staging [16][kScratchLd]
  static constexpr size_t kTileBytes = sizeof(T) * kLd;
  static constexpr size_t kScratchFloats = kTensorCores<T> ? 0 : size_t(kWarps) * 16 * kScratchLd;
  static constexpr size_t kSmemBytes =
      kTileBytes * (kBlockM + 2 * kBlockN) + sizeof(float) * kScratchFloats + kBlockN;
};

template <class T, int DP>
__global__ void __launch_bounds__(FwdConfig<T, DP>::kThreads) attention_fwd_kernel(const AttnParams p) {
  using Cfg = FwdConfig<T, DP>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kLd = Cfg::kLd;
  constexpr int NT = kBlockN / 8;  // n-tiles of the scores
  constexpr int DT = DP / 8;       // n-tiles of the output

  const int b = static_cast<int>(blockIdx.x) / p.num_heads, h = static_cast<int>(blockIdx.x) % p.num_heads;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = static_cast<int>(blockIdx.y) * kBlockM;
  if (m0 >= seq.seqlen_q) return;  // the whole block: nothing of this sequence here
  const int m_last = (seq.seqlen_q - m0 < kBlockM ? seq.seqlen_q : m0 + kBlockM) - 1;  // last owned row
  const Span keys = window_span(m0, m_last, p.window_left, p.window_right, seq.seqlen_k, kBlockN);

  FB_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;
  float* scratch = reinterpret_cast<float*>(sV + kBlockN * kLd);
  unsigned char* sKeyOk = reinterpret_cast<unsigned char*>(scratch + Cfg::kScratchFloats);

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane >> 2, t = lane & 3;
  float* warp_scratch = scratch + warp * 16 * Cfg::kScratchLd;

  load_tile<T, kBlockM, DP, Cfg::kThreads>(sQ, row_ptr<const T>(p.q, b, h, seq.q_row0 + m0), p.q.stride_seq,
                                           seq.seqlen_q - m0, p.head_dim, p.aligned16);
  cp_async_commit();

  const float scale = p.softmax_scale;
  const bool dropout = p.seed != nullptr;
  const PhiloxKey key = dropout ? philox_key(p.seed) : PhiloxKey{0, 0};
  const int row_i[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this lane's query rows

  float m_i[2] = {-INFINITY, -INFINITY};  // running max (natural units)
  float l_i[2] = {0.0f, 0.0f};            // this lane's part of the running sum
  float acc_o[DT][4];
#pragma unroll
  for (int jd = 0; jd < DT; ++jd)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[jd][e] = 0.0f;

  // K and V tiles are single-buffered and loaded one step ahead: K(n+1) streams in while the
  // softmax and P V of tile n run, V(n+1) while the next Q K^T runs. cp.async groups are committed
  // in the fixed order K, V, K, V, ... (empty at the end), so "all but the newest group done"
  // (wait_group<1>) always means "the tile about to be read has landed".
  const auto load_k = [&](int n0) {
    load_key_step<T, kBlockN, DP, Cfg::kThreads>(sK, sKeyOk, p.k, p, b, h, seq, n0, keys.hi);
  };
  const auto load_v = [&](int n0) {
    load_key_step<T, kBlockN, DP, Cfg::kThreads>(sV, nullptr, p.v, p, b, h, seq, n0, keys.hi);
  };
  load_k(keys.lo);  // groups so far: Q, K(lo), V(lo)
  load_v(keys.lo);

  for (int n0 = keys.lo; n0 < keys.hi; n0 += kBlockN) {
    cp_async_wait_group<1>();  // Q and K(n0) have landed (V(n0) may not have)
    __syncthreads();
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
    gemm_nt<T, NT, DP>(s, sQ + warp * 16 * kLd, sK, p.head_dim);

    // Scale, bias and mask (natural units); excluded scores become -inf. The window is tested per
    // element on edge tiles only; the fp32 path tests every element (its scalar products dwarf two
    // compares, and the tile test's extra live values pushed ptxas into spills at sm_90a, DP 64).
    const bool edge =
        !kTensorCores<T> || !window_covers(m0, m_last, n0, n0 + kBlockN - 1, p.window_left, p.window_right);
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1), r = e >> 1;
        float x = -INFINITY;
        if (sKeyOk[col] && (!edge || in_window(p, row_i[r], n0 + col))) {
          x = s[j][e] * scale;
          if (p.attn_bias != nullptr && row_i[r] < seq.seqlen_q && n0 + col < seq.seqlen_k) {
            const float bias = load_bias(p, b, h, row_i[r], n0 + col);
            x = bias == -INFINITY ? -INFINITY : x + bias;
          }
        }
        s[j][e] = x;
        row_max[r] = fmaxf(row_max[r], x);
      }
    }
    __syncthreads();  // every warp is done with sK and sKeyOk: fetch the next K tile
    load_k(n0 + kBlockN);
    float alpha[2], m_ref[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 lanes of a row (t = 0..3) share its max.
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 2));
      const float m_new = fmaxf(m_i[r], row_max[r]);
      m_ref[r] = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: exp2(-inf - 0) = 0, not NaN
      alpha[r] = exp_unit<T>(m_i[r] - m_ref[r]);
      m_i[r] = m_new;
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float pe0 = exp_unit<T>(s[j][2 * r] - m_ref[r]), pe1 = exp_unit<T>(s[j][2 * r + 1] - m_ref[r]);
        l_i[r] += pe0;
        l_i[r] += pe1;
        if (dropout && (pe0 != 0.0f || pe1 != 0.0f)) {
          // This lane's keys 2t, 2t + 1 of the 8-key group are the halves of word t of one call;
          // the 1 / (1 - p) scale is applied once at the end.
          const uint32_t w = philox_word(dropout_words(key, b, h, row_i[r], n0 + 8 * j), t);
          if (!dropout_keep_lo(w, p.dropout_threshold)) pe0 = 0.0f;
          if (!dropout_keep_hi(w, p.dropout_threshold)) pe1 = 0.0f;
        }
        s[j][2 * r] = pe0;
        s[j][2 * r + 1] = pe1;
      }
    }
#pragma unroll
    for (int jd = 0; jd < DT; ++jd)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[jd][e] *= alpha[e >> 1];
    cp_async_wait_group<1>();  // V(n0) has landed (K(n0 + kBlockN) may not have)
    __syncthreads();
    gemm_pn<T, NT, DT, DP>(acc_o, s, sV, warp_scratch, p.head_dim);
    __syncthreads();  // every warp is done with sV: fetch the next V tile
    load_v(n0 + kBlockN);
  }
  cp_async_wait_all();  // a block whose rows see no key walked no tile: its Q copy is still pending

  // Epilogue: finish the row sums across the 4 lanes of a row, normalise, write out and lse.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] += shfl_xor(l_i[r], 1);
    l_i[r] += shfl_xor(l_i[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    if (i >= seq.seqlen_q) continue;
    const bool empty = l_i[r] == 0.0f;
    const float inv = empty ? 0.0f : p.dropout_scale / l_i[r];
    T* o = row_ptr<T>(p.out, b, h, seq.q_row0 + i);
#pragma unroll
    for (int jd = 0; jd < DT; ++jd) {
      const int col = jd * 8 + 2 * t;
      if (col < p.head_dim) store2(o, col, acc_o[jd][2 * r] * inv, acc_o[jd][2 * r + 1] * inv);
    }
    if (t == 0) {
      float* lse = p.lse + b * p.lse_stride_batch + h * p.lse_stride_head + seq.q_row0 + i;
      lse[0] = empty ? INFINITY : m_i[r];
      lse[p.lse_stride_plane] = empty ? 0.0f : logf(l_i[r]);
    }
  }
}

template <class T, int DP>
void launch_fwd(const AttnParams& p, Stream stream) {
  using Cfg = FwdConfig<T, DP>;
  const dim3 grid(static_cast<unsigned>(p.batch * p.num_heads),
                  static_cast<unsigned>((p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM));
  launch(attention_fwd_kernel<T, DP>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
}

}  // namespace
}  // namespace fb::attn

namespace fb {

void attention_fwd_launch(const AttnParams& p, Stream stream) {
  if (p.max_seqlen_q <= 0 || p.batch <= 0) return;
  FB_DTYPE_SWITCH(p.dtype, T, attn::with_head_dim_bucket(p.head_dim, [&](auto dp) {
    attn::launch_fwd<T, decltype(dp)::value>(p, stream);
  }));
}

}  // namespace fb
