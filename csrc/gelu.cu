// Bias-GELU forward/backward (Hendrycks & Gimpel 2016), computed in fp32, stored in x's dtype:
// y = gelu(z), dx = dy * gelu'(z) with z = x + bias (the formulas: common/gelu_math.cuh).
// dbias = sum_rows(dx) in fp32, reduced deterministically (split partials, then
// column_sum_kernel in split order).
#include "activation_common.cuh"
#include "common/gelu_math.cuh"
#include "common/platform.cuh"
#include "gelu.h"

namespace fb {
namespace {

// Forward: a grid-stride loop over (row, chunk) pairs.
template <class T>
__global__ void __launch_bounds__(256) gelu_fwd_kernel(GeluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int ncols = live_cols(p.hidden, p.fault);  // fault 1: the last column is lost
  for_each_row_chunk<K>(p.rows, ncols, [&](long long row, int c) {
    float v[K];
    load_chunk(static_cast<const T*>(p.x) + row * p.hidden, c, ncols, vec, v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int col = c * K + j;
      const float z = p.bias && col < ncols ? v[j] + load_float(p.bias, p.bias_dtype, col) : v[j];
      v[j] = gelu(z, p.tanh_approx);
    }
    store_chunk(static_cast<T*>(p.out) + row * p.hidden, c, ncols, vec, v);
  });
}

// Backward: thread = one chunk of columns, block row y = one split of the rows; writes dx and,
// when dbias is asked for, the split's partial column sums.
template <class T>
__global__ void __launch_bounds__(64) gelu_bwd_kernel(GeluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int ncols = live_cols(p.hidden, p.fault);
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c * K >= ncols) return;  // no barriers in this kernel
  const RowSplit split = split_rows(p.rows);
  float b[K], sum[K] = {};
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    b[j] = p.bias && col < ncols ? load_float(p.bias, p.bias_dtype, col) : 0.0f;
  }
  for (long long r = split.r0; r < split.r1; ++r) {
    float d[K], v[K];
    load_chunk(static_cast<const T*>(p.dy) + r * p.hidden, c, ncols, vec, d);
    load_chunk(static_cast<const T*>(p.x) + r * p.hidden, c, ncols, vec, v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      v[j] = d[j] * gelu_grad(v[j] + b[j], p.tanh_approx);
      sum[j] += v[j];
    }
    store_chunk(static_cast<T*>(p.out) + r * p.hidden, c, ncols, vec, v);
  }
  if (p.dbias) {
    float* part = p.workspace + static_cast<long long>(blockIdx.y) * p.hidden;
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (c * K + j < ncols) part[c * K + j] = sum[j];
  }
}

}  // namespace

void gelu_fwd(const GeluParams& p, Stream stream) {
  FB_DTYPE_SWITCH(p.dtype, T, launch_activation_fwd<T>(gelu_fwd_kernel<T>, p, p.hidden, stream));
}

void gelu_bwd(const GeluParams& p, Stream stream) {
  FB_DTYPE_SWITCH(p.dtype, T, launch_activation_bwd<T>(gelu_bwd_kernel<T>, p, p.hidden, p.hidden, stream));
}

}  // namespace fb
