// The launches the bias + activation ops share (csrc/gelu.cu, csrc/geglu.cu; both builds). Params is
// GeluParams or GegluParams: the fields dy, x, out, dbias, workspace, rows and fault, with `width`
// the columns a thread walks in chunks (bias-GELU: hidden; GeGLU: the width n of y).
//   forward:  kernel(p, vec), a grid-stride loop over (row, chunk) pairs, 256 threads a block;
//   backward: kernel(p, vec) on (chunk blocks of 64 threads, column_splits(rows) row splits), each
//             split writing its partial column sums of dx to the workspace; then, when dbias is asked
//             for, column_sum_kernel adds the splits in order over `dbias_width` columns (deterministic).
// vec (16-byte accesses): use_vec over dy, x and out.
#pragma once

#include "common/dtype.h"
#include "common/launch.cuh"
#include "common/rows.cuh"
#include "common/vec.cuh"
#include "layer_norm.h"  // column_splits

namespace fb {

template <class T, class Params>
bool activation_vec(const Params& p, int width) {
  return use_vec<T>(width, p.fault, {p.dy, p.x, static_cast<const void*>(p.out)});
}

template <class T, class Params>
void launch_activation_fwd(void (*kernel)(Params, bool), const Params& p, int width, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const long long total = p.rows * ((width + K - 1) / K);
  const long long blocks = (total + 255) / 256;
  launch(kernel, dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20))), dim3(256), 0, stream, p,
         activation_vec<T>(p, width));
}

template <class T, class Params>
void launch_activation_bwd(void (*kernel)(Params, bool), const Params& p, int width, int dbias_width, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  FB_CHECK_ARG(p.rows <= 65535LL * 1024 * 1024, "rows: too many rows (", p.rows, ")");
  const int splits = column_splits(p.rows);
  const int nchunks = (width + K - 1) / K;
  launch(kernel, dim3((nchunks + 63) / 64, splits), dim3(64), 0, stream, p, activation_vec<T>(p, width));
  if (!p.dbias) return;
  // fault 1: dbias loses its last column too
  ColumnSumParams cs{p.workspace, {p.dbias, nullptr, nullptr}, splits, dbias_width, live_cols(dbias_width, p.fault)};
  launch_column_sum(cs, stream);
}

}  // namespace fb
