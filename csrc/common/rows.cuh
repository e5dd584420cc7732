// Row/column access helpers shared by the LayerNorm, bias-GELU and GeGLU kernels (both builds).
//
// A row of `hidden` elements is cut into 16-byte chunks of K = 16 / sizeof(T) elements. `vec`
// (decided on the host: every pointer 16-byte aligned and hidden % K == 0) selects 16-byte
// accesses; otherwise each element is accessed on its own and columns >= ncols are skipped
// (the scalar tail).
#pragma once

#include <initializer_list>

#include "fault.h"
#include "launch.cuh"
#include "platform.cuh"
#include "vec.cuh"

namespace fb {

// The columns a kernel touches of a row of `width`: all of them, or all but the last under planted
// fault 1 (common/fault.h; the harness must catch the lost column).
FB_HOST_DEVICE int live_cols(int width, int fault) { return FB_FAULT(fault == 1) ? width - 1 : width; }

// Host side: whether a launch takes the 16-byte path: no planted fault, `width` a multiple of K and
// every non-null pointer 16-byte aligned.
template <class T>
bool use_vec(int width, int fault, std::initializer_list<const void*> ptrs) {
  if (FB_FAULT(fault != 0) || width % Vec<T>::kSize != 0) return false;
  for (const void* q : ptrs)
    if (q && !is_aligned16(q)) return false;
  return true;
}

// Calls f(row, chunk) for every (row, 16-byte chunk of the first ncols columns) pair of `rows`
// rows, in a grid-stride loop over a 1-D grid (the elementwise forward kernels).
template <int K, class F>
FB_DEVICE void for_each_row_chunk(long long rows, int ncols, F&& f) {
  const long long nchunks = (ncols + K - 1) / K;
  const long long total = rows * nchunks;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    f(i / nchunks, static_cast<int>(i % nchunks));
}

template <class T>
FB_DEVICE void load_chunk(const T* row, int chunk, int ncols, bool vec, float (&out)[Vec<T>::kSize]) {
  constexpr int K = Vec<T>::kSize;
  const int col0 = chunk * K;
  if (vec) {
    const Vec<T> v = load_vec(row + col0);
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = to_float(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = col0 + j < ncols ? to_float(row[col0 + j]) : 0.0f;
  }
}

template <class T>
FB_DEVICE void store_chunk(T* row, int chunk, int ncols, bool vec, const float (&in)[Vec<T>::kSize]) {
  constexpr int K = Vec<T>::kSize;
  const int col0 = chunk * K;
  if (vec) {
    Vec<T> v;
#pragma unroll
    for (int j = 0; j < K; ++j) v.v[j] = from_float<T>(in[j]);
    store_vec(row + col0, v);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (col0 + j < ncols) row[col0 + j] = from_float<T>(in[j]);
  }
}

// Deterministic column sums, first stage: the rows [r0, r1) of this block's split (blockIdx.y of
// gridDim.y equal splits of `rows`; the last may be short or empty).
struct RowSplit {
  long long r0, r1;
};
FB_DEVICE RowSplit split_rows(long long rows) {
  const int splits = static_cast<int>(gridDim.y);
  const long long per_split = (rows + splits - 1) / splits;
  const long long r0 = blockIdx.y * per_split;
  return RowSplit{r0, r0 + per_split < rows ? r0 + per_split : rows};
}

// Deterministic column sums, second stage: out_k[col] = sum over splits of
// partial[(k * splits + s) * hidden + col], in split order (k < 3; null outputs are skipped).
struct ColumnSumParams {
  const float* partial;
  float* out[3];
  int splits, hidden, ncols;
};

namespace {  // one copy per translation unit (each .cu file is its own device program)
__global__ void column_sum_kernel(ColumnSumParams p) {
  const int col = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= p.ncols) return;
  for (int k = 0; k < 3; ++k) {
    if (!p.out[k]) continue;
    const float* src = p.partial + static_cast<long long>(k) * p.splits * p.hidden + col;
    float s = 0.0f;
    for (int i = 0; i < p.splits; ++i) s += src[static_cast<long long>(i) * p.hidden];
    p.out[k][col] = s;
  }
}

[[maybe_unused]] void launch_column_sum(const ColumnSumParams& p, Stream stream) {
  launch(column_sum_kernel, dim3((p.ncols + 127) / 128), dim3(128), 0, stream, p);
}
}  // namespace

// Threads of a row block: one chunk per thread, at least one warp, at most 512 threads.
inline unsigned row_block_threads(int hidden, int k) {
  const long long chunks = (hidden + k - 1) / k;
  const long long t = (chunks + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : t > 512 ? 512 : t);
}

}  // namespace fb
