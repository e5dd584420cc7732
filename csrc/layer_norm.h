// LayerNorm with BERT's add & norm fusion: parameters and entry points (plain C++, both builds).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"

namespace fb {

// y = LN(h) * weight + bias with h = dropout(x + x_bias) + residual; rows x hidden, contiguous.
struct LayerNormFwdParams {
  const void* x;         // [rows, hidden] dtype
  const void* weight;    // [hidden] weight_dtype or null
  const void* bias;      // [hidden] bias_dtype or null
  const void* residual;  // [rows, hidden] dtype or null
  const void* x_bias;    // [hidden] x_bias_dtype or null
  void* y;               // [rows, hidden] dtype
  float* mean;           // [rows]
  float* rstd;           // [rows]
  void* h;               // [rows, hidden] dtype; null when nothing is fused (h is x)
  const int64_t* seed;   // [2] Philox key words; null when dropout_p == 0
  long long rows;
  int hidden;
  DType dtype, weight_dtype, bias_dtype, x_bias_dtype;
  float eps;
  uint32_t keep_threshold;  // keep iff the column's Philox u16 >= this (common/philox.cuh)
  float keep_scale;         // 1 / (1 - dropout_p rounded to 2^-16)
  bool dropout;
  int fault;  // fault injection (csrc/README.md)
};

struct LayerNormBwdParams {
  const void* dy;        // [rows, hidden] dtype
  const void* h;         // [rows, hidden] dtype (the pre-norm sum saved by forward)
  const void* weight;    // [hidden] weight_dtype or null
  const float* mean;     // [rows]
  const float* rstd;     // [rows]
  void* dx;              // [rows, hidden] dtype
  float* dweight;        // [hidden] or null
  float* dbias;          // [hidden] or null
  void* dresidual;       // [rows, hidden] dtype or null
  float* dx_bias;        // [hidden] or null
  const int64_t* seed;   // [2] or null
  float* workspace;      // layer_norm_bwd_workspace_bytes(rows, hidden, ...) bytes
  float* row_stats;      // set by layer_norm_bwd: [rows, 2] inside the workspace (dx_bias only)
  long long rows;
  int hidden;
  DType dtype, weight_dtype;
  uint32_t keep_threshold;
  float keep_scale;
  bool dropout;
  int fault;
};

// Row splits of the deterministic column reductions: a function of `rows` only, so results do
// not depend on the GPU.
inline int column_splits(long long rows) {
  const long long s = (rows + 31) / 32;
  return static_cast<int>(s < 1 ? 1 : s > 256 ? 256 : s);
}

// fp32 workspace of the backward: per-split partial column sums (3 x splits x hidden) and, when
// dx_bias is asked for, two per-row statistics.
inline long long layer_norm_bwd_workspace_bytes(long long rows, int hidden, bool need_columns, bool need_dx_bias) {
  if (!need_columns) return 0;
  return 4 * (3LL * column_splits(rows) * hidden + (need_dx_bias ? 2 * rows : 0));
}

void layer_norm_fwd(const LayerNormFwdParams& p, Stream stream);
void layer_norm_bwd(const LayerNormBwdParams& p, Stream stream);

}  // namespace fb
