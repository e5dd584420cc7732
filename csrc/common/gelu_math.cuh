// GELU and its derivative in fp32 (Hendrycks & Gimpel 2016), shared by the bias-GELU
// (csrc/gelu.cu) and GeGLU (csrc/geglu.cu) kernels (both builds):
//   erf:  gelu(z) = z * Phi(z) = 0.5 z erfc(-z / sqrt(2)),   gelu'(z) = Phi(z) + z phi(z)
//   tanh: gelu(z) = 0.5 z (1 + tanh(u)) = z sigmoid(2u),  u = k (z + 0.044715 z^3),  k = sqrt(2 / pi)
// Phi(z) = 0.5 erfc(-z / sqrt(2)) and 0.5 (1 + tanh(u)) = sigmoid(2u) give the same values without
// the cancellation of 1 + erf / 1 + tanh that loses every digit in fp32 for z < -4 (as the
// reference computes them).
#pragma once

#include "platform.cuh"

namespace fb {
namespace gelu_detail {
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kCubic = 0.044715f;
}  // namespace gelu_detail

FB_DEVICE float gelu_sigmoid_2u(float z) {
  using namespace gelu_detail;
  const float u = kSqrt2OverPi * (z + kCubic * z * z * z);
  return 1.0f / (1.0f + expf(-2.0f * u));
}

FB_DEVICE float gelu(float z, bool tanh_approx) {
  if (tanh_approx) return z * gelu_sigmoid_2u(z);
  return 0.5f * z * erfcf(-z * gelu_detail::kInvSqrt2);
}

FB_DEVICE float gelu_grad(float z, bool tanh_approx) {
  using namespace gelu_detail;
  if (tanh_approx) {  // d/dz z s = s + 2 z s (1 - s) u',  s = sigmoid(2u)
    const float s = gelu_sigmoid_2u(z);
    return s + 2.0f * z * s * (1.0f - s) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * z * z);
  }
  return 0.5f * erfcf(-z * kInvSqrt2) + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
}

// Both at once (the GeGLU backward needs gelu(z) and gelu'(z)): one erfc / one sigmoid, the
// same float operations as gelu() and gelu_grad(), so the values are identical.
FB_DEVICE void gelu_and_grad(float z, bool tanh_approx, float& g, float& dg) {
  using namespace gelu_detail;
  if (tanh_approx) {
    const float s = gelu_sigmoid_2u(z);
    g = z * s;
    dg = s + 2.0f * z * s * (1.0f - s) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * z * z);
    return;
  }
  const float c = erfcf(-z * kInvSqrt2);
  g = 0.5f * z * c;
  dg = 0.5f * c + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
}

}  // namespace fb
