// Fused masked multi-head attention (forward and backward): parameters and launchers.
//
// One parameter block serves the forward and both backward kernels. Every pointer is raw (device
// memory for fastbert._C, host memory for the host build fastbert._C_host); every offset is int64.
// Layouts (the backend contract in fastbert/backends/__init__.py):
//   padded: q/out/dout/dq [batch, seqlen_q, num_heads, head_dim], k/v/dk/dv [batch, seqlen_k,
//           num_heads, head_dim], any strides with a contiguous last dim;
//           lse [2, batch, num_heads, seqlen_q] fp32 (row max, log row sum).
//   varlen: q/k/v/... [total_tokens, num_heads, head_dim] with int32 cu_seqlens [batch + 1]
//           (stride_batch = 0; the row index is cu_seqlens[b] + position); lse [2, num_heads,
//           total_tokens] fp32.
//   attention_mask: bool (1 byte) [batch, seqlen_k], 1 = attend.  attn_bias: a 4-D strided view
//   [batch, num_heads, seqlen_q, seqlen_k] (stride 0 on broadcast dims) of fp32/fp16/bf16.
//   dbias: fp32 [batch, num_heads, seqlen_q, seqlen_k] (the full gradient of the scores bias).
// Sliding window (window_left, window_right): query i sees key j only if
// i - window_left <= j <= i + window_right, with i and j positions within the sequence (padded
// index, or offset from cu_seqlens[b]; top-left aligned also when seqlen_q != seqlen_k). The
// kernels skip every key tile (query tile in the dk/dv kernel) outside the window and test it per
// element only on edge tiles, so the cost grows with seqlen x window; a row left with no key is
// empty like a fully masked one.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"

namespace fb {

// A tensor viewed as rows of head_dim contiguous elements: element (b, s, h, d) lives at
// ptr + b * stride_batch + s * stride_seq + h * stride_head + d.
struct AttnTensor {
  void* ptr = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_seq = 0;
  int64_t stride_head = 0;
};

// Faults planted on purpose so the tests can prove the harness catches a kernel bug.
enum class AttnFault : int {
  kNone = 0,
  kKeyBoundOffByOne = 1,  // treat key seqlen_k as a valid key (an off-by-one in the tile bound)
};

// A window bound that excludes no key at any supported seqlen (<= 2^30).
constexpr int kNoWindow = 1 << 30;

struct AttnParams {
  DType dtype = DType::kFloat16;  // of q/k/v/out/dout/dq/dk/dv
  int batch = 0;
  int num_heads = 0;
  int head_dim = 0;      // a multiple of 8 in [8, 256] (kernels pad it to a bucket of 64/128/256)
  int max_seqlen_q = 0;  // padded: seqlen_q; varlen: max_seqlen
  int max_seqlen_k = 0;  // padded: seqlen_k; varlen: max_seqlen

  AttnTensor q, k, v, out;
  AttnTensor dout, dq, dk, dv;  // backward only

  // lse: two fp32 planes [2, ...]: plane 0 the row max m, plane 1 log(l) of the row sum, so that
  // logsumexp = m + log(l) and the backward's P = exp((s - m) - log(l)) stays exact where m is huge
  // (a row all biased finfo.min: m + log(l) == m in fp32). Empty rows: (+inf, 0).
  float* lse = nullptr;  // element (plane, b, h, s) at lse + plane * lse_stride_plane + b * lse_stride_batch + h * lse_stride_head + s
  int64_t lse_stride_plane = 0;
  int64_t lse_stride_batch = 0;  // (varlen: 0; s is then the token index cu_seqlens[b] + position)
  int64_t lse_stride_head = 0;

  const int32_t* cu_seqlens = nullptr;  // varlen when non-null

  const uint8_t* attention_mask = nullptr;  // bool [batch, seqlen_k] or null
  int64_t mask_stride_batch = 0;
  int64_t mask_stride_key = 0;

  const void* attn_bias = nullptr;  // [batch, num_heads, seqlen_q, seqlen_k] view or null
  DType bias_dtype = DType::kFloat32;
  int64_t bias_stride[4] = {0, 0, 0, 0};

  float* dbias = nullptr;  // fp32 [batch, num_heads, seqlen_q, seqlen_k] or null (backward only)
  int64_t dbias_stride[4] = {0, 0, 0, 0};

  // The sliding window, in keys. "No window" is stored as a window that excludes nothing
  // (window_left >= max_seqlen_q, window_right >= max_seqlen_k; the default 2^30 is one for every
  // supported seqlen), so the kernels have no separate path for it. Both in [0, 2^30]: every sum and
  // difference of a window and a position stays inside int32.
  int window_left = kNoWindow;
  int window_right = kNoWindow;

  float softmax_scale = 1.0f;
  const int64_t* seed = nullptr;  // int64 [2] Philox key words when dropout is on, else null
  uint32_t dropout_threshold = 0;  // keep iff the Philox u16 >= threshold (fastbert/backends/_philox.py)
  float dropout_scale = 1.0f;      // 1 / (1 - dropout_p rounded to 2^-16)

  bool aligned16 = false;  // every q/k/v/out/dout row start is 16-byte aligned (vector loads)
  AttnFault fault = AttnFault::kNone;
};

// Head dims the kernels take: every multiple of 8 in [8, 256] (fastbert/backends/cuda/attention.py
// holds the same list for capabilities and tests).
inline bool attention_head_dim_supported(int head_dim) {
  return head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0;
}

// Launch on `stream` (ignored by the host build). No allocation, no synchronisation. The caller has
// validated the parameters (attention_binding.cpp).
void attention_fwd_launch(const AttnParams& params, Stream stream);
void attention_bwd_launch(const AttnParams& params, Stream stream);

}  // namespace fb
