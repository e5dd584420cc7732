// LayerNorm forward/backward with BERT's add & norm fusion (Ba et al. 2016, eqs. 3-4):
//   h = dropout(x + x_bias) + residual,  y = (h - mean) * rstd * weight + bias,
// statistics in fp32 from a one-pass Welford accumulation per thread merged with Chan et al.'s
// pairwise formula (stable: no E[h^2] - E[h]^2 cancellation). One block per row; the fused h is
// stored in x's dtype and the statistics are taken of that stored value, so backward (which
// reads h) sees exactly the h the forward normalised.
#include <climits>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/platform.cuh"
#include "common/rows.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"
#include "layer_norm.h"

namespace fb {
namespace {

struct Welford {
  float n, mean, m2;
};

FB_DEVICE Welford welford_add(Welford a, float v) {
  a.n += 1.0f;
  const float d = v - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (v - a.mean);
  return a;
}

// Chan, Golub & LeVeque (1979): merge two partial (count, mean, M2) triples.
FB_DEVICE Welford welford_merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float d = b.mean - a.mean;
  return Welford{n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * b.n / n)};
}

struct Pair {
  float a, b;
};

// The dropout words of the 8-column group holding column col of row (scheme v2: counter
// (col / 8, row low, row high, 0)). A chunk of K = 4 or 8 columns lies in one group: one call each.
FB_DEVICE PhiloxWords row_words(int col, long long row, PhiloxKey key) {
  const uint64_t r = static_cast<uint64_t>(row);
  return philox4x32(static_cast<uint32_t>(col) >> 3, static_cast<uint32_t>(r), static_cast<uint32_t>(r >> 32), 0u,
                    key);
}

// Backward, chunk c of a row: h into v, then f(g, v[j]) for each column c * K + j < ncols, with
// g = dy * weight (dy without a weight). Both passes of the rows kernel.
template <class T, class F>
FB_DEVICE void for_each_g(const LayerNormBwdParams& p, const T* dy, const T* h, int c, int ncols, bool vec,
                          float (&v)[Vec<T>::kSize], F&& f) {
  constexpr int K = Vec<T>::kSize;
  float d[K];
  load_chunk(dy, c, ncols, vec, d);
  load_chunk(h, c, ncols, vec, v);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    if (col >= ncols) break;
    f(p.weight ? d[j] * load_float(p.weight, p.weight_dtype, col) : d[j], v[j]);
  }
}

template <class T>
__global__ void __launch_bounds__(512) layer_norm_fwd_kernel(LayerNormFwdParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  __shared__ Welford scratch[32];
  const long long row = blockIdx.x;
  const int ncols = live_cols(p.hidden, p.fault);  // fault 1: the last column is lost
  const int nchunks = (ncols + K - 1) / K;
  const long long off = row * p.hidden;
  const T* x = static_cast<const T*>(p.x) + off;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + off : nullptr;
  T* h = p.h ? static_cast<T*>(p.h) + off : nullptr;
  const PhiloxKey key = p.dropout ? philox_key(p.seed) : PhiloxKey{0u, 0u};

  // Pass 1: h (stored when fused) and its Welford statistics.
  Welford acc{0.0f, 0.0f, 0.0f};
  for (int c = static_cast<int>(thread_rank()); c < nchunks; c += static_cast<int>(block_size())) {
    float v[K];
    load_chunk(x, c, ncols, vec, v);
    if (h) {
      float r[K];
      if (res) load_chunk(res, c, ncols, vec, r);
      const PhiloxWords dw = p.dropout ? row_words(c * K, row, key) : PhiloxWords{0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int col = c * K + j;
        if (col >= ncols) break;
        float t = v[j];
        if (p.x_bias) t += load_float(p.x_bias, p.x_bias_dtype, col);
        if (p.dropout) t = dropout_keep(dw, col & 7, p.keep_threshold) ? t * p.keep_scale : 0.0f;
        if (res) t += r[j];
        v[j] = round_to<T>(t);
      }
      store_chunk(h, c, ncols, vec, v);
    }
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (c * K + j < ncols) acc = welford_add(acc, v[j]);
  }
  acc = block_allreduce(acc, [](Welford a, Welford b) { return welford_merge(a, b); }, scratch, p.fault);
  const float mean = acc.mean;
  const float rstd = rsqrt(acc.m2 / static_cast<float>(p.hidden) + p.eps);
  if (thread_rank() == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  // Pass 2: normalise (each thread re-reads the chunks it wrote itself).
  const T* src = h ? h : x;
  T* y = static_cast<T*>(p.y) + off;
  for (int c = static_cast<int>(thread_rank()); c < nchunks; c += static_cast<int>(block_size())) {
    float v[K];
    load_chunk(src, c, ncols, vec, v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int col = c * K + j;
      if (col >= ncols) break;
      float t = (v[j] - mean) * rstd;
      if (p.weight) t *= load_float(p.weight, p.weight_dtype, col);
      if (p.bias) t += load_float(p.bias, p.bias_dtype, col);
      v[j] = t;
    }
    store_chunk(y, c, ncols, vec, v);
  }
}

// Backward, per row (xhat = (h - mean) * rstd, g = dy * weight, n = hidden):
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dresidual = dh,
//   dx = dh * keep / (1 - p)   (keep = the forward's Philox mask; dx = dh without dropout).
template <class T>
__global__ void __launch_bounds__(512) layer_norm_bwd_rows_kernel(LayerNormBwdParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  __shared__ Pair scratch[32];
  const long long row = blockIdx.x;
  const int ncols = live_cols(p.hidden, p.fault);
  const int nchunks = (ncols + K - 1) / K;
  const long long off = row * p.hidden;
  const T* dy = static_cast<const T*>(p.dy) + off;
  const T* h = static_cast<const T*>(p.h) + off;
  const float mean = p.mean[row], rstd = p.rstd[row];
  const PhiloxKey key = p.dropout ? philox_key(p.seed) : PhiloxKey{0u, 0u};

  Pair s{0.0f, 0.0f};
  for (int c = static_cast<int>(thread_rank()); c < nchunks; c += static_cast<int>(block_size())) {
    float v[K];
    for_each_g(p, dy, h, c, ncols, vec, v, [&](float g, float hv) {
      s.a += g;
      s.b += g * ((hv - mean) * rstd);
    });
  }
  s = block_allreduce(s, [](Pair u, Pair w) { return Pair{u.a + w.a, u.b + w.b}; }, scratch, p.fault);
  const float inv_n = 1.0f / static_cast<float>(p.hidden);
  const float mean_g = s.a * inv_n, mean_gx = s.b * inv_n;
  if (p.dx_bias && thread_rank() == 0) {  // for the column kernel's d(x_bias)
    p.row_stats[2 * row] = mean_g;
    p.row_stats[2 * row + 1] = mean_gx;
  }

  T* dx = static_cast<T*>(p.dx) + off;
  T* dres = p.dresidual ? static_cast<T*>(p.dresidual) + off : nullptr;
  for (int c = static_cast<int>(thread_rank()); c < nchunks; c += static_cast<int>(block_size())) {
    float v[K];
    for_each_g(p, dy, h, c, ncols, vec, v,
               [&](float g, float& hv) { hv = rstd * (g - mean_g - (hv - mean) * rstd * mean_gx); });
    if (dres) store_chunk(dres, c, ncols, vec, v);
    if (p.dropout) {
      const PhiloxWords dw = row_words(c * K, row, key);
#pragma unroll
      for (int j = 0; j < K; ++j) v[j] = dropout_keep(dw, (c * K + j) & 7, p.keep_threshold) ? v[j] * p.keep_scale : 0.0f;
    }
    store_chunk(dx, c, ncols, vec, v);
  }
}

// Column sums, first stage: split s of the rows writes partial sums of
//   dweight = sum_rows(dy * xhat), dbias = sum_rows(dy), dx_bias = sum_rows(dx)   (fp32)
// to workspace[(k * splits + s) * hidden + col]; column_sum_kernel adds the splits in order.
template <class T>
__global__ void __launch_bounds__(64) layer_norm_bwd_columns_kernel(LayerNormBwdParams p, bool vec) {
  constexpr int K = Vec<T>::kSize;
  const int ncols = live_cols(p.hidden, p.fault);
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c * K >= ncols) return;  // no barriers in this kernel
  const RowSplit split = split_rows(p.rows);
  const float* stats = p.row_stats;
  const PhiloxKey key = p.dropout ? philox_key(p.seed) : PhiloxKey{0u, 0u};
  float w[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    w[j] = p.weight && col < ncols ? load_float(p.weight, p.weight_dtype, col) : 1.0f;
  }
  float sw[K] = {}, sb[K] = {}, sx[K] = {};
  for (long long r = split.r0; r < split.r1; ++r) {
    float d[K], v[K];
    load_chunk(static_cast<const T*>(p.dy) + r * p.hidden, c, ncols, vec, d);
    load_chunk(static_cast<const T*>(p.h) + r * p.hidden, c, ncols, vec, v);
    const float mean = p.mean[r], rstd = p.rstd[r];
    const PhiloxWords dw = p.dropout && p.dx_bias ? row_words(c * K, r, key) : PhiloxWords{0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float xhat = (v[j] - mean) * rstd;
      sw[j] += d[j] * xhat;
      sb[j] += d[j];
      if (p.dx_bias) {
        float dh = rstd * (d[j] * w[j] - stats[2 * r] - xhat * stats[2 * r + 1]);
        if (p.dropout)
          dh = dropout_keep(dw, (c * K + j) & 7, p.keep_threshold) ? dh * p.keep_scale : 0.0f;
        sx[j] += dh;
      }
    }
  }
  float* part = p.workspace + static_cast<long long>(blockIdx.y) * p.hidden;
  const long long plane = static_cast<long long>(gridDim.y) * p.hidden;  // one plane per output
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int col = c * K + j;
    if (col >= ncols) break;
    part[col] = sw[j];
    part[plane + col] = sb[j];
    part[2 * plane + col] = sx[j];
  }
}

template <class T>
void fwd(const LayerNormFwdParams& p, Stream stream) {
  const bool vec = use_vec<T>(p.hidden, p.fault, {p.x, p.residual, p.y, p.h});
  launch(layer_norm_fwd_kernel<T>, dim3(static_cast<unsigned>(p.rows)),
         dim3(row_block_threads(p.hidden, Vec<T>::kSize)), 0, stream, p, vec);
}

template <class T>
void bwd(LayerNormBwdParams p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  p.row_stats = p.dx_bias ? p.workspace + 3LL * column_splits(p.rows) * p.hidden : nullptr;
  const bool vec = use_vec<T>(p.hidden, p.fault, {p.dy, p.h, p.dx, p.dresidual});
  launch(layer_norm_bwd_rows_kernel<T>, dim3(static_cast<unsigned>(p.rows)), dim3(row_block_threads(p.hidden, K)),
         0, stream, p, vec);
  if (!p.dweight && !p.dbias && !p.dx_bias) return;
  const int splits = column_splits(p.rows);
  const int nchunks = (p.hidden + K - 1) / K;
  launch(layer_norm_bwd_columns_kernel<T>, dim3((nchunks + 63) / 64, splits), dim3(64), 0, stream, p, vec);
  ColumnSumParams cs{p.workspace, {p.dweight, p.dbias, p.dx_bias}, splits, p.hidden, live_cols(p.hidden, p.fault)};
  launch_column_sum(cs, stream);
}

void check_rows(long long rows) {
  FB_CHECK_ARG(rows <= INT_MAX, "rows: expected <= ", INT_MAX, " (one block per row), got ", rows);
}

}  // namespace

void layer_norm_fwd(const LayerNormFwdParams& p, Stream stream) {
  check_rows(p.rows);
  FB_DTYPE_SWITCH(p.dtype, T, fwd<T>(p, stream));
}

void layer_norm_bwd(const LayerNormBwdParams& p, Stream stream) {
  check_rows(p.rows);
  FB_DTYPE_SWITCH(p.dtype, T, bwd<T>(p, stream));
}

}  // namespace fb
