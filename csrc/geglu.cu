// GeGLU forward/backward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 with GELU),
// computed in fp32, stored in x's dtype. With z = x + bias split in halves a = z[:, :n] (through
// GELU) and g = z[:, n:] (the gate):
//   y  = gelu(a) * g
//   da = dy * g * gelu'(a),   dg = dy * gelu(a),   dx = [da, dg]
//   dbias = sum_rows(dx) in fp32, reduced deterministically (split partials, then
//   column_sum_kernel in split order), as in csrc/gelu.cu.
// GELU and gelu' (erf or tanh form): common/gelu_math.cuh. Each thread owns one 16-byte chunk of
// columns of y and the matching chunks of both halves of x (16-byte accesses when n is a
// multiple of the vector width and the pointers are aligned; per-element accesses otherwise).
#include "activation_common.cuh"
#include "common/gelu_math.cuh"
#include "common/platform.cuh"
#include "geglu.h"

namespace fb {
namespace {

FB_DEVICE float bias_at(const GegluParams& p, int col, bool valid) {
  return p.bias && valid ? load_float(p.bias, p.bias_dtype, col) : 0.0f;
}

// Forward: a grid-stride loop over (row, chunk of y's columns) pairs.
template <class T>
__global__ void __launch_bounds__(256) geglu_fwd_kernel(GegluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int n = p.half;
  const int ncols = live_cols(n, p.fault);  // fault 1: the last column is lost
  for_each_row_chunk<K>(p.rows, ncols, [&](long long row, int c) {
    const T* xr = static_cast<const T*>(p.x) + row * 2 * n;
    float a[K], g[K];
    load_chunk(xr, c, ncols, vec, a);
    load_chunk(xr + n, c, ncols, vec, g);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int col = c * K + j;
      const bool valid = col < ncols;
      a[j] = gelu(a[j] + bias_at(p, col, valid), p.tanh_approx) * (g[j] + bias_at(p, n + col, valid));
    }
    store_chunk(static_cast<T*>(p.out) + row * n, c, ncols, vec, a);
  });
}

// Backward: thread = one chunk of y's columns, block row y = one split of the rows; writes both
// halves of dx and, when dbias is asked for, the split's partial column sums of both.
template <class T>
__global__ void __launch_bounds__(64) geglu_bwd_kernel(GegluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int n = p.half;
  const int ncols = live_cols(n, p.fault);
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c * K >= ncols) return;  // no barriers in this kernel
  const RowSplit split = split_rows(p.rows);
  float ba[K], bg[K], sa[K] = {}, sg[K] = {};
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    ba[j] = bias_at(p, col, col < ncols);
    bg[j] = bias_at(p, n + col, col < ncols);
  }
  for (long long r = split.r0; r < split.r1; ++r) {
    const T* xr = static_cast<const T*>(p.x) + r * 2 * n;
    T* dxr = static_cast<T*>(p.out) + r * 2 * n;
    float d[K], a[K], g[K];
    load_chunk(static_cast<const T*>(p.dy) + r * n, c, ncols, vec, d);
    load_chunk(xr, c, ncols, vec, a);
    load_chunk(xr + n, c, ncols, vec, g);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      float ga, dga;
      gelu_and_grad(a[j] + ba[j], p.tanh_approx, ga, dga);
      a[j] = d[j] * (g[j] + bg[j]) * dga;  // da
      g[j] = d[j] * ga;                    // dg
      sa[j] += a[j];
      sg[j] += g[j];
    }
    store_chunk(dxr, c, ncols, vec, a);
    store_chunk(dxr + n, c, ncols, vec, g);
  }
  if (p.dbias) {
    float* part = p.workspace + static_cast<long long>(blockIdx.y) * 2 * n;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int col = c * K + j;
      if (col < ncols) {
        part[col] = sa[j];
        part[n + col] = sg[j];
      }
    }
  }
}

}  // namespace

void geglu_fwd(const GegluParams& p, Stream stream) {
  FB_DTYPE_SWITCH(p.dtype, T, launch_activation_fwd<T>(geglu_fwd_kernel<T>, p, p.half, stream));
}

// dx and dbias are 2n wide.
void geglu_bwd(const GegluParams& p, Stream stream) {
  FB_DTYPE_SWITCH(p.dtype, T, launch_activation_bwd<T>(geglu_bwd_kernel<T>, p, p.half, 2 * p.half, stream));
}

}  // namespace fb
