// Philox4x32-10 (Salmon et al., SC 2011) and the shared dropout scheme, version 2, bit-identical to
// fastbert/backends/_philox.py (the spec): key = the two uint32 words of the int64 [2] seed tensor
// (read in-kernel: no host sync); one call per group of 8 consecutive columns, counter = the
// group's logical coordinates (attention (key column / 8, query row, head, sequence); LayerNorm
// (column / 8, row low, row high, 0)); column j of the group is kept iff the 16-bit half j % 2
// of word (j % 8) / 2 is >= threshold, with threshold = min(round(p * 2^16), 2^16 - 1) and scale
// 2^16 / (2^16 - threshold) computed on the host (fb::bind::dropout_threshold / dropout_scale in
// binding_util.h).
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace fb {

struct PhiloxKey {
  uint32_t k0, k1;
};

// The four output words of one call.
struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

// The key from the seed tensor (int64 [2]); seed may be null when dropout is off.
FB_DEVICE PhiloxKey philox_key(const int64_t* seed) {
  return PhiloxKey{static_cast<uint32_t>(static_cast<uint64_t>(seed[0]) & 0xffffffffu),
                   static_cast<uint32_t>(static_cast<uint64_t>(seed[1]) & 0xffffffffu)};
}

// Philox4x32-10 for counter (c0, c1, c2, c3).
FB_DEVICE PhiloxWords philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = umulhi(c0, kM0), lo0 = c0 * kM0;
    const uint32_t hi1 = umulhi(c2, kM1), lo1 = c2 * kM1;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return PhiloxWords{c0, c1, c2, c3};
}

// N calls with one key, round by round: the key schedule is computed once for all of them and
// the N independent chains interleave. ctr[n] is call n's counter (c0..c3) in, its words out;
// each call's result equals philox4x32(ctr[n][0], .., ctr[n][3], key). (philox4x32 keeps its own
// rounds: written as philox4x32_n<1> it made the dQ kernel spill at fp16/bf16 d64, sm_90a.)
template <int N>
FB_DEVICE void philox4x32_n(uint32_t (&ctr)[N][4], PhiloxKey key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      uint32_t* c = ctr[n];
      const uint32_t hi0 = umulhi(c[0], kM0), lo0 = c[0] * kM0;
      const uint32_t hi1 = umulhi(c[2], kM1), lo1 = c[2] * kM1;
      const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
      c[0] = n0;
      c[1] = lo1;
      c[2] = n2;
      c[3] = lo0;
    }
    k0 += kW0;
    k1 += kW1;
  }
}

// Word q (0..3) of a call, by selects (a runtime q must not index a register array: that would
// put the words in local memory).
FB_DEVICE uint32_t philox_word(const PhiloxWords& w, int q) {
  return q < 2 ? (q == 0 ? w.w0 : w.w1) : (q == 2 ? w.w2 : w.w3);
}

// Keep decision of column j (0..7) of the call's 8-column group.
FB_DEVICE bool dropout_keep(const PhiloxWords& w, int j, uint32_t threshold) {
  const uint32_t word = philox_word(w, j >> 1);
  return ((j & 1) ? (word >> 16) : (word & 0xffffu)) >= threshold;
}

// Keep decisions of all 8 columns of a call as bits, bit j = dropout_keep(w, j, threshold). A
// half is compared without extracting it: with t16 = threshold << 16 (threshold < 2^16), the high
// half of a word is >= threshold iff word >= t16, the low half iff (word << 16) >= t16.
FB_DEVICE uint32_t dropout_keep_bits(const PhiloxWords& w, uint32_t threshold) {
  const uint32_t t16 = threshold << 16;
  uint32_t bits = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t word = philox_word(w, q);
    bits |= static_cast<uint32_t>((word << 16) >= t16) << (2 * q);
    bits |= static_cast<uint32_t>(word >= t16) << (2 * q + 1);
  }
  return bits;
}

// Keep decisions of the column pair (2q, 2q + 1) of a group, from its word q: one call serves
// both columns a thread holds in an mma fragment.
FB_DEVICE bool dropout_keep_lo(uint32_t word, uint32_t threshold) { return (word & 0xffffu) >= threshold; }
FB_DEVICE bool dropout_keep_hi(uint32_t word, uint32_t threshold) { return (word >> 16) >= threshold; }

}  // namespace fb
