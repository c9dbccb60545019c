// Activations and their derivatives over a row, as in PyTorch's CPU kernels (gelu = erf form).
#pragma once

#include <define_kernels/checks.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace define_kernels::cpu {

// erf without a libm call, so the forward GELU loop vectorizes: the rational approximation used
// by Eigen and XLA for float (max error a few 1e-7; erf(4) rounds to 1 in float).
inline float erf_vectorizable(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}
inline double erf_vectorizable(double x) { return std::erf(x); }  // fp64 (gradcheck): exact

template <typename T>
inline void act_forward_row(int64_t act, T* v, int64_t n) {
  const T half = T(0.5), one = T(1), rsqrt2 = T(M_SQRT1_2);
  switch (act) {
    case kActGelu:
      for (int64_t i = 0; i < n; ++i) v[i] = half * v[i] * (one + erf_vectorizable(v[i] * rsqrt2));
      break;
    case kActRelu:
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] > T(0) ? v[i] : T(0);
      break;
    case kActSilu:
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (one + std::exp(-v[i]));
      break;
    default:
      break;
  }
}

// g[i] *= act'(pre[i]) where pre is the activation's input.
template <typename T>
inline void act_backward_row(int64_t act, const T* pre, T* g, int64_t n) {
  const T half = T(0.5), one = T(1), rsqrt2 = T(M_SQRT1_2);
  const T pdf_scale = T(M_2_SQRTPI * M_SQRT1_2 * 0.5);  // 1 / sqrt(2 pi)
  switch (act) {
    case kActGelu:
      for (int64_t i = 0; i < n; ++i) {
        const T v = pre[i];
        const T cdf = half * (one + erf_vectorizable(v * rsqrt2));
        g[i] *= cdf + v * pdf_scale * std::exp(-half * v * v);
      }
      break;
    case kActRelu:
      for (int64_t i = 0; i < n; ++i) g[i] = pre[i] > T(0) ? g[i] : T(0);
      break;
    case kActSilu:
      for (int64_t i = 0; i < n; ++i) {
        const T s = one / (one + std::exp(-pre[i]));
        g[i] *= s * (one + pre[i] * (one - s));
      }
      break;
    default:
      break;
  }
}

}  // namespace define_kernels::cpu
