// pybind11 module `fastbert._C` (nvcc build) or `fastbert._C_host` (host build), one source.
// A private, raw-pointer API: see csrc/README.md ("Bindings") for its conventions.
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "common/binding_util.h"
#include "common/registry.h"
#include "gelu.h"
#include "layer_norm.h"

#ifndef FASTBERT_EXT_NAME
#error "FASTBERT_EXT_NAME (_C or _C_host) is set by CMakeLists.txt"
#endif
#ifndef FASTBERT_VERSION
#error "FASTBERT_VERSION is set by CMakeLists.txt from fastbert/__init__.py"
#endif
#ifndef FASTBERT_CUDA_ARCHS
#define FASTBERT_CUDA_ARCHS ""
#endif

namespace fb {
void harness(int mode, int* out, unsigned grid, unsigned block, std::size_t smem_bytes, void* stream);
}

namespace py = pybind11;
using namespace py::literals;

namespace fb {
namespace {

using bind::dtype;
using bind::mut_ptr;
using bind::positive;
using bind::ptr;

std::size_t align_of(DType t) { return dtype_size(t); }

void check_dropout(double dropout_p, std::uintptr_t seed) {
  FB_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected 0 <= dropout_p < 1, got ", dropout_p);
  FB_CHECK_ARG(dropout_p == 0.0 || seed != 0, "seed: expected a pointer to the int64 [2] seed when dropout_p > 0, got 0");
  FB_CHECK_ARG(seed % 8 == 0, "seed: expected a pointer aligned to 8 bytes, got 0x", std::hex, seed);
}

void layer_norm_fwd_py(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual,
                       std::uintptr_t x_bias, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd,
                       std::uintptr_t h, std::uintptr_t seed, long long rows, long long hidden, int dtype_code,
                       int weight_dtype, int bias_dtype, int x_bias_dtype, double eps, double dropout_p,
                       std::uintptr_t stream, int device, int fault_injection) {
  positive("rows", rows);
  positive("hidden", hidden);
  FB_CHECK_ARG(hidden <= (1LL << 30), "hidden: expected <= 2^30, got ", hidden);
  FB_CHECK_ARG(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite value >= 0, got ", eps);
  check_dropout(dropout_p, seed);
  LayerNormFwdParams p{};
  p.dtype = dtype("dtype", dtype_code);
  p.weight_dtype = dtype("weight_dtype", weight_dtype);
  p.bias_dtype = dtype("bias_dtype", bias_dtype);
  p.x_bias_dtype = dtype("x_bias_dtype", x_bias_dtype);
  const std::size_t a = align_of(p.dtype);
  p.x = ptr("x", x, a, true);
  p.weight = ptr("weight", weight, align_of(p.weight_dtype), false);
  p.bias = ptr("bias", bias, align_of(p.bias_dtype), false);
  p.residual = ptr("residual", residual, a, false);
  p.x_bias = ptr("x_bias", x_bias, align_of(p.x_bias_dtype), false);
  p.y = mut_ptr("y", y, a, true);
  p.mean = static_cast<float*>(mut_ptr("mean", mean, 4, true));
  p.rstd = static_cast<float*>(mut_ptr("rstd", rstd, 4, true));
  const bool fused = residual || x_bias || dropout_p > 0.0;
  p.h = mut_ptr("h", h, a, fused);
  FB_CHECK_ARG(fused || h == 0, "h: expected 0 (None) when nothing is fused, got a pointer");
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.rows = rows;
  p.hidden = static_cast<int>(hidden);
  p.eps = static_cast<float>(eps);
  p.dropout = dropout_p > 0.0;
  p.keep_threshold = bind::dropout_threshold(dropout_p);
  p.keep_scale = bind::dropout_scale(dropout_p);
  p.fault = fault_injection;
  bind::DeviceGuard guard(device);
  layer_norm_fwd(p, bind::stream(stream));
}

void layer_norm_bwd_py(std::uintptr_t dy, std::uintptr_t h, std::uintptr_t weight, std::uintptr_t mean,
                       std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                       std::uintptr_t dresidual, std::uintptr_t dx_bias, std::uintptr_t seed,
                       std::uintptr_t workspace, long long workspace_bytes, long long rows, long long hidden,
                       int dtype_code, int weight_dtype, double dropout_p, std::uintptr_t stream, int device,
                       int fault_injection) {
  positive("rows", rows);
  positive("hidden", hidden);
  FB_CHECK_ARG(hidden <= (1LL << 30), "hidden: expected <= 2^30, got ", hidden);
  check_dropout(dropout_p, seed);
  LayerNormBwdParams p{};
  p.dtype = dtype("dtype", dtype_code);
  p.weight_dtype = dtype("weight_dtype", weight_dtype);
  const std::size_t a = align_of(p.dtype);
  p.dy = ptr("dy", dy, a, true);
  p.h = ptr("h", h, a, true);
  p.weight = ptr("weight", weight, align_of(p.weight_dtype), false);
  p.mean = static_cast<const float*>(ptr("mean", mean, 4, true));
  p.rstd = static_cast<const float*>(ptr("rstd", rstd, 4, true));
  p.dx = mut_ptr("dx", dx, a, true);
  p.dweight = static_cast<float*>(mut_ptr("dweight", dweight, 4, false));
  p.dbias = static_cast<float*>(mut_ptr("dbias", dbias, 4, false));
  p.dresidual = mut_ptr("dresidual", dresidual, a, false);
  p.dx_bias = static_cast<float*>(mut_ptr("dx_bias", dx_bias, 4, false));
  const bool columns = dweight || dbias || dx_bias;
  const long long need = layer_norm_bwd_workspace_bytes(rows, static_cast<int>(hidden), columns, dx_bias != 0);
  FB_CHECK_ARG(workspace_bytes >= need, "workspace_bytes: expected >= ", need, " (layer_norm_bwd_workspace_bytes), got ",
               workspace_bytes);
  p.workspace = static_cast<float*>(mut_ptr("workspace", workspace, 16, need > 0));
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.rows = rows;
  p.hidden = static_cast<int>(hidden);
  p.dropout = dropout_p > 0.0;
  p.keep_threshold = bind::dropout_threshold(dropout_p);
  p.keep_scale = bind::dropout_scale(dropout_p);
  p.fault = fault_injection;
  bind::DeviceGuard guard(device);
  layer_norm_bwd(p, bind::stream(stream));
}

GeluParams gelu_params(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out,
                       const char* out_name, long long rows, long long hidden, int dtype_code, int bias_dtype,
                       const std::string& approximate, int fault_injection) {
  positive("rows", rows);
  positive("hidden", hidden);
  FB_CHECK_ARG(hidden <= (1LL << 30), "hidden: expected <= 2^30, got ", hidden);
  FB_CHECK_ARG(approximate == "none" || approximate == "tanh", "approximate: expected 'none' or 'tanh', got '",
               approximate, "'");
  GeluParams p{};
  p.dtype = dtype("dtype", dtype_code);
  p.bias_dtype = dtype("bias_dtype", bias_dtype);
  const std::size_t a = align_of(p.dtype);
  p.x = ptr("x", x, a, true);
  p.bias = ptr("bias", bias, align_of(p.bias_dtype), false);
  p.out = mut_ptr(out_name, out, a, true);
  p.dy = dy ? ptr("dy", dy, a, true) : nullptr;
  p.rows = rows;
  p.hidden = static_cast<int>(hidden);
  p.tanh_approx = approximate == "tanh";
  p.fault = fault_injection;
  return p;
}

void gelu_fwd_py(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t y, long long rows, long long hidden,
                 int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                 int fault_injection) {
  GeluParams p = gelu_params(0, x, bias, y, "y", rows, hidden, dtype_code, bias_dtype, approximate, fault_injection);
  bind::DeviceGuard guard(device);
  gelu_fwd(p, bind::stream(stream));
}

void gelu_bwd_py(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t dx, std::uintptr_t dbias,
                 std::uintptr_t workspace, long long workspace_bytes, long long rows, long long hidden,
                 int dtype_code, int bias_dtype, const std::string& approximate, std::uintptr_t stream, int device,
                 int fault_injection) {
  FB_CHECK_ARG(dy != 0, "dy: expected a non-null pointer, got 0 (None)");
  GeluParams p = gelu_params(dy, x, bias, dx, "dx", rows, hidden, dtype_code, bias_dtype, approximate, fault_injection);
  p.dbias = static_cast<float*>(mut_ptr("dbias", dbias, 4, false));
  const long long need = gelu_bwd_workspace_bytes(rows, static_cast<int>(hidden), dbias != 0);
  FB_CHECK_ARG(workspace_bytes >= need, "workspace_bytes: expected >= ", need, " (gelu_bwd_workspace_bytes), got ",
               workspace_bytes);
  p.workspace = static_cast<float*>(mut_ptr("workspace", workspace, 16, need > 0));
  bind::DeviceGuard guard(device);
  gelu_bwd(p, bind::stream(stream));
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
        positive("rows", rows);
        positive("hidden", hidden);
        return layer_norm_bwd_workspace_bytes(rows, static_cast<int>(hidden), need_columns, need_dx_bias);
      },
      py::kw_only(), "rows"_a, "hidden"_a, "need_columns"_a, "need_dx_bias"_a,
      "Bytes of fp32 workspace layer_norm_bwd needs (0 when no column sum is asked for).");
}

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
        positive("rows", rows);
        positive("hidden", hidden);
        return gelu_bwd_workspace_bytes(rows, static_cast<int>(hidden), need_dbias);
      },
      py::kw_only(), "rows"_a, "hidden"_a, "need_dbias"_a, "Bytes of fp32 workspace gelu_bwd needs.");
}

}  // namespace fb

PYBIND11_MODULE(FASTBERT_EXT_NAME, m) {
  m.doc() = "fastbert CUDA C++ kernels (private raw-pointer API; see csrc/README.md)";
  m.def("version", [] { return std::string(FASTBERT_VERSION); }, "The fastbert version this module was built for.");
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["version"] = FASTBERT_VERSION;
#ifdef FASTBERT_HOST
        d["host"] = true;
        d["cuda_version"] = py::none();
        d["archs"] = py::list();
#else
        d["host"] = false;
        d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
        py::list archs;
        std::string s = FASTBERT_CUDA_ARCHS;
        std::size_t start = 0;
        while (start <= s.size()) {
          const std::size_t end = s.find(';', start);
          const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
          if (!item.empty()) archs.append(item);
          if (end == std::string::npos) break;
          start = end + 1;
        }
        d["archs"] = archs;
#endif
#ifdef FASTBERT_HAS_ATTENTION
        d["attention"] = true;
#else
        d["attention"] = false;
#endif
        d["compiler"] = __VERSION__;
        return d;
      },
      "Build facts: version, host build or not, CUDA runtime version, archs, attention compiled in.");
  m.def(
      "device_count",
      [] {
        std::string why;
        const int n = fb::bind::device_count(&why);
        return py::make_tuple(n, n > 0 ? std::string() : why);
      },
      "(number of CUDA devices, reason when 0); never raises.");
  m.def(
      "_harness",
      [](int mode, std::uintptr_t out, unsigned grid, unsigned block, std::size_t smem_bytes, std::uintptr_t stream,
         int device) {
        int* o = static_cast<int*>(fb::bind::mut_ptr("out", out, 4, true));
        fb::bind::positive("grid", grid);
        fb::bind::positive("block", block);
        fb::bind::DeviceGuard guard(device);
        fb::harness(mode, o, grid, block, smem_bytes, fb::bind::stream(stream));
      },
      py::kw_only(), "mode"_a, "out"_a, "grid"_a, "block"_a, "smem_bytes"_a = 0, "stream"_a = 0, "device"_a,
      "Execution-model self-test kernels (tests/test_cuda_harness.py); out: int32 [grid * block, 4].");
  fb::register_layer_norm(m);
  fb::register_gelu(m);
#ifdef FASTBERT_HAS_ATTENTION
  fb::register_attention(m);
#endif
}
