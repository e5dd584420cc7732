// The pieces of a pybind11 module. Each binding file (<op>_binding.cpp, harness/harness_binding.cpp)
// registers the function that defines its entry points with FB_REGISTER_BINDING; module.cpp's
// PYBIND11_MODULE calls every registered one. A module therefore binds exactly the binding files
// CMakeLists.txt links into it (fastbert._C: the ops; fastbert._C_host: the ops and the harness;
// fastbert._C_harness: the harness), with no #ifdef per op.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace fb {

struct Binding {
  const char* name;                     // the op ("attention", ...) or "harness"
  void (*define)(pybind11::module_& m);  // defines its m.def(...) entry points
};

// Every binding linked into this module (module.cpp; filled before the module initialises).
std::vector<Binding>& bindings();

struct RegisterBinding {
  RegisterBinding(const char* name, void (*define)(pybind11::module_& m)) { bindings().push_back({name, define}); }
};

}  // namespace fb

// At namespace scope of a binding file: FB_REGISTER_BINDING(layer_norm, register_layer_norm);
#define FB_REGISTER_BINDING(name, define) static const ::fb::RegisterBinding fb_register_binding_##name(#name, define)
