// Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 34) on q and k in one launch,
// computed in fp32, stored in the input dtype. Pair (x1, x2) of a head at table row pos:
//   o1 = x1 c - x2 s,   o2 = x2 c + x1 s,   c = cos[pos, i], s = sin[pos, i]
// with pair i = (i, i + rotary_dim / 2) (rotate_half: GPT-NeoX, ModernBERT) or (2i, 2i + 1)
// (interleaved: the RoPE paper); features >= rotary_dim pass through. The rotation is
// orthogonal, so the backward is dx = R(-theta) dy: the same kernel with s -> -s (`inverse`).
//
// In place: `out` may alias `x` (the same elements, any strides). Each thread reads every element
// of its pairs before it writes any of them and no two threads touch the same element, so
// out == x is safe; a passthrough chunk whose output address is its input address is skipped.
//
// Work item = one 16-byte chunk of one head of one token: chunks [0, nrot) rotate (rotate_half:
// K pairs = a chunk of x1 and the matching chunk of x2; interleaved: K features = K / 2 pairs),
// chunks [nrot, nrot + npass) copy the passthrough features. 16-byte accesses when every row
// start and region boundary is 16-byte aligned (decided on the host), per-element accesses with
// bounds otherwise (odd head_dim, partial rotary dims, strided views).
#include "common/fault.h"
#include "common/launch.cuh"
#include "common/platform.cuh"
#include "common/rows.cuh"
#include "common/vec.cuh"
#include "rotary.h"

namespace fb {
namespace {

// N consecutive fp32 table entries from p (the first n of them valid): 16-byte loads when `vec`
// (p 16-byte aligned, n >= N), scalar otherwise.
template <int N>
FB_DEVICE void load_table(const float* p, int n, bool vec, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
    if (vec) {
#pragma unroll
      for (int m = 0; m < N / 4; ++m) {
        const Vec<float> v = load_vec(p + 4 * m);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 * m + j] = v.v[j];
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = j < n ? p[j] : 0.0f;
}

FB_DEVICE long long offset3(const long long (&st)[3], long long b, long long s, int h) {
  return b * st[0] + s * st[1] + h * st[2];
}

// vec: 16-byte accesses of q/k and their outputs; tvec: 16-byte reads of the tables.
template <class T>
__global__ void __launch_bounds__(256) rotary_kernel(RotaryParams p, bool vec, bool tvec) {
  constexpr int K = Vec<T>::kSize;
  const int half = p.rotary_dim / 2;
  const int npairs = FB_FAULT(p.fault == 1) ? half - 1 : half;  // fault 1: the last pair is lost
  const int rot_cols = p.interleaved ? 2 * npairs : npairs;     // columns walked by the rotated chunks
  const int pass_cols = p.head_dim - p.rotary_dim;
  const int nrot = (rot_cols + K - 1) / K;
  const int nchunks = nrot + (pass_cols + K - 1) / K;
  const int heads = p.q.heads + p.k.heads;
  const long long total = p.batch * p.seqlen * heads * nchunks;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long row = i / nchunks;  // (token, head)
    const int c = static_cast<int>(i - row * nchunks);
    const long long token = row / heads;
    const int hh = static_cast<int>(row - token * heads);
    const long long b = token / p.seqlen, s = token - b * p.seqlen;
    const bool is_k = hh >= p.q.heads;
    const int h = is_k ? hh - p.q.heads : hh;
    const T* x = static_cast<const T*>(is_k ? p.k.x : p.q.x) +
                 (is_k ? offset3(p.k.x_stride, b, s, h) : offset3(p.q.x_stride, b, s, h));
    T* o = static_cast<T*>(is_k ? p.k.out : p.q.out) +
           (is_k ? offset3(p.k.out_stride, b, s, h) : offset3(p.q.out_stride, b, s, h));
    if (c >= nrot) {  // passthrough features
      const int cp = c - nrot;
      if (x == o) continue;  // in place: nothing to copy
      float v[K];
      load_chunk(x + p.rotary_dim, cp, pass_cols, vec, v);
      store_chunk(o + p.rotary_dim, cp, pass_cols, vec, v);
      continue;
    }
    const long long pos = p.positions[b * p.pos_stride[0] + s * p.pos_stride[1]];
    const float* crow = p.cos + pos * half;
    const float* srow = p.sin + pos * half;
    const float sign = p.inverse ? -1.0f : 1.0f;
    if (p.interleaved) {
      constexpr int P = K / 2;  // pairs per chunk
      float v[K], cs[P], sn[P];
      load_chunk(x, c, rot_cols, vec, v);
      load_table(crow + c * P, npairs - c * P, tvec, cs);
      load_table(srow + c * P, npairs - c * P, tvec, sn);
#pragma unroll
      for (int m = 0; m < P; ++m) {
        const float x1 = v[2 * m], x2 = v[2 * m + 1], sm = sign * sn[m];
        v[2 * m] = x1 * cs[m] - x2 * sm;
        v[2 * m + 1] = x2 * cs[m] + x1 * sm;
      }
      store_chunk(o, c, rot_cols, vec, v);
    } else {
      float x1[K], x2[K], cs[K], sn[K];
      load_chunk(x, c, npairs, vec, x1);
      load_chunk(x + half, c, npairs, vec, x2);
      load_table(crow + c * K, npairs - c * K, tvec, cs);
      load_table(srow + c * K, npairs - c * K, tvec, sn);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float a = x1[j], bb = x2[j], sj = sign * sn[j];
        x1[j] = a * cs[j] - bb * sj;
        x2[j] = bb * cs[j] + a * sj;
      }
      store_chunk(o, c, npairs, vec, x1);
      store_chunk(o + half, c, npairs, vec, x2);
    }
  }
}

bool strides_divisible(const RotaryTensor& t, long long k) {
  if (t.heads == 0) return true;
  for (int d = 0; d < 3; ++d)
    if (t.x_stride[d] % k != 0 || t.out_stride[d] % k != 0) return false;
  return is_aligned16(t.x) && is_aligned16(t.out);
}

template <class T>
void run(const RotaryParams& p, Stream stream) {
  constexpr int K = Vec<T>::kSize;
  const int half = p.rotary_dim / 2;
  // Every row start (strides), the x2 half (rotate_half) and the passthrough region on 16 bytes.
  const bool vec = !FB_FAULT(p.fault != 0) && p.head_dim % K == 0 && p.rotary_dim % K == 0 &&
                   (p.interleaved || half % K == 0) && strides_divisible(p.q, K) && strides_divisible(p.k, K);
  // Table rows (pos * half floats) and each chunk's table slice (K or K / 2 floats) on 16 bytes.
  const bool tvec = vec && half % 4 == 0 && (p.interleaved ? K / 2 : K) % 4 == 0 && is_aligned16(p.cos) &&
                    is_aligned16(p.sin);
  const int rot_cols = p.interleaved ? p.rotary_dim : half;
  const long long nchunks = (rot_cols + K - 1) / K + (p.head_dim - p.rotary_dim + K - 1) / K;
  const long long total = p.batch * p.seqlen * (p.q.heads + p.k.heads) * nchunks;
  const long long blocks = (total + 255) / 256;
  launch(rotary_kernel<T>, dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20))), dim3(256), 0,
         stream, p, vec, tvec);
}

}  // namespace

void rotary(const RotaryParams& p, Stream stream) { FB_DTYPE_SWITCH(p.dtype, T, run<T>(p, stream)); }

}  // namespace fb
