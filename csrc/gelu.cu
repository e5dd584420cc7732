// Bias-GELU forward/backward (Hendrycks & Gimpel 2016), computed in fp32, stored in x's dtype:
// y = gelu(z), dx = dy * gelu'(z) with z = x + bias (the formulas: common/gelu_math.cuh).
// dbias = sum_rows(dx) in fp32, reduced deterministically (split partials, then
// column_sum_kernel in split order).
#include <initializer_list>

#include "common/fault.h"
#include "common/gelu_math.cuh"
#include "common/launch.cuh"
#include "common/platform.cuh"
#include "common/rows.cuh"
#include "common/vec.cuh"
#include "gelu.h"

namespace fb {
namespace {

// Forward: a grid-stride loop over (row, chunk) pairs.
template <class T>
__global__ void __launch_bounds__(256) gelu_fwd_kernel(GeluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int ncols = FB_FAULT(p.fault == 1) ? p.hidden - 1 : p.hidden;  // fault 1: the last column is lost
  const long long nchunks = (ncols + K - 1) / K;
  const long long total = p.rows * nchunks;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long row = i / nchunks;
    const int c = static_cast<int>(i % nchunks);
    float v[K];
    load_chunk(static_cast<const T*>(p.x) + row * p.hidden, c, ncols, vec, v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int col = c * K + j;
      const float z = p.bias && col < ncols ? v[j] + load_float(p.bias, p.bias_dtype, col) : v[j];
      v[j] = gelu(z, p.tanh_approx);
    }
    store_chunk(static_cast<T*>(p.out) + row * p.hidden, c, ncols, vec, v);
  }
}

// Backward: thread = one chunk of columns, block row y = one split of the rows; writes dx and,
// when dbias is asked for, the split's partial column sums.
template <class T>
__global__ void __launch_bounds__(64) gelu_bwd_kernel(GeluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int ncols = FB_FAULT(p.fault == 1) ? p.hidden - 1 : p.hidden;
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c * K >= ncols) return;  // no barriers in this kernel
  const int splits = static_cast<int>(gridDim.y);
  const long long per_split = (p.rows + splits - 1) / splits;
  const long long r0 = blockIdx.y * per_split;
  const long long r1 = r0 + per_split < p.rows ? r0 + per_split : p.rows;
  float b[K], sum[K] = {};
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    b[j] = p.bias && col < ncols ? load_float(p.bias, p.bias_dtype, col) : 0.0f;
  }
  for (long long r = r0; r < r1; ++r) {
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

template <class T>
bool use_vec(const GeluParams& p) {
  if (FB_FAULT(p.fault != 0) || p.hidden % Vec<T>::kSize != 0) return false;
  for (const void* q : {p.dy, p.x, static_cast<const void*>(p.out)})
    if (q && !is_aligned16(q)) return false;
  return true;
}

template <class T>
void fwd(const GeluParams& p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const long long total = p.rows * ((p.hidden + K - 1) / K);
  const long long blocks = (total + 255) / 256;
  launch(gelu_fwd_kernel<T>, dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20))), dim3(256), 0,
         stream, p, use_vec<T>(p));
}

template <class T>
void bwd(const GeluParams& p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const int splits = column_splits(p.rows);
  const int nchunks = (p.hidden + K - 1) / K;
  launch(gelu_bwd_kernel<T>, dim3((nchunks + 63) / 64, splits), dim3(64), 0, stream, p, use_vec<T>(p));
  if (!p.dbias) return;
  ColumnSumParams cs{p.workspace, {p.dbias, nullptr, nullptr}, splits, p.hidden,
                     FB_FAULT(p.fault == 1) ? p.hidden - 1 : p.hidden};
  launch_column_sum(cs, stream);
}

}  // namespace

void gelu_fwd(const GeluParams& p, Stream stream) { FB_DTYPE_SWITCH(p.dtype, T, fwd<T>(p, stream)); }

void gelu_bwd(const GeluParams& p, Stream stream) {
  FB_CHECK_ARG(p.rows <= 65535LL * 1024 * 1024, "rows: too many rows (", p.rows, ")");
  FB_DTYPE_SWITCH(p.dtype, T, bwd<T>(p, stream));
}

}  // namespace fb
