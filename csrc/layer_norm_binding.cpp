// pybind11 entry points of the LayerNorm kernels (csrc/layer_norm.h): layer_norm_fwd, layer_norm_bwd
// and the backward's workspace query. Conventions: csrc/README.md, "Bindings".
#include <cmath>
#include <cstdint>

#include "common/binding_util.h"
#include "layer_norm.h"

namespace fb {
namespace {

// The fields the forward and backward parameters share: the row count, dropout and the planted fault.
template <class Params>
void set_rows_dropout_fault(Params& p, long long rows, const bind::Dropout& drop, int fault_injection) {
  p.rows = rows;
  p.seed = drop.seed;
  p.dropout = drop.on;
  p.keep_threshold = drop.threshold;
  p.keep_scale = drop.scale;
  p.fault = bind::check_fault_injection(fault_injection);
}

void layer_norm_fwd_py(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual,
                       std::uintptr_t x_bias, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd,
                       std::uintptr_t h, std::uintptr_t seed, long long rows, long long hidden, int dtype_code,
                       int weight_dtype, int bias_dtype, int x_bias_dtype, double eps, double dropout_p,
                       std::uintptr_t stream, int device, int fault_injection) {
  LayerNormFwdParams p{};
  p.hidden = bind::row_op_hidden(rows, hidden);
  FB_CHECK_ARG(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite value >= 0, got ", eps);
  const bind::Dropout drop = bind::dropout(dropout_p, seed);
  p.dtype = dtype("dtype", dtype_code);
  p.weight_dtype = dtype("weight_dtype", weight_dtype);
  p.bias_dtype = dtype("bias_dtype", bias_dtype);
  p.x_bias_dtype = dtype("x_bias_dtype", x_bias_dtype);
  p.x = ptr("x", x, p.dtype, true);
  p.weight = ptr("weight", weight, p.weight_dtype, false);
  p.bias = ptr("bias", bias, p.bias_dtype, false);
  p.residual = ptr("residual", residual, p.dtype, false);
  p.x_bias = ptr("x_bias", x_bias, p.x_bias_dtype, false);
  p.y = mut_ptr("y", y, p.dtype, true);
  p.mean = static_cast<float*>(mut_ptr("mean", mean, 4, true));
  p.rstd = static_cast<float*>(mut_ptr("rstd", rstd, 4, true));
  const bool fused = residual || x_bias || drop.on;
  p.h = mut_ptr("h", h, p.dtype, fused);
  FB_CHECK_ARG(fused || h == 0, "h: expected 0 (None) when nothing is fused, got a pointer");
  p.eps = static_cast<float>(eps);
  set_rows_dropout_fault(p, rows, drop, fault_injection);
  bind::launch(layer_norm_fwd, p, device, stream);
}

void layer_norm_bwd_py(std::uintptr_t dy, std::uintptr_t h, std::uintptr_t weight, std::uintptr_t mean,
                       std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                       std::uintptr_t dresidual, std::uintptr_t dx_bias, std::uintptr_t seed,
                       std::uintptr_t workspace, long long workspace_bytes, long long rows, long long hidden,
                       int dtype_code, int weight_dtype, double dropout_p, std::uintptr_t stream, int device,
                       int fault_injection) {
  LayerNormBwdParams p{};
  p.hidden = bind::row_op_hidden(rows, hidden);
  const bind::Dropout drop = bind::dropout(dropout_p, seed);
  p.dtype = dtype("dtype", dtype_code);
  p.weight_dtype = dtype("weight_dtype", weight_dtype);
  p.dy = ptr("dy", dy, p.dtype, true);
  p.h = ptr("h", h, p.dtype, true);
  p.weight = ptr("weight", weight, p.weight_dtype, false);
  p.mean = static_cast<const float*>(ptr("mean", mean, 4, true));
  p.rstd = static_cast<const float*>(ptr("rstd", rstd, 4, true));
  p.dx = mut_ptr("dx", dx, p.dtype, true);
  p.dweight = static_cast<float*>(mut_ptr("dweight", dweight, 4, false));
  p.dbias = static_cast<float*>(mut_ptr("dbias", dbias, 4, false));
  p.dresidual = mut_ptr("dresidual", dresidual, p.dtype, false);
  p.dx_bias = static_cast<float*>(mut_ptr("dx_bias", dx_bias, 4, false));
  const bool columns = dweight || dbias || dx_bias;
  p.workspace = bind::workspace(workspace, workspace_bytes,
                                layer_norm_bwd_workspace_bytes(rows, p.hidden, columns, dx_bias != 0),
                                "layer_norm_bwd_workspace_bytes");
  set_rows_dropout_fault(p, rows, drop, fault_injection);
  bind::launch(layer_norm_bwd, p, device, stream);
}

}  // namespace

void register_layer_norm(py::module_& m) {
  m.def("layer_norm_fwd", &layer_norm_fwd_py, py::kw_only(), "x"_a, "weight"_a, "bias"_a, "residual"_a, "x_bias"_a,
        "y"_a, "mean"_a, "rstd"_a, "h"_a, "seed"_a, "rows"_a, "hidden"_a, "dtype"_a, "weight_dtype"_a = 0,
        "bias_dtype"_a = 0, "x_bias_dtype"_a = 0, "eps"_a, "dropout_p"_a = 0.0, "stream"_a = 0, "device"_a,
        "fault_injection"_a = 0,
        "LayerNorm forward with the x_bias + dropout + residual fusion (csrc/layer_norm.h); pointers as ints.");
  m.def("layer_norm_bwd", &layer_norm_bwd_py, py::kw_only(), "dy"_a, "h"_a, "weight"_a, "mean"_a, "rstd"_a, "dx"_a,
        "dweight"_a, "dbias"_a, "dresidual"_a, "dx_bias"_a, "seed"_a, "workspace"_a, "workspace_bytes"_a, "rows"_a,
        "hidden"_a, "dtype"_a, "weight_dtype"_a = 0, "dropout_p"_a = 0.0, "stream"_a = 0, "device"_a,
        "fault_injection"_a = 0, "LayerNorm backward; deterministic fp32 dweight/dbias/dx_bias via the workspace.");
  m.def(
      "layer_norm_bwd_workspace_bytes",
      [](long long rows, long long hidden, bool need_columns, bool need_dx_bias) {
        return layer_norm_bwd_workspace_bytes(rows, bind::row_op_hidden(rows, hidden), need_columns, need_dx_bias);
      },
      py::kw_only(), "rows"_a, "hidden"_a, "need_columns"_a, "need_dx_bias"_a,
      "Bytes of fp32 workspace layer_norm_bwd needs (0 when no column sum is asked for).");
}

FB_REGISTER_BINDING(layer_norm, register_layer_norm);

}  // namespace fb
