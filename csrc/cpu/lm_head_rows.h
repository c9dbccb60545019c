// Row kernels of the LM-head epilogues (lm_head_epilogue.h): exp sums and the logit gradient over
// one fp32 row of a vocabulary tile. Where the build targets AVX-512 they are written with
// intrinsics: gcc vectorizes the portable loops below with exp's clamps as compares, masks and
// blends (about 25 instructions per 16 logits where 12 do) and ends each row's sums with 16
// scalar adds per sum; the epilogues spend most of their time here.
#pragma once

#include "activations.h"

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace define_kernels::cpu::lm_head {

struct RowSums {
  float sum = 0.0f, sum_z = 0.0f, sum_q = 0.0f, sum_a = 0.0f;
};
struct ExpSums {
  float sum = 0.0f, weighted = 0.0f;  // Σ exp(x - shift), Σ exp(x - shift)·x
};

#if defined(__AVX512F__)

namespace avx512 {

// exp with exp_vectorizable's range reduction and polynomial (activations.h), the power of two
// applied by vscalefps. The clamp keeps a NaN (max/min return their second operand then).
inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3843580381944776e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.374138735234737e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166800156235695e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666431725025177e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.999999403953552e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes [0, n) of 16 (n < 16: a row's tail).
inline __mmask16 tail(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

}  // namespace avx512

// Σ exp(r - m), Σ r and, with e (the augmented loss's target row), Σ exp((r - m)·inv_tau), Σ e·r.
inline RowSums row_sums(const float* r, int64_t cols, float m, float inv_tau, const float* e) {
  const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_tau);
  __m512 sum = _mm512_setzero_ps(), sum_z = sum, sum_q = sum, sum_a = sum;
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 k = cols - j >= 16 ? __mmask16(0xFFFF) : avx512::tail(cols - j);
    const __m512 x = _mm512_maskz_loadu_ps(k, r + j), d = _mm512_sub_ps(x, vm);
    sum = _mm512_mask_add_ps(sum, k, sum, avx512::exp(d));
    sum_z = _mm512_add_ps(sum_z, x);
    if (e) {
      sum_q = _mm512_mask_add_ps(sum_q, k, sum_q, avx512::exp(_mm512_mul_ps(d, vt)));
      sum_a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, e + j), x, sum_a);
    }
  }
  RowSums s;
  s.sum = _mm512_reduce_add_ps(sum);
  s.sum_z = _mm512_reduce_add_ps(sum_z);
  if (e) {
    s.sum_q = _mm512_reduce_add_ps(sum_q);
    s.sum_a = _mm512_reduce_add_ps(sum_a);
  }
  return s;
}

// In place: r = gp·exp(r - lse) - gu, plus gk·(exp(r·inv_tau - lse_q) - y) with y (ỹ's row).
inline void row_dz(float* r, int64_t cols, float gp, float gu, float lse, float gk, float inv_tau, float lse_q,
                   const float* y) {
  const __m512 vgp = _mm512_set1_ps(gp), vgu = _mm512_set1_ps(gu), vlse = _mm512_set1_ps(lse);
  const __m512 vgk = _mm512_set1_ps(gk), vt = _mm512_set1_ps(inv_tau), vq = _mm512_set1_ps(lse_q);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 k = cols - j >= 16 ? __mmask16(0xFFFF) : avx512::tail(cols - j);
    const __m512 x = _mm512_maskz_loadu_ps(k, r + j);
    __m512 out = _mm512_fmsub_ps(vgp, avx512::exp(_mm512_sub_ps(x, vlse)), vgu);
    if (y) {
      const __m512 q = avx512::exp(_mm512_fmsub_ps(x, vt, vq));
      out = _mm512_fmadd_ps(vgk, _mm512_sub_ps(q, _mm512_maskz_loadu_ps(k, y + j)), out);
    }
    _mm512_mask_storeu_ps(r + j, k, out);
  }
}

// out = exp(in - shift) (out may be in); returns Σ out and Σ out·in.
inline ExpSums row_exp(float* out, const float* in, int64_t cols, float shift) {
  const __m512 vs = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps(), sum_w = sum;
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 k = cols - j >= 16 ? __mmask16(0xFFFF) : avx512::tail(cols - j);
    const __m512 x = _mm512_maskz_loadu_ps(k, in + j), e = avx512::exp(_mm512_sub_ps(x, vs));
    _mm512_mask_storeu_ps(out + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
    sum_w = _mm512_mask3_fmadd_ps(e, x, sum_w, k);
  }
  return {_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(sum_w)};
}

#else  // the portable loops

inline RowSums row_sums(const float* r, int64_t cols, float m, float inv_tau, const float* e) {
  float sum = 0.0f, sum_z = 0.0f, sum_q = 0.0f, sum_a = 0.0f;
  if (e) {
#pragma omp simd reduction(+ : sum, sum_z, sum_q, sum_a)
    for (int64_t j = 0; j < cols; ++j) {
      sum += exp_vectorizable(r[j] - m);
      sum_q += exp_vectorizable((r[j] - m) * inv_tau);
      sum_z += r[j];
      sum_a += e[j] * r[j];
    }
  } else {
#pragma omp simd reduction(+ : sum, sum_z)
    for (int64_t j = 0; j < cols; ++j) {
      sum += exp_vectorizable(r[j] - m);
      sum_z += r[j];
    }
  }
  return {sum, sum_z, sum_q, sum_a};
}

inline void row_dz(float* r, int64_t cols, float gp, float gu, float lse, float gk, float inv_tau, float lse_q,
                   const float* y) {
  if (y) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j)
      r[j] = gp * exp_vectorizable(r[j] - lse) - gu + gk * (exp_vectorizable(r[j] * inv_tau - lse_q) - y[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) r[j] = gp * exp_vectorizable(r[j] - lse) - gu;
  }
}

inline ExpSums row_exp(float* out, const float* in, int64_t cols, float shift) {
  float sum = 0.0f, sum_w = 0.0f;
#pragma omp simd reduction(+ : sum, sum_w)
  for (int64_t j = 0; j < cols; ++j) {
    const float x = in[j], e = exp_vectorizable(x - shift);
    out[j] = e;
    sum += e;
    sum_w += e * x;
  }
  return {sum, sum_w};
}

#endif

}  // namespace define_kernels::cpu::lm_head
