// pybind11 entry points of the rotary kernels (csrc/rotary.h): rotary_fwd (rotate by theta) and
// rotary_bwd (by -theta: the gradient), one kernel. Conventions: csrc/README.md, "Bindings".
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "common/binding_util.h"
#include "rotary.h"

namespace fb {
namespace {

using Strides = std::array<long long, 3>;

// The argument names of one direction: forward (q, k -> q_out, k_out) or backward (dq_out, dk_out -> dq, dk).
struct Names {
  const char *q, *k, *q_out, *k_out;
};
constexpr Names kForward{"q", "k", "q_out", "k_out"}, kBackward{"dq_out", "dk_out", "dq", "dk"};

RotaryTensor tensor(const char* x_name, const char* out_name, std::uintptr_t x, std::uintptr_t out, int heads,
                    const Strides& x_stride, const Strides& out_stride, std::size_t align) {
  RotaryTensor t{};
  t.heads = heads;
  t.x = ptr(x_name, x, align, heads > 0);
  t.out = mut_ptr(out_name, out, align, heads > 0);
  static const char* dims[3] = {"batch", "seq", "head"};
  for (int d = 0; d < 3; ++d) {
    FB_CHECK_ARG(x_stride[d] >= 0, x_name, "_strides: expected >= 0 (", dims[d], "), got ", x_stride[d]);
    FB_CHECK_ARG(out_stride[d] >= 0, out_name, "_strides: expected >= 0 (", dims[d], "), got ", out_stride[d]);
    t.x_stride[d] = x_stride[d];
    t.out_stride[d] = out_stride[d];
  }
  return t;
}

// rotary_fwd (kInverse false) and rotary_bwd (true: rotate by -theta), one signature; the
// backward's q, k, q_out, k_out are the Python arguments dq_out, dk_out, dq, dk (register_rotary).
template <bool kInverse>
void rotary_py(std::uintptr_t q, std::uintptr_t k, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t positions,
               std::uintptr_t q_out, std::uintptr_t k_out, long long batch, long long seqlen, long long q_heads,
               long long k_heads, long long head_dim, long long rotary_dim, const Strides& q_strides,
               const Strides& k_strides, const Strides& q_out_strides, const Strides& k_out_strides,
               const std::array<long long, 2>& positions_strides, int dtype_code, bool interleaved,
               std::uintptr_t stream, int device, int fault_injection) {
  const Names& n = kInverse ? kBackward : kForward;
  positive("batch", batch);
  positive("seqlen", seqlen);
  non_negative("q_heads", q_heads);
  non_negative("k_heads", k_heads);
  FB_CHECK_ARG(q_heads + k_heads > 0, "q_heads, k_heads: expected at least one head, got 0 and 0");
  FB_CHECK_ARG(q_heads <= (1 << 20) && k_heads <= (1 << 20), "q_heads, k_heads: expected <= 2^20, got ", q_heads,
               " and ", k_heads);
  positive("head_dim", head_dim);
  FB_CHECK_ARG(head_dim <= (1 << 20), "head_dim: expected <= 2^20, got ", head_dim);
  FB_CHECK_ARG(rotary_dim >= 2 && rotary_dim <= head_dim && rotary_dim % 2 == 0,
               "rotary_dim: expected an even number in [2, head_dim = ", head_dim, "], got ", rotary_dim);
  non_negative("positions_strides[0]", positions_strides[0]);
  non_negative("positions_strides[1]", positions_strides[1]);
  RotaryParams p{};
  p.dtype = dtype("dtype", dtype_code);
  const std::size_t a = dtype_size(p.dtype);
  p.q = tensor(n.q, n.q_out, q, q_out, static_cast<int>(q_heads), q_strides, q_out_strides, a);
  p.k = tensor(n.k, n.k_out, k, k_out, static_cast<int>(k_heads), k_strides, k_out_strides, a);
  p.cos = static_cast<const float*>(ptr("cos", cos, 4, true));
  p.sin = static_cast<const float*>(ptr("sin", sin, 4, true));
  p.positions = static_cast<const int64_t*>(ptr("positions", positions, 8, true));
  p.pos_stride[0] = positions_strides[0];
  p.pos_stride[1] = positions_strides[1];
  p.batch = batch;
  p.seqlen = seqlen;
  p.head_dim = static_cast<int>(head_dim);
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.interleaved = interleaved;
  p.inverse = kInverse;
  p.fault = bind::check_fault_injection(fault_injection);
  bind::launch(rotary, p, device, stream);
}

}  // namespace

void register_rotary(py::module_& m) {
  m.def("rotary_fwd", &rotary_py<false>,
        py::kw_only(), "q"_a, "k"_a, "cos"_a, "sin"_a, "positions"_a, "q_out"_a, "k_out"_a, "batch"_a, "seqlen"_a,
        "q_heads"_a, "k_heads"_a, "head_dim"_a, "rotary_dim"_a, "q_strides"_a, "k_strides"_a, "q_out_strides"_a,
        "k_out_strides"_a, "positions_strides"_a, "dtype"_a, "interleaved"_a = false, "stream"_a = 0, "device"_a,
        "fault_injection"_a = 0,
        "q_out, k_out = R(theta) q, R(theta) k on the first rotary_dim features (fp32 math); strides in elements "
        "(batch, seq, head); the outputs may alias the inputs.");
  m.def("rotary_bwd", &rotary_py<true>,
        py::kw_only(), "dq_out"_a, "dk_out"_a, "cos"_a, "sin"_a, "positions"_a, "dq"_a, "dk"_a, "batch"_a,
        "seqlen"_a, "q_heads"_a, "k_heads"_a, "head_dim"_a, "rotary_dim"_a, "dq_out_strides"_a, "dk_out_strides"_a,
        "dq_strides"_a, "dk_strides"_a, "positions_strides"_a, "dtype"_a, "interleaved"_a = false, "stream"_a = 0,
        "device"_a, "fault_injection"_a = 0,
        "dq, dk = R(-theta) dq_out, R(-theta) dk_out (the gradient of rotary_fwd); the outputs may alias the inputs.");
}

FB_REGISTER_BINDING(rotary, register_rotary);

}  // namespace fb
