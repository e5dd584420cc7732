// Helpers for the pybind11 side (plain C++, compiled by the host compiler in both modules).
//
// Pointers and the stream cross the boundary as Python ints (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); 0 means "None". The binding checks only what a
// raw-pointer API can: null pointers, alignment, sizes > 0, strides >= 0 (fb::ArgError ->
// ValueError), selects the pointers' device (DeviceGuard) and launches on the given stream. It
// never allocates and never synchronises.
//
// It is also every binding file's preamble: pybind11 (as `py`, with its "name"_a literals), the
// binding registry, and the checks below unqualified inside namespace fb (the end of this file).
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "dtype.h"
#include "error.h"
#include "fault.h"
#include "registry.h"
#include "stream.h"

namespace fb::bind {

// A pointer argument: `name` for the error message, `required` = may not be null, `align` in bytes.
inline const void* ptr(const char* name, std::uintptr_t value, std::size_t align, bool required) {
  FB_CHECK_ARG(!required || value != 0, name, ": expected a non-null pointer, got 0 (None)");
  FB_CHECK_ARG(value % align == 0, name, ": expected a pointer aligned to ", align, " bytes, got 0x", std::hex,
               value);
  return reinterpret_cast<const void*>(value);
}
inline void* mut_ptr(const char* name, std::uintptr_t value, std::size_t align, bool required) {
  return const_cast<void*>(ptr(name, value, align, required));
}

// A pointer to elements of `dtype`: aligned to its size.
inline const void* ptr(const char* name, std::uintptr_t value, DType dtype, bool required) {
  return ptr(name, value, dtype_size(dtype), required);
}
inline void* mut_ptr(const char* name, std::uintptr_t value, DType dtype, bool required) {
  return mut_ptr(name, value, dtype_size(dtype), required);
}

inline void positive(const char* name, long long value) {
  FB_CHECK_ARG(value > 0, name, ": expected > 0, got ", value);
}
inline void non_negative(const char* name, long long value) {
  FB_CHECK_ARG(value >= 0, name, ": expected >= 0, got ", value);
}

inline DType dtype(const char* name, int code) {
  FB_CHECK_ARG(code >= 0 && code <= 2, name, ": expected a dtype code 0 (float32), 1 (float16) or 2 (bfloat16), got ",
               code);
  return static_cast<DType>(code);
}

// The sizes of a row-wise op (LayerNorm, GELU): rows, hidden > 0 and hidden <= 2^30; returns hidden
// as the int the kernels index with.
inline int row_op_hidden(long long rows, long long hidden) {
  positive("rows", rows);
  positive("hidden", hidden);
  FB_CHECK_ARG(hidden <= (1LL << 30), "hidden: expected <= 2^30, got ", hidden);
  return static_cast<int>(hidden);
}

// The 16-bit keep threshold for dropout_p, as _philox.dropout_threshold (spec v2): round(p * 2^16)
// with ties to even (Python's round), capped at 2^16 - 1. An element is kept iff its u16 >= this.
inline uint32_t dropout_threshold(double dropout_p) {
  const double t = std::nearbyint(dropout_p * 65536.0);
  return t >= 65535.0 ? 0xffffu : static_cast<uint32_t>(t);
}

// The scale of kept elements, as _philox.dropout_scale: 1 / (1 - rounded p) = 2^16 / (2^16 - t).
inline float dropout_scale(double dropout_p) {
  return static_cast<float>(65536.0 / (65536.0 - static_cast<double>(dropout_threshold(dropout_p))));
}

// The dropout arguments of a fused op as its kernels take them.
struct Dropout {
  bool on;                // dropout_p > 0
  uint32_t threshold;     // dropout_threshold(dropout_p)
  float scale;            // dropout_scale(dropout_p)
  const int64_t* seed;    // the int64 [2] Philox key words when on, else null
};

// `dropout_p` in [0, 1); `seed` (int64 [2], 8-byte aligned) required when dropout_p > 0.
inline Dropout dropout(double dropout_p, std::uintptr_t seed) {
  FB_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected 0 <= dropout_p < 1, got ", dropout_p);
  FB_CHECK_ARG(dropout_p == 0.0 || seed != 0, "seed: expected a pointer to the int64 [2] seed when dropout_p > 0, got 0");
  const void* key = ptr("seed", seed, 8, false);
  const bool on = dropout_p > 0.0;
  return {on, dropout_threshold(dropout_p), dropout_scale(dropout_p), on ? static_cast<const int64_t*>(key) : nullptr};
}

// A backward's fp32 workspace: `bytes` >= `need` (what the `query` entry point returns for the
// call), 16-byte aligned, null only when nothing is needed.
inline float* workspace(std::uintptr_t value, long long bytes, long long need, const char* query) {
  FB_CHECK_ARG(bytes >= need, "workspace_bytes: expected >= ", need, " (", query, "), got ", bytes);
  return static_cast<float*>(mut_ptr("workspace", value, 16, need > 0));
}

inline Stream stream(std::uintptr_t value) { return reinterpret_cast<Stream>(value); }

// The `fault_injection` argument (common/fault.h): >= 0, and 0 unless this is a harness build.
inline int check_fault_injection(int value) {
  FB_CHECK_ARG(value >= 0, "fault_injection: expected >= 0, got ", value);
  FB_CHECK_ARG(kHarnessBuild || value == 0,
               "fault_injection: planted faults are compiled only into the harness builds (fastbert._C_host), got ",
               value);
  return value;
}

// Number of CUDA devices; 0 with `why` set when there is no driver or device (never throws).
inline int device_count(std::string* why = nullptr) {
#ifdef FASTBERT_HOST
  if (why) *why = "host build: kernels run on the CPU";
  return 0;
#else
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = str_cat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    cudaGetLastError();  // clear it so later calls report their own errors
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device";
  return n;
#endif
}

// Makes `device` current for the launch and restores the previous device afterwards. Raises
// fb::RuntimeError (not a crash) when no CUDA device exists. No-op in the host build, which
// expects device == -1 (CPU pointers).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
#ifdef FASTBERT_HOST
    FB_CHECK_ARG(device == -1, "device: the host build runs on CPU pointers (device -1), got ", device);
#else
    std::string why;
    const int n = device_count(&why);
    if (n == 0) throw RuntimeError("fastbert._C: no usable CUDA device (" + why + ")");
    FB_CHECK_ARG(device >= 0 && device < n, "device: expected a CUDA device index in [0, ", n, "), got ", device);
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
#endif
  }
  ~DeviceGuard() {
#ifndef FASTBERT_HOST
    if (prev_ >= 0) cudaSetDevice(prev_);
#endif
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
#ifndef FASTBERT_HOST
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw RuntimeError(str_cat("CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err), " (", what, ")"));
  }
  int prev_ = -1;  // device only: the host build has no current device (clang: -Wunused-private-field)
#endif
};

// The arguments the bias + activation ops' forward and backward share (bias-GELU, GeGLU; their
// Params have x, bias, out, rows, dtype, bias_dtype, tanh_approx and fault): `out` is y
// (forward) or dx (backward). The caller checks the sizes first; the backward then sets dy
// (activation_dy), which the forward leaves null.
template <class Params>
void activation_args(Params& p, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, const char* out_name,
                     long long rows, int dtype_code, int bias_dtype, const std::string& approximate,
                     int fault_injection) {
  FB_CHECK_ARG(approximate == "none" || approximate == "tanh", "approximate: expected 'none' or 'tanh', got '",
               approximate, "'");
  p.dtype = dtype("dtype", dtype_code);
  p.bias_dtype = dtype("bias_dtype", bias_dtype);
  p.x = ptr("x", x, p.dtype, true);
  p.bias = ptr("bias", bias, p.bias_dtype, false);
  p.out = mut_ptr(out_name, out, p.dtype, true);
  p.rows = rows;
  p.tanh_approx = approximate == "tanh";
  p.fault = check_fault_injection(fault_injection);
}

// The backward's dy (required, x's dtype), checked once, after activation_args.
template <class Params>
void activation_dy(Params& p, std::uintptr_t dy) {
  p.dy = ptr("dy", dy, p.dtype, true);
}

// Runs an op's entry point `fn(params, stream)` with `device` current (DeviceGuard) on the stream
// passed from Python: the last step of every binding.
template <class Params>
void launch(void (*fn)(const Params&, Stream), const Params& params, int device, std::uintptr_t stream_value) {
  DeviceGuard guard(device);
  fn(params, stream(stream_value));
}

}  // namespace fb::bind

// The preamble of the binding files (<op>_binding.cpp, module.cpp, harness/harness_binding.cpp).
namespace py = pybind11;
using namespace pybind11::literals;  // NOLINT(google-build-using-namespace): "x"_a in the m.def lists

namespace fb {
using bind::dtype;
using bind::mut_ptr;
using bind::non_negative;
using bind::positive;
using bind::ptr;
}  // namespace fb
