// GeGLU with a fused bias (erf and tanh GELU): parameters and entry points (plain C++, both builds).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"
#include "layer_norm.h"  // column_splits

namespace fb {

// y = gelu(x[:, :n] + bias[:n]) * (x[:, n:] + bias[n:]), n = `half`; rows x 2n, contiguous.
struct GegluParams {
  const void* dy;    // [rows, n] dtype (backward only)
  const void* x;     // [rows, 2n] dtype
  const void* bias;  // [2n] bias_dtype or null
  void* out;         // forward: y [rows, n]; backward: dx [rows, 2n] — dtype
  float* dbias;      // [2n] or null (backward only)
  float* workspace;  // geglu_bwd_workspace_bytes(rows, n, dbias != null) bytes
  long long rows;
  int half;          // n: the width of y, half the width of x
  DType dtype, bias_dtype;
  bool tanh_approx;  // approximate == "tanh"
  int fault;
};

inline long long geglu_bwd_workspace_bytes(long long rows, int half, bool need_dbias) {
  return need_dbias ? 4LL * column_splits(rows) * 2 * half : 0;
}

void geglu_fwd(const GegluParams& p, Stream stream);
void geglu_bwd(const GegluParams& p, Stream stream);

}  // namespace fb
