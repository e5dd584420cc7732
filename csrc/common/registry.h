// The pieces of the pybind11 module, each registered by its owner's translation unit.
// bindings.cpp defines PYBIND11_MODULE(_C / _C_host) and calls every register_* function;
// register_attention lives in csrc/attention_binding.cpp (compiled only when it exists:
// CMake defines FASTBERT_HAS_ATTENTION then).
#pragma once

#include <pybind11/pybind11.h>

namespace fb {

void register_layer_norm(pybind11::module_& m);
void register_gelu(pybind11::module_& m);
#ifdef FASTBERT_HAS_ATTENTION
void register_attention(pybind11::module_& m);
#endif

}  // namespace fb
