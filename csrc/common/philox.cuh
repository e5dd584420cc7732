// Philox4x32-10 (Salmon et al., SC 2011), bit-identical to fastbert/backends/_philox.py.
// Key = the two uint32 words of the int64 [2] seed tensor (read in-kernel: no host sync);
// counter = the element's logical coordinates; an element is kept iff word 0 >= threshold, with
// threshold = min(round(p * 2^32), 2^32 - 1) computed on the host (fb::bind::dropout_threshold in
// binding_util.h).
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace fb {

struct PhiloxKey {
  uint32_t k0, k1;
};

// The key from the seed tensor (int64 [2]); seed may be null when dropout is off.
FB_DEVICE PhiloxKey philox_key(const int64_t* seed) {
  return PhiloxKey{static_cast<uint32_t>(static_cast<uint64_t>(seed[0]) & 0xffffffffu),
                   static_cast<uint32_t>(static_cast<uint64_t>(seed[1]) & 0xffffffffu)};
}

// First output word of Philox4x32-10 for counter (c0, c1, c2, c3).
FB_DEVICE uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
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
  return c0;
}

}  // namespace fb
