// Rotary position embeddings (RoPE) on q and k: parameters and entry points (plain C++, both builds).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"

namespace fb {

// One of q / k: input and output views [batch, seqlen, heads, head_dim] with element strides of
// (batch, seq, head) and a contiguous last dim. `out` may be `x` itself (in place).
struct RotaryTensor {
  const void* x;             // dtype; null when heads == 0
  void* out;                 // dtype; null when heads == 0
  long long x_stride[3];     // batch, seq, head
  long long out_stride[3];
  int heads;
};

// out = R(theta_pos) x on the first rotary_dim features of every head (R(-theta) when `inverse`:
// the backward), the rest copied. The varlen layout [total, heads, head_dim] is batch = 1,
// seqlen = total, batch strides 0.
struct RotaryParams {
  RotaryTensor q, k;
  const float* cos;           // [max_positions, rotary_dim / 2] fp32, contiguous
  const float* sin;           // [max_positions, rotary_dim / 2] fp32, contiguous
  const int64_t* positions;   // positions[b * pos_stride[0] + s * pos_stride[1]]: the table row
  long long pos_stride[2];
  long long batch, seqlen;
  int head_dim, rotary_dim;   // rotary_dim even, <= head_dim
  DType dtype;
  bool interleaved;           // pairs (2i, 2i + 1) (RoPE paper) instead of (i, i + rotary_dim / 2)
  bool inverse;               // rotate by -theta (backward)
  int fault;
};

void rotary(const RotaryParams& p, Stream stream);

}  // namespace fb
