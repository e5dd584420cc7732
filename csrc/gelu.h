// Bias-GELU (erf and tanh forms): parameters and entry points (plain C++, both builds).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"
#include "layer_norm.h"  // column_splits

namespace fb {

struct GeluParams {
  const void* dy;    // [rows, hidden] dtype (backward only)
  const void* x;     // [rows, hidden] dtype
  const void* bias;  // [hidden] bias_dtype or null
  void* out;         // forward: y; backward: dx — [rows, hidden] dtype
  float* dbias;      // [hidden] or null (backward only)
  float* workspace;  // gelu_bwd_workspace_bytes(rows, hidden, dbias != null) bytes
  long long rows;
  int hidden;
  DType dtype, bias_dtype;
  bool tanh_approx;  // approximate == "tanh"
  int fault;
};

inline long long gelu_bwd_workspace_bytes(long long rows, int hidden, bool need_dbias) {
  return need_dbias ? 4LL * column_splits(rows) * hidden : 0;
}

void gelu_fwd(const GeluParams& p, Stream stream);
void gelu_bwd(const GeluParams& p, Stream stream);

}  // namespace fb
