// pybind11 entry points of the attention kernels: attention_fwd, attention_bwd (csrc/README.md,
// "Bindings": keyword-only, pointers as ints with 0 = None, ValueError naming the argument).
//
// Tensors arrive as a pointer plus (stride_batch, stride_seq, stride_head) in elements; the last
// dim (head_dim) is contiguous. Padded: sizes (batch, seqlen_q, seqlen_k); varlen: cu_seqlens != 0,
// stride_batch = 0 and seqlen_q = seqlen_k = max_seqlen. Only what a raw-pointer API can check is
// checked here: null pointers, alignment to the element size, sizes > 0, strides >= 0, the
// head_dim set. Tensor values (cu_seqlens, masks) are trusted, as on the fast path of fastbert.ops.
// The sliding window arrives as window_left / window_right in keys, -1 = unbounded on that side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "attention.h"
#include "common/binding_util.h"

namespace fb {
namespace {

using Strides3 = std::array<long long, 3>;
using Strides4 = std::array<long long, 4>;

AttnTensor tensor(const char* name, std::uintptr_t ptr, const Strides3& strides, std::size_t align, bool required) {
  AttnTensor t;
  t.ptr = bind::mut_ptr(name, ptr, align, required);
  const char* axes[3] = {"stride_batch", "stride_seq", "stride_head"};
  for (int i = 0; i < 3; ++i)
    FB_CHECK_ARG(strides[i] >= 0, name, " strides: expected ", axes[i], " >= 0, got ", strides[i]);
  t.stride_batch = strides[0];
  t.stride_seq = strides[1];
  t.stride_head = strides[2];
  return t;
}

bool rows_aligned16(const AttnTensor& t, std::size_t elem) {
  const auto ok = [](long long bytes) { return bytes % 16 == 0; };
  return reinterpret_cast<std::uintptr_t>(t.ptr) % 16 == 0 && ok(t.stride_batch * static_cast<long long>(elem)) &&
         ok(t.stride_seq * static_cast<long long>(elem)) && ok(t.stride_head * static_cast<long long>(elem));
}

// Everything attention_fwd and attention_bwd share.
AttnParams common_params(int dtype_code, long long batch, long long num_heads, long long head_dim, long long seqlen_q,
                         long long seqlen_k, std::uintptr_t q, const Strides3& q_strides, std::uintptr_t k,
                         const Strides3& k_strides, std::uintptr_t v, const Strides3& v_strides, std::uintptr_t out,
                         const Strides3& out_strides, std::uintptr_t lse, const std::array<long long, 3>& lse_strides,
                         std::uintptr_t cu_seqlens, std::uintptr_t attention_mask,
                         const std::array<long long, 2>& mask_strides, std::uintptr_t attn_bias, int bias_dtype,
                         const Strides4& bias_strides, std::uintptr_t seed, double dropout_p, double softmax_scale,
                         long long window_left, long long window_right, int fault_injection) {
  AttnParams p;
  p.dtype = bind::dtype("dtype", dtype_code);
  bind::positive("batch", batch);
  bind::positive("num_heads", num_heads);
  bind::positive("seqlen_q", seqlen_q);
  bind::positive("seqlen_k", seqlen_k);
  FB_CHECK_ARG(attention_head_dim_supported(static_cast<int>(head_dim)) && head_dim <= 256,
               "head_dim: expected a multiple of 8 in [8, 256], got ", head_dim);
  FB_CHECK_ARG(batch * num_heads <= 2147483647LL, "batch * num_heads: expected <= 2^31 - 1, got ", batch * num_heads);
  if (cu_seqlens != 0) {  // varlen: both are max_seqlen
    FB_CHECK_ARG(seqlen_q <= (1LL << 30), "max_seqlen: expected <= 2^30, got ", seqlen_q);
  }
  FB_CHECK_ARG(seqlen_q <= (1LL << 30) && seqlen_k <= (1LL << 30), "seqlen_q, seqlen_k: expected <= 2^30, got ",
               seqlen_q, ", ", seqlen_k);
  FB_CHECK_ARG(std::isfinite(softmax_scale), "softmax_scale: expected a finite value, got ", softmax_scale);
  const bind::Dropout drop = bind::dropout(dropout_p, seed);
  const std::size_t elem = dtype_size(p.dtype);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.max_seqlen_q = static_cast<int>(seqlen_q);
  p.max_seqlen_k = static_cast<int>(seqlen_k);
  p.q = tensor("q", q, q_strides, elem, true);
  p.k = tensor("k", k, k_strides, elem, true);
  p.v = tensor("v", v, v_strides, elem, true);
  p.out = tensor("out", out, out_strides, elem, true);
  p.lse = static_cast<float*>(bind::mut_ptr("lse", lse, 4, true));
  FB_CHECK_ARG(lse_strides[0] > 0 && lse_strides[1] >= 0 && lse_strides[2] >= 0,
               "lse strides: expected (plane > 0, batch >= 0, head >= 0), got (", lse_strides[0], ", ", lse_strides[1],
               ", ", lse_strides[2], ")");
  p.lse_stride_plane = lse_strides[0];
  p.lse_stride_batch = lse_strides[1];
  p.lse_stride_head = lse_strides[2];
  p.cu_seqlens = static_cast<const int32_t*>(bind::ptr("cu_seqlens", cu_seqlens, 4, false));
  p.attention_mask = static_cast<const uint8_t*>(bind::ptr("attention_mask", attention_mask, 1, false));
  FB_CHECK_ARG(mask_strides[0] >= 0 && mask_strides[1] >= 0, "attention_mask strides: expected >= 0, got (",
               mask_strides[0], ", ", mask_strides[1], ")");
  p.mask_stride_batch = mask_strides[0];
  p.mask_stride_key = mask_strides[1];
  p.bias_dtype = bind::dtype("bias_dtype", bias_dtype);
  p.attn_bias = bind::ptr("attn_bias", attn_bias, p.bias_dtype, false);
  for (int i = 0; i < 4; ++i) {
    FB_CHECK_ARG(bias_strides[i] >= 0, "attn_bias strides: expected >= 0, got ", bias_strides[i], " at dim ", i);
    p.bias_stride[i] = bias_strides[i];
  }
  FB_CHECK_ARG(p.cu_seqlens == nullptr || (p.attention_mask == nullptr && p.attn_bias == nullptr),
               "cu_seqlens: the varlen layout takes no attention_mask or attn_bias");
  p.seed = drop.seed;
  p.dropout_threshold = drop.threshold;
  p.dropout_scale = drop.scale;
  p.softmax_scale = static_cast<float>(softmax_scale);
  FB_CHECK_ARG(window_left >= -1 && window_right >= -1,
               "window: expected window_left, window_right >= 0 (or -1 = unbounded), got (", window_left, ", ",
               window_right, ")");
  // A bound past the sequence excludes nothing: clamp it there (<= 2^30, see attention.h).
  p.window_left = static_cast<int>(window_left < 0 || window_left > seqlen_q ? seqlen_q : window_left);
  p.window_right = static_cast<int>(window_right < 0 || window_right > seqlen_k ? seqlen_k : window_right);
  p.fault = bind::check_fault_injection(fault_injection) == 1 ? AttnFault::kKeyBoundOffByOne : AttnFault::kNone;
  return p;
}

void attention_fwd_py(std::uintptr_t q, Strides3 q_strides, std::uintptr_t k, Strides3 k_strides, std::uintptr_t v,
                      Strides3 v_strides, std::uintptr_t out, Strides3 out_strides, std::uintptr_t lse,
                      std::array<long long, 3> lse_strides, std::uintptr_t cu_seqlens, std::uintptr_t attention_mask,
                      std::array<long long, 2> mask_strides, std::uintptr_t attn_bias, int bias_dtype,
                      Strides4 bias_strides, std::uintptr_t seed, long long batch, long long num_heads,
                      long long head_dim, long long seqlen_q, long long seqlen_k, int dtype, double dropout_p,
                      double softmax_scale, std::uintptr_t stream, int device, long long window_left,
                      long long window_right, int fault_injection) {
  AttnParams p = common_params(dtype, batch, num_heads, head_dim, seqlen_q, seqlen_k, q, q_strides, k, k_strides, v,
                               v_strides, out, out_strides, lse, lse_strides, cu_seqlens, attention_mask,
                               mask_strides, attn_bias, bias_dtype, bias_strides, seed, dropout_p, softmax_scale,
                               window_left, window_right, fault_injection);
  const std::size_t elem = dtype_size(p.dtype);
  p.aligned16 = rows_aligned16(p.q, elem) && rows_aligned16(p.k, elem) && rows_aligned16(p.v, elem);
  bind::launch(attention_fwd_launch, p, device, stream);
}

void attention_bwd_py(std::uintptr_t dout, Strides3 dout_strides, std::uintptr_t q, Strides3 q_strides,
                      std::uintptr_t k, Strides3 k_strides, std::uintptr_t v, Strides3 v_strides, std::uintptr_t out,
                      Strides3 out_strides, std::uintptr_t lse, std::array<long long, 3> lse_strides,
                      std::uintptr_t dq, Strides3 dq_strides, std::uintptr_t dk, Strides3 dk_strides,
                      std::uintptr_t dv, Strides3 dv_strides, std::uintptr_t dbias, Strides4 dbias_strides,
                      std::uintptr_t cu_seqlens, std::uintptr_t attention_mask, std::array<long long, 2> mask_strides,
                      std::uintptr_t attn_bias, int bias_dtype, Strides4 bias_strides, std::uintptr_t seed,
                      long long batch, long long num_heads, long long head_dim, long long seqlen_q, long long seqlen_k,
                      int dtype, double dropout_p, double softmax_scale, std::uintptr_t stream, int device,
                      long long window_left, long long window_right, int fault_injection) {
  AttnParams p = common_params(dtype, batch, num_heads, head_dim, seqlen_q, seqlen_k, q, q_strides, k, k_strides, v,
                               v_strides, out, out_strides, lse, lse_strides, cu_seqlens, attention_mask,
                               mask_strides, attn_bias, bias_dtype, bias_strides, seed, dropout_p, softmax_scale,
                               window_left, window_right, fault_injection);
  const std::size_t elem = dtype_size(p.dtype);
  p.dout = tensor("dout", dout, dout_strides, elem, true);
  p.dq = tensor("dq", dq, dq_strides, elem, true);
  p.dk = tensor("dk", dk, dk_strides, elem, true);
  p.dv = tensor("dv", dv, dv_strides, elem, true);
  p.dbias = static_cast<float*>(bind::mut_ptr("dbias", dbias, 4, false));
  for (int i = 0; i < 4; ++i) {
    FB_CHECK_ARG(dbias_strides[i] >= 0, "dbias strides: expected >= 0, got ", dbias_strides[i], " at dim ", i);
    p.dbias_stride[i] = dbias_strides[i];
  }
  p.aligned16 = rows_aligned16(p.q, elem) && rows_aligned16(p.k, elem) && rows_aligned16(p.v, elem) &&
                rows_aligned16(p.dout, elem);
  bind::launch(attention_bwd_launch, p, device, stream);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_fwd", &attention_fwd_py, py::kw_only(), "q"_a, "q_strides"_a, "k"_a, "k_strides"_a, "v"_a,
        "v_strides"_a, "out"_a, "out_strides"_a, "lse"_a, "lse_strides"_a, "cu_seqlens"_a, "attention_mask"_a,
        "mask_strides"_a, "attn_bias"_a, "bias_dtype"_a, "bias_strides"_a, "seed"_a, "batch"_a, "num_heads"_a,
        "head_dim"_a, "seqlen_q"_a, "seqlen_k"_a, "dtype"_a, "dropout_p"_a, "softmax_scale"_a,
        "stream"_a, "device"_a, "window_left"_a = -1, "window_right"_a = -1, "fault_injection"_a = 0,
        "Fused masked multi-head attention forward: writes out and lse (csrc/attention.h).");
  m.def("attention_bwd", &attention_bwd_py, py::kw_only(), "dout"_a, "dout_strides"_a, "q"_a, "q_strides"_a, "k"_a,
        "k_strides"_a, "v"_a, "v_strides"_a, "out"_a, "out_strides"_a, "lse"_a, "lse_strides"_a, "dq"_a,
        "dq_strides"_a, "dk"_a, "dk_strides"_a, "dv"_a, "dv_strides"_a, "dbias"_a, "dbias_strides"_a, "cu_seqlens"_a,
        "attention_mask"_a, "mask_strides"_a, "attn_bias"_a, "bias_dtype"_a, "bias_strides"_a, "seed"_a, "batch"_a,
        "num_heads"_a, "head_dim"_a, "seqlen_q"_a, "seqlen_k"_a, "dtype"_a, "dropout_p"_a, "softmax_scale"_a,
        "stream"_a, "device"_a, "window_left"_a = -1, "window_right"_a = -1, "fault_injection"_a = 0,
        "Fused masked multi-head attention backward: writes dq, dk, dv and (dbias != 0) the full fp32 dbias.");
}

FB_REGISTER_BINDING(attention, register_attention);

}  // namespace fb
