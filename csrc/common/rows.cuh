// Row/column access helpers shared by the LayerNorm and GELU kernels (both builds).
//
// A row of `hidden` elements is cut into 16-byte chunks of K = 16 / sizeof(T) elements. `vec`
// (decided on the host: every pointer 16-byte aligned and hidden % K == 0) selects 16-byte
// accesses; otherwise each element is accessed on its own and columns >= ncols are skipped
// (the scalar tail).
#pragma once

#include "launch.cuh"
#include "platform.cuh"
#include "vec.cuh"

namespace fb {

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
