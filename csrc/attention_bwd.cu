// Fused masked multi-head attention, backward (FlashAttention-2, Dao 2023, Algorithm 2), with P
// recomputed from the forward's lse instead of stored:
//
//   S  = scale * Q K^T + bias             (masked entries excluded: P = 0 there)
//   P  = exp((S - m) - log l)             (the forward's two lse planes; m = +inf on empty rows,
//                                          so P = 0 there)
//   Z  = keep / (1 - p)                   (dropout multiplier, the shared Philox mask; 1 without)
//   D  = rowsum(dO * O)                   (= rowsum(dP * P))
//   dV = (P * Z)^T dO
//   dP = (dO V^T) * Z
//   dS = P * (dP - D)
//   dQ = scale * dS K,   dK = scale * dS^T Q,   d(bias) = dS   (fp32, [batch, heads, Lq, Lk])
//
// Deterministic without atomics or workspace: two kernels, each owning its outputs.
//   - dq kernel: grid (batch * heads, query tiles); a block owns kBlockM query rows, walks the key
//     tiles and accumulates dQ in registers; it also writes dbias (each (i, j) exactly once).
//   - dkdv kernel: grid (batch * heads, key tiles); a block owns kBlockM keys, walks the query
//     tiles and accumulates dK and dV; here the "rows" of the fragments are keys, so the kernel
//     computes S^T = K Q^T and dP^T = V dO^T. At the 256 bucket it runs twice (dV, then dK), as
//     two 16 x 256 fp32 accumulators per warp would spill.
// With a sliding window each kernel walks only the tiles its rows' windows reach (window_span) and
// tests the window per element on the edge tiles; the dq kernel writes dbias = 0 in the columns it
// skips, so dbias stays fully written.
// D is recomputed per query tile from O and dO (a dot product per row) rather than stored.
// The price is recomputing S and dP in both kernels (7 matrix products instead of FA2's 5).
#include "attention_common.cuh"
#include "common/launch.cuh"

namespace fb::attn {
namespace {

template <class T, int DP>
struct BwdConfig {
  // fp32 at the 256 bucket: 2 warps so four fp32 tiles fit in shared memory.
  static constexpr int kWarps = (!kTensorCores<T> && DP == 256) ? 2 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // rows owned by the block (queries or keys)
  static constexpr int kBlockN = kTensorCores<T> ? (DP <= 64 ? 64 : 32) : 32;  // rows walked per step
  static constexpr int kLd = kLds<T, DP>;
  static constexpr int kScratchLd = kBlockN + 4;
  static constexpr size_t kTileBytes = sizeof(T) * kLd;
  static constexpr size_t kScratchFloats = kTensorCores<T> ? 0 : size_t(kWarps) * 16 * kScratchLd;
  // Owned tiles (2 x kBlockM rows), walked tiles (2 x kBlockN rows), D (kBlockM floats) and the
  // row statistics (kBlockM RowLse, enough for either kernel), P/dS staging (plain path), key flags
  // (kBlockN bytes).
  static constexpr size_t kSmemBytes = kTileBytes * (2 * kBlockM + 2 * kBlockN) +
                                       sizeof(float) * (3 * kBlockM + kScratchFloats) + kBlockN;
  // The dq kernel's __launch_bounds__ minimum of blocks per SM (0 = none given). fp32 at DP >= 128:
  // 1. Shared memory (>= 108 KiB a block) already holds these blocks to 1 (sm_80) or 2 (sm_90) per
  // SM, and 2 blocks of <= 128 threads fit at any count <= 255 registers, so the hint costs no
  // occupancy; without it ptxas aimed at 3 blocks (168 registers) and spilled at sm_80 (4 bytes).
  static constexpr int kDqMinBlocks = (!kTensorCores<T> && DP >= 128) ? 1 : 0;
};

// ---- dQ (and dbias) ----------------------------------------------------------------------------
template <class T, int DP>
__global__ void __launch_bounds__(BwdConfig<T, DP>::kThreads, BwdConfig<T, DP>::kDqMinBlocks)
    attention_bwd_dq_kernel(const AttnParams p) {
  using Cfg = BwdConfig<T, DP>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kLd = Cfg::kLd;
  constexpr int NT = kBlockN / 8, DT = DP / 8;

  const int b = static_cast<int>(blockIdx.x) / p.num_heads, h = static_cast<int>(blockIdx.x) % p.num_heads;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = static_cast<int>(blockIdx.y) * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int m_last = (seq.seqlen_q - m0 < kBlockM ? seq.seqlen_q : m0 + kBlockM) - 1;  // last owned row
  const Span keys = window_span(m0, m_last, p.window_left, p.window_right, seq.seqlen_k, kBlockN);

  FB_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockM * kLd;
  T* sK = sdO + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;
  float* sD = reinterpret_cast<float*>(sV + kBlockN * kLd);
  RowLse* sLse = reinterpret_cast<RowLse*>(sD + kBlockM);
  float* scratch = reinterpret_cast<float*>(sLse + kBlockM);
  unsigned char* sKeyOk = reinterpret_cast<unsigned char*>(scratch + Cfg::kScratchFloats);

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane >> 2, t = lane & 3;
  float* warp_scratch = scratch + warp * 16 * Cfg::kScratchLd;
  const int nrows = seq.seqlen_q - m0;

  // V and K tiles are single-buffered and loaded ahead: V is read first (dP = dO V^T), so V(n+1)
  // streams in while S, dS and dQ of tile n run, and K(n+1) (read until dQ += dS K) while dP of
  // tile n+1 runs. cp.async groups go Q+dO, V, K, V, K, ... (empty past the end), so
  // wait_group<1> ("all but the newest done") always means "the tile about to be read has landed".
  const auto load_v = [&](int n0) {
    load_key_step<T, kBlockN, DP, Cfg::kThreads>(sV, nullptr, p.v, p, b, h, seq, n0, keys.hi);
  };
  const auto load_k = [&](int n0) {
    load_key_step<T, kBlockN, DP, Cfg::kThreads>(sK, sKeyOk, p.k, p, b, h, seq, n0, keys.hi);
  };
  load_tile<T, kBlockM, DP, Cfg::kThreads>(sQ, row_ptr<const T>(p.q, b, h, seq.q_row0 + m0), p.q.stride_seq,
                                           nrows, p.head_dim, p.aligned16);
  load_tile<T, kBlockM, DP, Cfg::kThreads>(sdO, row_ptr<const T>(p.dout, b, h, seq.q_row0 + m0),
                                           p.dout.stride_seq, nrows, p.head_dim, p.aligned16);
  cp_async_commit();
  load_v(keys.lo);
  load_k(keys.lo);
  cp_async_wait_group<2>();  // Q and dO have landed
  __syncthreads();
  row_stats<T, kBlockM, DP, Cfg::kThreads>(sD, sLse, sdO, row_ptr<const T>(p.out, b, h, seq.q_row0 + m0),
                                           p.out.stride_seq,
                                           p.lse + b * p.lse_stride_batch + h * p.lse_stride_head + seq.q_row0 + m0,
                                           p.lse_stride_plane, nrows, p.head_dim);
  __syncthreads();

  const float scale = p.softmax_scale;
  const bool dropout = p.seed != nullptr;
  const PhiloxKey key = dropout ? philox_key(p.seed) : PhiloxKey{0, 0};
  const int row_i[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  const RowLse lse_r[2] = {sLse[warp * 16 + g], sLse[warp * 16 + g + 8]};
  const float delta[2] = {sD[warp * 16 + g], sD[warp * 16 + g + 8]};

  float acc_dq[DT][4];
#pragma unroll
  for (int jd = 0; jd < DT; ++jd)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[jd][e] = 0.0f;

  for (int n0 = keys.lo; n0 < keys.hi; n0 += kBlockN) {
    cp_async_wait_group<1>();  // V(n0) has landed (K(n0) may not have)
    __syncthreads();
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
    gemm_nt<T, NT, DP>(dp, sdO + warp * 16 * kLd, sV, p.head_dim);
    __syncthreads();  // every warp is done with sV: fetch the next V tile
    load_v(n0 + kBlockN);
    cp_async_wait_group<1>();  // K(n0) has landed (V(n0 + kBlockN) may not have)
    __syncthreads();
    gemm_nt<T, NT, DP>(s, sQ + warp * 16 * kLd, sK, p.head_dim);

    // The window per element on edge tiles; on every tile in the fp32 path (as in the forward:
    // the tile test spilled at sm_90a, DP 64).
    const bool edge =
        !kTensorCores<T> || !window_covers(m0, m_last, n0, n0 + kBlockN - 1, p.window_left, p.window_right);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = row_i[r];
        float pe[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * j + 2 * t + c, kj = n0 + col;
          pe[c] = 0.0f;
          if (sKeyOk[col] && i < seq.seqlen_q && (!edge || in_window(p, i, kj))) {
            const float x = s[j][2 * r + c] * scale;
            const float bias = (p.attn_bias != nullptr && kj < seq.seqlen_k) ? load_bias(p, b, h, i, kj) : 0.0f;
            if (bias != -INFINITY) pe[c] = recompute_p<T>(x + bias, lse_r[r]);
          }
        }
        // This lane's keys 2t, 2t + 1 of the 8-key group are the halves of word t of one call
        // (as in the forward); the word is live only across this pair.
        float z[2] = {1.0f, 1.0f};
        if (dropout && (pe[0] != 0.0f || pe[1] != 0.0f)) {
          const uint32_t w = philox_word(dropout_words(key, b, h, i, n0 + 8 * j), t);
          if (pe[0] != 0.0f) z[0] = dropout_keep_lo(w, p.dropout_threshold) ? p.dropout_scale : 0.0f;
          if (pe[1] != 0.0f) z[1] = dropout_keep_hi(w, p.dropout_threshold) ? p.dropout_scale : 0.0f;
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kj = n0 + 8 * j + 2 * t + c;
          const float ds = pe[c] * (dp[j][2 * r + c] * z[c] - delta[r]);
          if (p.dbias != nullptr && i < seq.seqlen_q && kj < seq.seqlen_k)
            p.dbias[b * p.dbias_stride[0] + h * p.dbias_stride[1] + static_cast<int64_t>(i) * p.dbias_stride[2] +
                    static_cast<int64_t>(kj) * p.dbias_stride[3]] = ds;
          s[j][2 * r + c] = ds;
        }
      }
    }
    gemm_pn<T, NT, DT, DP>(acc_dq, s, sK, warp_scratch, p.head_dim);
    __syncthreads();  // every warp is done with sK and sKeyOk: fetch the next K tile
    load_k(n0 + kBlockN);
  }
  cp_async_wait_all();  // rows that see no key walked no tile: their copies may still be pending

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    if (i >= seq.seqlen_q) continue;
    T* dq = row_ptr<T>(p.dq, b, h, seq.q_row0 + i);
#pragma unroll
    for (int jd = 0; jd < DT; ++jd) {
      const int col = jd * 8 + 2 * t;
      if (col < p.head_dim)
        store2(dq, col, acc_dq[jd][2 * r] * p.softmax_scale, acc_dq[jd][2 * r + 1] * p.softmax_scale);
    }
  }

  // dbias is 0 outside the window: write it in the columns the key loop skipped, [0, lo) and
  // [walked_end, seqlen_k) of the block's rows.
  if (p.dbias != nullptr) {
    const int walked_end = keys.hi > keys.lo ? keys.lo + (keys.hi - keys.lo + kBlockN - 1) / kBlockN * kBlockN : keys.lo;
    const int tail = walked_end < seq.seqlen_k ? seq.seqlen_k - walked_end : 0;
    const int gap = keys.lo + tail;  // skipped columns per row
    const int64_t count = static_cast<int64_t>(gap) * (m_last - m0 + 1);
    for (int64_t c = static_cast<int64_t>(thread_rank()); c < count; c += Cfg::kThreads) {
      const int i = m0 + static_cast<int>(c / gap), g_col = static_cast<int>(c % gap);
      const int kj = g_col < keys.lo ? g_col : walked_end + (g_col - keys.lo);
      p.dbias[b * p.dbias_stride[0] + h * p.dbias_stride[1] + static_cast<int64_t>(i) * p.dbias_stride[2] +
              static_cast<int64_t>(kj) * p.dbias_stride[3]] = 0.0f;
    }
  }
}

// ---- dK and dV ---------------------------------------------------------------------------------
// Which outputs a dkdv launch computes: both, or (the 256 bucket, where two 16 x 256 fp32
// accumulators per warp would not fit in registers) one of them per launch.
enum class KVOut : int { kBoth = 0, kDV = 1, kDK = 2 };

// Dropout keep decisions of one query tile for a dkdv warp, one Philox call per (query, 8-key
// group). A lane (g, t) holds keys kw + 8r + g (kw: the warp's first key, a multiple of 16; r = 0,
// 1) and queries q0 + 8j + 2t + c, so the 8 keys of a call sit in the 8 lanes g = 0..7 of one t.
// The warp draws each call once: lane L draws the calls of queries q0 + 8j + 2t + c (j = L / 4,
// t = L % 4) and packs their keep bits into one word, byte 2r + c = the call of key group r,
// bit g = key kw + 8r + g; the lanes holding the elements read word (j, t) from lane 4j + t
// (dkdv_keep_bits). At NT = 8 that is 4 calls per lane; at NT = 4, 16 words, lanes L and L ^ 16
// draw the r = 0 and r = 1 halves (2 calls each) and join them with one shuffle. A lane's calls
// run together (philox4x32_n: one key schedule); calls past the sequence are drawn too (their
// elements are masked; skipping them would diverge the warp and save no time).
template <int NT>
FB_DEVICE uint32_t dkdv_keep_word(const AttnParams& p, PhiloxKey key, int b, int h, int q0, int kw) {
  static_assert(NT == 4 || NT == 8, "dkdv_keep_word: one word per lane needs 4 * NT in {16, 32}");
  constexpr int kCalls = NT / 2;  // call n: key group r = r0 + n / 2, query offset c = n % 2
  const int lane = static_cast<int>(lane_id());
  const int t = lane & 3, j = (lane >> 2) & (NT - 1);
  const int r0 = NT == 8 ? 0 : lane >> 4;
  uint32_t ctr[kCalls][4];
#pragma unroll
  for (int n = 0; n < kCalls; ++n) dropout_counter(ctr[n], b, h, q0 + 8 * j + 2 * t + n % 2, kw + 8 * (r0 + n / 2));
  philox4x32_n<kCalls>(ctr, key);
  uint32_t word = 0;
#pragma unroll
  for (int n = 0; n < kCalls; ++n)  // byte 2r + c = n + 2 * r0
    word |= dropout_keep_bits(PhiloxWords{ctr[n][0], ctr[n][1], ctr[n][2], ctr[n][3]}, p.dropout_threshold) << (8 * n);
  if constexpr (NT == 4) word = (word << (16 * r0)) | shfl_xor(word << (16 * r0), 16);
  return word;
}

// Lane (g, t)'s keep bits of column group j from dkdv_keep_word's words: bit 8e of the result is
// element e (key row r = e / 2, query 8j + 2t + e % 2) of the lane's fragment s[j][e].
FB_DEVICE uint32_t dkdv_keep_bits(uint32_t words, int j) {
  const int lane = static_cast<int>(lane_id());
  return shfl(words, 4 * j + (lane & 3)) >> (lane >> 2);
}

template <class T, int DP, KVOut kOut>
__global__ void __launch_bounds__(BwdConfig<T, DP>::kThreads) attention_bwd_dkdv_kernel(const AttnParams p) {
  using Cfg = BwdConfig<T, DP>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kLd = Cfg::kLd;
  constexpr int NT = kBlockN / 8, DT = DP / 8;
  constexpr bool kDV = kOut != KVOut::kDK, kDK = kOut != KVOut::kDV;

  const int b = static_cast<int>(blockIdx.x) / p.num_heads, h = static_cast<int>(blockIdx.x) % p.num_heads;
  const SeqInfo seq = seq_info(p, b);
  const int n0 = static_cast<int>(blockIdx.y) * kBlockM;  // first key of this block
  if (n0 >= seq.seqlen_k) return;
  const int n_last = (seq.seqlen_k - n0 < kBlockM ? seq.seqlen_k : n0 + kBlockM) - 1;  // last owned key
  // Key j is seen by queries j - window_right .. j + window_left.
  const Span queries = window_span(n0, n_last, p.window_right, p.window_left, seq.seqlen_q, kBlockN);

  FB_DYNAMIC_SMEM(unsigned char, smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockM * kLd;
  T* sQ = sV + kBlockM * kLd;
  T* sdO = sQ + kBlockN * kLd;
  float* sD = reinterpret_cast<float*>(sdO + kBlockN * kLd);
  RowLse* sLse = reinterpret_cast<RowLse*>(sD + kBlockM);
  float* scratch = reinterpret_cast<float*>(sLse + kBlockM);

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane >> 2, t = lane & 3;
  float* warp_scratch = scratch + warp * 16 * Cfg::kScratchLd;

  load_tile<T, kBlockM, DP, Cfg::kThreads>(sK, row_ptr<const T>(p.k, b, h, seq.k_row0 + n0), p.k.stride_seq,
                                           seq.seqlen_k - n0, p.head_dim, p.aligned16, KeyRows{p, b, n0, seq.seqlen_k});
  load_tile<T, kBlockM, DP, Cfg::kThreads>(sV, row_ptr<const T>(p.v, b, h, seq.k_row0 + n0), p.v.stride_seq,
                                           seq.seqlen_k - n0, p.head_dim, p.aligned16, KeyRows{p, b, n0, seq.seqlen_k});
  cp_async_commit();

  const float scale = p.softmax_scale;
  const bool dropout = p.seed != nullptr;
  const PhiloxKey key = dropout ? philox_key(p.seed) : PhiloxKey{0, 0};
  const int key_j[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};  // this lane's keys
  const bool key_ok[2] = {key_allowed(p, b, key_j[0], seq.seqlen_k), key_allowed(p, b, key_j[1], seq.seqlen_k)};

  float acc_dk[kDK ? DT : 2][4], acc_dv[kDV ? DT : 2][4];  // (size 2 when unused)
  for (auto& a : acc_dk)
    for (float& x : a) x = 0.0f;
  for (auto& a : acc_dv)
    for (float& x : a) x = 0.0f;

  for (int m0 = queries.lo; m0 < queries.hi; m0 += kBlockN) {
    const int nrows = seq.seqlen_q - m0;
    __syncthreads();
    load_tile<T, kBlockN, DP, Cfg::kThreads>(sQ, row_ptr<const T>(p.q, b, h, seq.q_row0 + m0), p.q.stride_seq,
                                             nrows, p.head_dim, p.aligned16);
    load_tile<T, kBlockN, DP, Cfg::kThreads>(sdO, row_ptr<const T>(p.dout, b, h, seq.q_row0 + m0),
                                             p.dout.stride_seq, nrows, p.head_dim, p.aligned16);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    row_stats<T, kBlockN, DP, Cfg::kThreads>(sD, sLse, sdO, row_ptr<const T>(p.out, b, h, seq.q_row0 + m0),
                                             p.out.stride_seq,
                                             p.lse + b * p.lse_stride_batch + h * p.lse_stride_head + seq.q_row0 + m0,
                                             p.lse_stride_plane, nrows, p.head_dim);
    __syncthreads();

    float s[NT][4], dp[NT][4];  // S^T and dP^T: rows = this warp's keys, columns = queries m0..
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
    gemm_nt<T, NT, DP>(s, sK + warp * 16 * kLd, sQ, p.head_dim);
    if constexpr (kDK) gemm_nt<T, NT, DP>(dp, sV + warp * 16 * kLd, sdO, p.head_dim);

    const bool edge = !window_covers(n0, n_last, m0, m0 + kBlockN - 1, p.window_right, p.window_left);
    // One Philox call per (query, 8-key group) for the warp, shared by shuffles (dkdv_keep_word).
    const uint32_t keep_words = dropout ? dkdv_keep_word<NT>(p, key, b, h, m0, n0 + warp * 16) : 0u;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint32_t keep = dropout ? dkdv_keep_bits(keep_words, j) : 0u;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1), r = e >> 1, i = m0 + col, kj = key_j[r];
        float pe = 0.0f;
        if (key_ok[r] && i < seq.seqlen_q && (!edge || in_window(p, i, kj))) {
          const float x = s[j][e] * scale;
          const float bias = (p.attn_bias != nullptr && kj < seq.seqlen_k) ? load_bias(p, b, h, i, kj) : 0.0f;
          if (bias != -INFINITY) pe = recompute_p<T>(x + bias, sLse[col]);
        }
        // Masked elements (pe = 0) take z too: finite, it changes nothing there.
        const float z = dropout ? (((keep >> (8 * e)) & 1u) ? p.dropout_scale : 0.0f) : 1.0f;
        s[j][e] = pe * z;                          // (P * Z)^T, for dV
        dp[j][e] = pe * (dp[j][e] * z - sD[col]);  // dS^T, for dK
      }
    }
    if constexpr (kDV) gemm_pn<T, NT, DT, DP>(acc_dv, s, sdO, warp_scratch, p.head_dim);
    if constexpr (kDK) gemm_pn<T, NT, DT, DP>(acc_dk, dp, sQ, warp_scratch, p.head_dim);
  }
  cp_async_wait_all();  // keys seen by no query walked no tile: their K/V copies may still be pending

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kj = key_j[r];
    if (kj >= seq.seqlen_k) continue;
    T* dk = row_ptr<T>(p.dk, b, h, seq.k_row0 + kj);
    T* dv = row_ptr<T>(p.dv, b, h, seq.k_row0 + kj);
#pragma unroll
    for (int jd = 0; jd < DT; ++jd) {
      const int col = jd * 8 + 2 * t;
      if (col < p.head_dim) {
        if constexpr (kDK)
          store2(dk, col, acc_dk[jd][2 * r] * p.softmax_scale, acc_dk[jd][2 * r + 1] * p.softmax_scale);
        if constexpr (kDV) store2(dv, col, acc_dv[jd][2 * r], acc_dv[jd][2 * r + 1]);
      }
    }
  }
}

template <class T, int DP>
void launch_bwd(const AttnParams& p, Stream stream) {
  using Cfg = BwdConfig<T, DP>;
  const unsigned bh = static_cast<unsigned>(p.batch * p.num_heads);
  const dim3 grid_q(bh, static_cast<unsigned>((p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM));
  const dim3 grid_k(bh, static_cast<unsigned>((p.max_seqlen_k + Cfg::kBlockM - 1) / Cfg::kBlockM));
  launch(attention_bwd_dq_kernel<T, DP>, grid_q, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
  if constexpr (DP <= 128) {
    launch(attention_bwd_dkdv_kernel<T, DP, KVOut::kBoth>, grid_k, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
  } else {
    launch(attention_bwd_dkdv_kernel<T, DP, KVOut::kDV>, grid_k, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
    launch(attention_bwd_dkdv_kernel<T, DP, KVOut::kDK>, grid_k, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
  }
}

}  // namespace
}  // namespace fb::attn

namespace fb {

void attention_bwd_launch(const AttnParams& p, Stream stream) {
  if (p.batch <= 0 || p.max_seqlen_q <= 0 || p.max_seqlen_k <= 0) return;
  FB_DTYPE_SWITCH(p.dtype, T, attn::with_head_dim_bucket(p.head_dim, [&](auto dp) {
    attn::launch_bwd<T, decltype(dp)::value>(p, stream);
  }));
}

}  // namespace fb
