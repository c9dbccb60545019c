// The per-tile epilogues of the fused LM-head loss (lm_head.cpp): one pass over a tile of
// logits z [rows = tokens, cols = one vocabulary tile] (and of similarity logits s when the
// augmented loss is on), all in fp32 whatever the GEMMs ran in.
//
// Forward: online softmax statistics per token, FlashAttention-style. Per token the running
// max m of z (z/τ's max is m/τ since τ > 0, so it needs no max of its own), the sums of
// exp(z - m) and exp((z - m)/τ), Σ z (label smoothing), z at the target; with the augmented
// loss also the max and sum-exp of s and A = Σ exp(s - m_s)(s - z/τ), rescaled like the
// sum-exp, so that KL = A / Σ exp(s - m_s) - lse(s) + lse(z/τ) at the end. Each partition of the
// vocabulary keeps its own statistics; merge_stats combines them in partition order.
// Backward: dz formed in place from the forward's lse values (stats), plus the column sums that
// become the bias gradient.
#pragma once

#include "activations.h"
#include "storage_cast.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace define_kernels::cpu::lm_head {

constexpr int64_t kMaxTileCols = 512;  // row buffers on the stack hold one tile's columns

// Per-token running statistics of one vocabulary partition, struct of arrays over tokens.
struct Stats {
  float* m;    // max z
  float* l;    // Σ exp(z - m)
  float* sz;   // Σ z
  float* zy;   // z at the target (0 until the target's tile is seen)
  float* lq;   // Σ exp((z - m)/τ)                 (augmented only)
  float* ms;   // max s                              (augmented only)
  float* ls;   // Σ exp(s - ms)                      (augmented only)
  float* a;    // Σ exp(s - ms)(s - z/τ)             (augmented only)
  static constexpr int64_t kCount = 8;  // floats per token (the augmented ones are always laid out)

  static Stats at(float* base, int64_t tokens) {
    return {base, base + tokens, base + 2 * tokens, base + 3 * tokens,
            base + 4 * tokens, base + 5 * tokens, base + 6 * tokens, base + 7 * tokens};
  }
  void reset(int64_t tokens) const {
    std::fill(m, m + tokens, -std::numeric_limits<float>::infinity());
    std::fill(ms, ms + tokens, -std::numeric_limits<float>::infinity());
    for (float* p : {l, sz, zy, lq, ls, a}) std::fill(p, p + tokens, 0.0f);
  }
};

// exp(a - b) for running maxima that may still be -inf (then the old sum is 0 anyway).
inline float rescale(float old_max, float new_max) {
  return old_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(old_max - new_max);
}

template <typename Z>
inline void load_row(float* r, const Z* z, const float* bias, int64_t cols) {
  if (bias) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) r[j] = static_cast<float>(z[j]) + bias[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) r[j] = static_cast<float>(z[j]);
  }
}

// max of r[0, cols). Lane-wise maxima first: gcc keeps a `reduction(max)` over std::max scalar
// (one dependent vmaxss per element, two thirds of the forward epilogue's time when it did).
inline float row_max(const float* r, int64_t cols) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] = lanes[k] > r[j + k] ? lanes[k] : r[j + k];
  }
  for (; j < cols; ++j) lanes[0] = std::max(lanes[0], r[j]);
  float mx = lanes[0];
  for (int64_t k = 1; k < kLanes; ++k) mx = std::max(mx, lanes[k]);
  return mx;
}

// Folds the tile's rows [0, rows) (tokens t0 + i) into st. z and s have row stride ld; s (the
// GEMM u·E_v, not yet divided by τ) is null without the augmented loss; bias points at the tile's first column (or is null); targets are
// global vocabulary ids, v0 the tile's first one.
template <typename Z>
void forward_tile(const Z* z, const Z* s, int64_t ld, const float* bias, int64_t rows, int64_t cols,
                  int64_t v0, const int64_t* targets, int64_t t0, float inv_tau, const Stats& st) {
  float r[kMaxTileCols], q[kMaxTileCols];
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = t0 + i;
    load_row(r, z + i * ld, bias, cols);
    const float m_new = std::max(st.m[t], row_max(r, cols));
    float sum = 0.0f, sum_z = 0.0f, sum_q = 0.0f;
    if (s) {
#pragma omp simd reduction(+ : sum, sum_z, sum_q)
      for (int64_t j = 0; j < cols; ++j) {
        sum += exp_vectorizable(r[j] - m_new);
        sum_q += exp_vectorizable((r[j] - m_new) * inv_tau);
        sum_z += r[j];
      }
    } else {
#pragma omp simd reduction(+ : sum, sum_z)
      for (int64_t j = 0; j < cols; ++j) {
        sum += exp_vectorizable(r[j] - m_new);
        sum_z += r[j];
      }
    }
    const int64_t y = targets[t] - v0;
    if (y >= 0 && y < cols) st.zy[t] = r[y];
    if (s) {
      st.lq[t] = st.lq[t] * (st.m[t] == -std::numeric_limits<float>::infinity()
                                 ? 0.0f : std::exp((st.m[t] - m_new) * inv_tau)) + sum_q;
      const Z* srow = s + i * ld;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) q[j] = static_cast<float>(srow[j]) * inv_tau;
      const float ms_new = std::max(st.ms[t], row_max(q, cols));
      float sum_s = 0.0f, sum_a = 0.0f;
#pragma omp simd reduction(+ : sum_s, sum_a)
      for (int64_t j = 0; j < cols; ++j) {
        const float e = exp_vectorizable(q[j] - ms_new);
        sum_s += e;
        sum_a += e * (q[j] - r[j] * inv_tau);
      }
      const float scale = rescale(st.ms[t], ms_new);
      st.ls[t] = st.ls[t] * scale + sum_s;
      st.a[t] = st.a[t] * scale + sum_a;
      st.ms[t] = ms_new;
    }
    st.l[t] = st.l[t] * rescale(st.m[t], m_new) + sum;
    st.sz[t] += sum_z;
    st.m[t] = m_new;
  }
}

// into = into ⊕ from for tokens [0, tokens): the statistics of the union of both partitions.
inline void merge_stats(const Stats& into, const Stats& from, int64_t tokens, float inv_tau, bool augmented) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float m = std::max(into.m[t], from.m[t]);
    if (augmented) {
      const auto q_scale = [&](float old) {
        return old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp((old - m) * inv_tau);
      };
      into.lq[t] = into.lq[t] * q_scale(into.m[t]) + from.lq[t] * q_scale(from.m[t]);
      const float ms = std::max(into.ms[t], from.ms[t]);
      const float a_scale = rescale(into.ms[t], ms), b_scale = rescale(from.ms[t], ms);
      into.ls[t] = into.ls[t] * a_scale + from.ls[t] * b_scale;
      into.a[t] = into.a[t] * a_scale + from.a[t] * b_scale;
      into.ms[t] = ms;
    }
    into.l[t] = into.l[t] * rescale(into.m[t], m) + from.l[t] * rescale(from.m[t], m);
    into.sz[t] += from.sz[t];
    into.zy[t] += from.zy[t];
    into.m[t] = m;
  }
}

// The loss terms' constants, as the ops take them.
struct Coefs {
  float smoothing, z_loss, kl_coef, inv_tau;
  int64_t vocab;
};

// dz over the tile (rows = tokens t0 + i) into out (row stride ld_out; may be z itself):
// dz = g [(1 + 2 λ lse) p - (1 - ε)[v = y] - ε/V + (α/τ)(q - ỹ)], then col_sums[j] += Σ_i dz_ij
// (the bias gradient, in row order; col_sums is null without a bias). stats rows are (lse,
// lse(z/τ), lse(s)) per token; s is the GEMM u·E_v as in forward_tile.
template <typename Z, typename Out>
void backward_tile(const Z* z, const Z* s, int64_t ld, const float* bias, int64_t rows, int64_t cols,
                   int64_t v0, const int64_t* targets, const float* grad, const float* stats,
                   int64_t t0, const Coefs& c, float* col_sums, Out* out_base, int64_t ld_out) {
  float r[kMaxTileCols];
  const float uniform = c.smoothing / static_cast<float>(c.vocab);
  const float kl_scale = c.kl_coef * c.inv_tau;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = t0 + i;
    const float g = grad[t], lse = stats[3 * t], lse_q = stats[3 * t + 1], lse_s = stats[3 * t + 2];
    const float gp = g * (1.0f + 2.0f * c.z_loss * lse), g_uniform = g * uniform;
    load_row(r, z + i * ld, bias, cols);
    if (s) {
      const Z* srow = s + i * ld;
      const float gk = g * kl_scale;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j)
        r[j] = gp * exp_vectorizable(r[j] - lse) - g_uniform +
               gk * (exp_vectorizable(r[j] * c.inv_tau - lse_q) - exp_vectorizable(static_cast<float>(srow[j]) * c.inv_tau - lse_s));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) r[j] = gp * exp_vectorizable(r[j] - lse) - g_uniform;
    }
    const int64_t y = targets[t] - v0;
    if (y >= 0 && y < cols) r[y] -= g * (1.0f - c.smoothing);
    Out* out = out_base + i * ld_out;
    if (col_sums) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        col_sums[j] += r[j];
        out[j] = to_storage<Out>(r[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) out[j] = to_storage<Out>(r[j]);
    }
  }
}

}  // namespace define_kernels::cpu::lm_head
