// pybind11 entry points of the GeGLU kernels (csrc/geglu.h): geglu_fwd, geglu_bwd and the
// backward's workspace query. Conventions: csrc/README.md, "Bindings".
#include <cstdint>
#include <string>

#include "common/binding_util.h"
#include "geglu.h"

namespace fb {
namespace {

// The arguments geglu_fwd and geglu_bwd share; `half` = n, the width of y (x is [rows, 2n]).
GegluParams geglu_params(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, const char* out_name,
                         long long rows, long long half, int dtype_code, int bias_dtype,
                         const std::string& approximate, int fault_injection) {
  positive("rows", rows);
  positive("half", half);
  FB_CHECK_ARG(half <= (1LL << 29), "half: expected <= 2^29 (x's width 2 * half <= 2^30), got ", half);
  GegluParams p{};
  p.half = static_cast<int>(half);
  bind::activation_args(p, x, bias, out, out_name, rows, dtype_code, bias_dtype, approximate, fault_injection);
  return p;
}

void geglu_fwd_py(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t y, long long rows, long long half,
                  int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                  int fault_injection) {
  const GegluParams p = geglu_params(x, bias, y, "y", rows, half, dtype_code, bias_dtype, approximate, fault_injection);
  bind::launch(geglu_fwd, p, device, stream);
}

void geglu_bwd_py(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t dx, std::uintptr_t dbias,
                  std::uintptr_t workspace, long long workspace_bytes, long long rows, long long half,
                  int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                  int fault_injection) {
  GegluParams p = geglu_params(x, bias, dx, "dx", rows, half, dtype_code, bias_dtype, approximate, fault_injection);
  bind::activation_dy(p, dy);
  p.dbias = static_cast<float*>(mut_ptr("dbias", dbias, 4, false));
  p.workspace = bind::workspace(workspace, workspace_bytes, geglu_bwd_workspace_bytes(rows, p.half, dbias != 0),
                                "geglu_bwd_workspace_bytes");
  bind::launch(geglu_bwd, p, device, stream);
}

}  // namespace

void register_geglu(py::module_& m) {
  m.def("geglu_fwd", &geglu_fwd_py, py::kw_only(), "x"_a, "bias"_a, "y"_a, "rows"_a, "half"_a, "dtype"_a,
        "bias_dtype"_a = 0, "approximate"_a = "none", "stream"_a = 0, "device"_a, "fault_injection"_a = 0,
        "y[rows, half] = gelu(z[:, :half]) * z[:, half:], z = x + bias, in fp32, stored in x's dtype.");
  m.def("geglu_bwd", &geglu_bwd_py, py::kw_only(), "dy"_a, "x"_a, "bias"_a, "dx"_a, "dbias"_a, "workspace"_a,
        "workspace_bytes"_a, "rows"_a, "half"_a, "dtype"_a, "bias_dtype"_a = 0, "approximate"_a = "none",
        "stream"_a = 0, "device"_a, "fault_injection"_a = 0,
        "dx = [dy * g * gelu'(a), dy * gelu(a)]; dbias = sum_rows(dx) in fp32 (deterministic, via the workspace).");
  m.def(
      "geglu_bwd_workspace_bytes",
      [](long long rows, long long half, bool need_dbias) {
        positive("rows", rows);
        positive("half", half);
        return geglu_bwd_workspace_bytes(rows, static_cast<int>(half), need_dbias);
      },
      py::kw_only(), "rows"_a, "half"_a, "need_dbias"_a, "Bytes of fp32 workspace geglu_bwd needs.");
}

FB_REGISTER_BINDING(geglu, register_geglu);

}  // namespace fb
