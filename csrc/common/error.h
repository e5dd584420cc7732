// Errors shared by the kernels' host-side launchers and the bindings (plain C++, both builds).
//
// pybind11 maps std::invalid_argument to ValueError and std::runtime_error to RuntimeError, so
// bad arguments raise ValueError and CUDA / execution-model failures raise RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace fb {

// Bad input at the binding boundary (null pointer, misalignment, size <= 0): ValueError.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A failed CUDA call or a fault found by the host execution model: RuntimeError.
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Parts>
std::string str_cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

}  // namespace fb

// FB_CHECK_ARG(cond, "x: expected ..., got ", value): throws fb::ArgError naming the argument.
#define FB_CHECK_ARG(cond, ...)                           \
  do {                                                    \
    if (!(cond)) throw ::fb::ArgError(::fb::str_cat(__VA_ARGS__)); \
  } while (0)
