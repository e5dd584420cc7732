// pybind11 entry points of the bias-GELU kernels (csrc/gelu.h): gelu_fwd, gelu_bwd and the
// backward's workspace query. Conventions: csrc/README.md, "Bindings".
#include <cstdint>
#include <string>

#include "common/binding_util.h"
#include "gelu.h"

namespace fb {
namespace {

// The arguments gelu_fwd and gelu_bwd share; `out` is y (forward) or dx (backward).
GeluParams gelu_params(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, const char* out_name,
                       long long rows, long long hidden, int dtype_code, int bias_dtype,
                       const std::string& approximate, int fault_injection) {
  GeluParams p{};
  p.hidden = bind::row_op_hidden(rows, hidden);
  bind::activation_args(p, x, bias, out, out_name, rows, dtype_code, bias_dtype, approximate, fault_injection);
  return p;
}

void gelu_fwd_py(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t y, long long rows, long long hidden,
                 int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                 int fault_injection) {
  const GeluParams p = gelu_params(x, bias, y, "y", rows, hidden, dtype_code, bias_dtype, approximate, fault_injection);
  bind::launch(gelu_fwd, p, device, stream);
}

void gelu_bwd_py(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t dx, std::uintptr_t dbias,
                 std::uintptr_t workspace, long long workspace_bytes, long long rows, long long hidden,
                 int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                 int fault_injection) {
  GeluParams p = gelu_params(x, bias, dx, "dx", rows, hidden, dtype_code, bias_dtype, approximate, fault_injection);
  bind::activation_dy(p, dy);
  p.dbias = static_cast<float*>(mut_ptr("dbias", dbias, 4, false));
  p.workspace = bind::workspace(workspace, workspace_bytes, gelu_bwd_workspace_bytes(rows, p.hidden, dbias != 0),
                                "gelu_bwd_workspace_bytes");
  bind::launch(gelu_bwd, p, device, stream);
}

}  // namespace

void register_gelu(py::module_& m) {
  m.def("gelu_fwd", &gelu_fwd_py, py::kw_only(), "x"_a, "bias"_a, "y"_a, "rows"_a, "hidden"_a, "dtype"_a,
        "bias_dtype"_a = 0, "approximate"_a = "none", "stream"_a = 0, "device"_a, "fault_injection"_a = 0,
        "y = gelu(x + bias) in fp32, stored in x's dtype.");
  m.def("gelu_bwd", &gelu_bwd_py, py::kw_only(), "dy"_a, "x"_a, "bias"_a, "dx"_a, "dbias"_a, "workspace"_a,
        "workspace_bytes"_a, "rows"_a, "hidden"_a, "dtype"_a, "bias_dtype"_a = 0, "approximate"_a = "none",
        "stream"_a = 0, "device"_a, "fault_injection"_a = 0,
        "dx = dy * gelu'(x + bias); dbias = sum_rows(dx) in fp32 (deterministic, via the workspace).");
  m.def(
      "gelu_bwd_workspace_bytes",
      [](long long rows, long long hidden, bool need_dbias) {
        return gelu_bwd_workspace_bytes(rows, bind::row_op_hidden(rows, hidden), need_dbias);
      },
      py::kw_only(), "rows"_a, "hidden"_a, "need_dbias"_a, "Bytes of fp32 workspace gelu_bwd needs.");
}

FB_REGISTER_BINDING(gelu, register_gelu);

}  // namespace fb
