// pybind11 module `fastbert._C` (nvcc build), `fastbert._C_host` (host build) or `fastbert._C_harness`
// (the device check's GPU self-test), one source: version(), build_info(), device_count(), then the
// entry points of every binding file linked in (common/registry.h). A private, raw-pointer API:
// see csrc/README.md ("Bindings") for its conventions.
#include <string>
#include <vector>

#include "common/binding_util.h"
#include "common/fault.h"

#ifndef FASTBERT_EXT_NAME
#error "FASTBERT_EXT_NAME (_C, _C_host or _C_harness) is set by CMakeLists.txt"
#endif
#ifndef FASTBERT_VERSION
#error "FASTBERT_VERSION is set by CMakeLists.txt from fastbert/__init__.py"
#endif
#ifndef FASTBERT_CUDA_ARCHS
#define FASTBERT_CUDA_ARCHS ""
#endif

namespace fb {

std::vector<Binding>& bindings() {
  static std::vector<Binding> all;  // a function-local static: safe from static-initialisation order
  return all;
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
        bool attention = false;
        py::list bound;
        for (const fb::Binding& b : fb::bindings()) {
          bound.append(b.name);
          attention = attention || std::string(b.name) == "attention";
        }
        d["attention"] = attention;
        d["bindings"] = bound;
        d["harness"] = fb::kHarnessBuild;
        d["compiler"] = __VERSION__;
        return d;
      },
      "Build facts: version, host build or not, CUDA runtime version, archs, the bindings linked in, "
      "attention among them, harness build (planted faults) or not.");
  m.def(
      "device_count",
      [] {
        std::string why;
        const int n = fb::bind::device_count(&why);
        return py::make_tuple(n, n > 0 ? std::string() : why);
      },
      "(number of CUDA devices, reason when 0); never raises.");
  for (const fb::Binding& b : fb::bindings()) b.define(m);
}
