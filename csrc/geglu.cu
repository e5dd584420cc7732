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
#include <initializer_list>

#include "common/fault.h"
#include "common/gelu_math.cuh"
#include "common/launch.cuh"
#include "common/platform.cuh"
#include "common/rows.cuh"
#include "common/vec.cuh"
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
  const int ncols = FB_FAULT(p.fault == 1) ? n - 1 : n;  // fault 1: the last column is lost
  const long long nchunks = (ncols + K - 1) / K;
  const long long total = p.rows * nchunks;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long row = i / nchunks;
    const int c = static_cast<int>(i % nchunks);
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
  }
}

// Backward: thread = one chunk of y's columns, block row y = one split of the rows; writes both
// halves of dx and, when dbias is asked for, the split's partial column sums of both.
template <class T>
__global__ void __launch_bounds__(64) geglu_bwd_kernel(GegluParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int n = p.half;
  const int ncols = FB_FAULT(p.fault == 1) ? n - 1 : n;
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c * K >= ncols) return;  // no barriers in this kernel
  const int splits = static_cast<int>(gridDim.y);
  const long long per_split = (p.rows + splits - 1) / splits;
  const long long r0 = blockIdx.y * per_split;
  const long long r1 = r0 + per_split < p.rows ? r0 + per_split : p.rows;
  float ba[K], bg[K], sa[K] = {}, sg[K] = {};
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    ba[j] = bias_at(p, col, col < ncols);
    bg[j] = bias_at(p, n + col, col < ncols);
  }
  for (long long r = r0; r < r1; ++r) {
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

template <class T>
bool use_vec(const GegluParams& p) {
  if (FB_FAULT(p.fault != 0) || p.half % Vec<T>::kSize != 0) return false;
  for (const void* q : {p.dy, p.x, static_cast<const void*>(p.out)})
    if (q && !is_aligned16(q)) return false;
  return true;
}

template <class T>
void fwd(const GegluParams& p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const long long total = p.rows * ((p.half + K - 1) / K);
  const long long blocks = (total + 255) / 256;
  launch(geglu_fwd_kernel<T>, dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20))), dim3(256), 0,
         stream, p, use_vec<T>(p));
}

template <class T>
void bwd(const GegluParams& p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const int splits = column_splits(p.rows);
  const int nchunks = (p.half + K - 1) / K;
  launch(geglu_bwd_kernel<T>, dim3((nchunks + 63) / 64, splits), dim3(64), 0, stream, p, use_vec<T>(p));
  if (!p.dbias) return;
  ColumnSumParams cs{p.workspace, {p.dbias, nullptr, nullptr}, splits, 2 * p.half,
                     FB_FAULT(p.fault == 1) ? 2 * p.half - 1 : 2 * p.half};  // fault 1: dbias loses a column too
  launch_column_sum(cs, stream);
}

}  // namespace

void geglu_fwd(const GegluParams& p, Stream stream) { FB_DTYPE_SWITCH(p.dtype, T, fwd<T>(p, stream)); }

void geglu_bwd(const GegluParams& p, Stream stream) {
  FB_CHECK_ARG(p.rows <= 65535LL * 1024 * 1024, "rows: too many rows (", p.rows, ")");
  FB_DTYPE_SWITCH(p.dtype, T, bwd<T>(p, stream));
}

}  // namespace fb
