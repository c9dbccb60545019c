// Activations and their derivatives over a row in the compute type (float for fp32/bf16/fp16,
// double for fp64), as in PyTorch's CPU kernels (gelu = erf form). The float paths avoid libm
// calls so the loops vectorize (`omp simd`; the JIT build passes the host's vector ISA).
#pragma once

#include <define_kernels/checks.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace define_kernels::cpu {

// erf: the rational approximation used by Eigen and XLA for float (max error a few 1e-7).
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

// exp(x) for float without libm: 2^n p(r), n = round(x log2 e), r = x - n ln2 (two-part ln2),
// p a degree-6 near-minimax polynomial (under 1e-7 relative error when evaluated in float).
// Rounding and 2^n come from one add of 1.5 * 2^23 + 127: that sum's low mantissa bits are
// n + 127, already the biased exponent, so 2^n is a shift of its bits (no float-int conversion
// and no separate rounding instruction). x is clamped to [-87, 88], where the callers need 0 or
// a huge value and n + 127 stays a normal exponent.
inline float exp_vectorizable(float x) {
  constexpr float kShift = 12582912.0f + 127.0f;  // 1.5 * 2^23 + the exponent bias
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.3843580381944776e-3f;
  p = p * r + 8.374138735234737e-3f;
  p = p * r + 4.166800156235695e-2f;
  p = p * r + 1.6666431725025177e-1f;
  p = p * r + 4.999999403953552e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_vectorizable(double x) { return std::exp(x); }

template <typename T>
inline void act_forward_row(int64_t act, T* v, int64_t n) {
  const T half = T(0.5), one = T(1), rsqrt2 = T(M_SQRT1_2);
  switch (act) {
    case kActGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = half * v[i] * (one + erf_vectorizable(v[i] * rsqrt2));
      break;
    case kActRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] > T(0) ? v[i] : T(0);
      break;
    case kActSilu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (one + exp_vectorizable(-v[i]));
      break;
    default:
      break;
  }
}

// g * act'(v) for one element, the activation fixed at compile time so a loop calling it
// vectorizes (fused into the LayerNorm backward).
template <int64_t kAct, typename T>
inline T act_backward_element(T v, T g) {
  if constexpr (kAct == kActGelu) {
    const T cdf = T(0.5) * (T(1) + erf_vectorizable(v * T(M_SQRT1_2)));
    return g * (cdf + v * T(M_2_SQRTPI * M_SQRT1_2 * 0.5) * exp_vectorizable(T(-0.5) * v * v));
  } else if constexpr (kAct == kActRelu) {
    return v > T(0) ? g : T(0);
  } else if constexpr (kAct == kActSilu) {
    const T s = T(1) / (T(1) + exp_vectorizable(-v));
    return g * (s * (T(1) + v * (T(1) - s)));
  } else {
    return g;
  }
}

// Calls f(std::integral_constant<int64_t, act>{}) for the runtime activation code `act`.
template <typename F>
inline void with_act(int64_t act, F&& f) {
  switch (act) {
    case kActGelu: return f(std::integral_constant<int64_t, kActGelu>{});
    case kActRelu: return f(std::integral_constant<int64_t, kActRelu>{});
    case kActSilu: return f(std::integral_constant<int64_t, kActSilu>{});
    default: return f(std::integral_constant<int64_t, kActNone>{});
  }
}

}  // namespace define_kernels::cpu
