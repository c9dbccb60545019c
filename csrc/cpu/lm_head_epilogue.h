// The per-tile epilogues of the fused LM-head loss (lm_head.cpp): one pass over a tile of
// logits z [rows = tokens, cols = one vocabulary tile], all in fp32 whatever the GEMMs ran in.
//
// Forward: online softmax statistics per token, FlashAttention-style. Per token a running
// reference m (m ≤ max z ≤ m + kSlack over the tiles seen; see forward_tile), the sums of
// exp(z - m) and exp((z - m)/τ), Σ z (label smoothing), z at the target.
// The augmented loss's target distribution ỹ = softmax(s/τ), s = E_y Eᵀ, depends on the target
// alone, so it is formed once per *distinct* target and tile (target_forward_tile: running max
// ms, Σ exp(s/τ - ms) and Σ exp(s/τ - ms) s/τ) and read by every token with that target; per token
// only a = Σ exp(s/τ - ms) z/τ is summed, rescaled with its target's max. At the end
// KL = (Σ ỹ s/τ - Σ ỹ z/τ) - lse(s/τ) + lse(z/τ). Each partition of the vocabulary keeps its own
// statistics; merge_stats combines them in partition order.
// Backward: dz formed in place from the forward's lse values (stats), with ỹ again formed per
// distinct target (target_backward_tile), plus the column sums that become the bias gradient.
#pragma once

#include "lm_head_rows.h"
#include "storage_cast.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace define_kernels::cpu::lm_head {

constexpr int64_t kMaxTileCols = 512;  // row buffers on the stack hold one tile's columns

// The distinct targets of a call (ascending) and, per token, the index of its target among them.
struct DistinctTargets {
  std::vector<int64_t> ids, of_token;

  DistinctTargets(const int64_t* targets, int64_t tokens) : ids(targets, targets + tokens), of_token(tokens) {
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    for (int64_t t = 0; t < tokens; ++t)
      of_token[t] = std::lower_bound(ids.begin(), ids.end(), targets[t]) - ids.begin();
  }
  int64_t count() const { return static_cast<int64_t>(ids.size()); }
  // out[d] = a per-token value (per_token[t * stride]) that is the same for every token of target d
  void per_target(const float* per_token, int64_t stride, float* out) const {
    for (int64_t t = 0; t < static_cast<int64_t>(of_token.size()); ++t) out[of_token[t]] = per_token[t * stride];
  }
};

// Running statistics of one vocabulary partition, struct of arrays over tokens (the augmented
// loss's target statistics over distinct targets, which are never more than the tokens).
struct Stats {
  float* m;    // reference for the sums: m ≤ max z ≤ m + kSlack (forward_tile)
  float* l;    // Σ exp(z - m)
  float* sz;   // Σ z
  float* zy;   // z at the target (0 until the target's tile is seen)
  float* lq;   // Σ exp((z - m)/τ)                 (augmented only)
  float* a;    // Σ exp(s/τ - ms) z/τ, with ms of the token's target   (augmented only)
  float* ms;   // per distinct target: max s/τ     (augmented only)
  float* ls;   // per distinct target: Σ exp(s/τ - ms)
  float* bs;   // per distinct target: Σ exp(s/τ - ms) s/τ
  static constexpr int64_t kCount = 9;  // floats per token (the augmented ones are always laid out)

  static Stats at(float* base, int64_t tokens) {
    return {base, base + tokens, base + 2 * tokens, base + 3 * tokens, base + 4 * tokens,
            base + 5 * tokens, base + 6 * tokens, base + 7 * tokens, base + 8 * tokens};
  }
  void reset(int64_t tokens) const {
    std::fill(m, m + tokens, -std::numeric_limits<float>::infinity());
    std::fill(ms, ms + tokens, -std::numeric_limits<float>::infinity());
    for (float* p : {l, sz, zy, lq, a, ls, bs}) std::fill(p, p + tokens, 0.0f);
  }
};

// The augmented loss's per-target rows of one tile, as the token epilogues read them: row d of y
// (row stride ld) belongs to distinct target d, the target of token t is of_token[t]. Forward:
// y = exp(s/τ - ms) with the partition's running max and scale[d] = exp(ms_before - ms) of this
// tile; backward: y = ỹ (normalized). y is null without the augmented loss.
struct TargetRows {
  const float* y = nullptr;
  int64_t ld = 0;
  const int64_t* of_token = nullptr;
  const float* scale = nullptr;
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

// Target rows [0, rows) of the tile (distinct targets d0 + i; row stride ld in s and out) of the
// augmented loss, forward: out = exp(s/τ - ms) with ms the target's running max, folded into the
// target's statistics; scale[d] = the factor its tokens' a must be rescaled by. s is the GEMM
// u·E_v (u: the targets' rows of E), not yet divided by τ; out may be s itself.
template <typename S>
void target_forward_tile(const S* s, int64_t ld, int64_t rows, int64_t cols, int64_t d0, float inv_tau,
                         const Stats& st, float* scale, float* out) {
  float q[kMaxTileCols];
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t d = d0 + i;
    const S* srow = s + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) q[j] = static_cast<float>(srow[j]) * inv_tau;
    const float ms_new = std::max(st.ms[d], row_max(q, cols));
    const ExpSums sums = row_exp(out + i * ld, q, cols, ms_new);
    scale[d] = rescale(st.ms[d], ms_new);
    st.ls[d] = st.ls[d] * scale[d] + sums.sum;
    st.bs[d] = st.bs[d] * scale[d] + sums.weighted;
    st.ms[d] = ms_new;
  }
}

// A token's exp sums are taken against a reference (its running m) that need not be the exact
// maximum: a tile whose logits stay within kSlack of it adds exp(z - m) ≤ e^kSlack terms (far
// from fp32's range at any vocabulary) in one pass, and only a tile that rises further is summed
// again against its own maximum. That saves the separate max pass and the rescale of every tile.
constexpr float kSlack = 20.0f;

// Folds the tile's rows [0, rows) (tokens t0 + i) into st. z has row stride ld; bias points at
// the tile's first column (or is null); targets are global vocabulary ids, v0 the tile's first
// one; tr holds the augmented loss's target rows of this tile (target_forward_tile).
template <typename Z>
void forward_tile(const Z* z, int64_t ld, const float* bias, int64_t rows, int64_t cols, int64_t v0,
                  const int64_t* targets, int64_t t0, float inv_tau, const TargetRows& tr, const Stats& st) {
  float r[kMaxTileCols];
  // exp((z - m)/τ) must stay as bounded as exp(z - m): for τ < 1 the slack shrinks with τ
  const float slack = kSlack * std::min(1.0f, 1.0f / inv_tau), bound = std::exp(slack);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = t0 + i;
    load_row(r, z + i * ld, bias, cols);
    const float* e = tr.y ? tr.y + tr.of_token[t] * tr.ld : nullptr;
    float m = st.m[t] == -std::numeric_limits<float>::infinity() ? row_max(r, cols) : st.m[t];
    RowSums sums = row_sums(r, cols, m, inv_tau, e);
    if (!(sums.sum <= bound)) {  // some z > m + slack (the sum > e^slack), or a NaN / inf
      m = std::max(m, row_max(r, cols));
      sums = row_sums(r, cols, m, inv_tau, e);
    }
    if (m != st.m[t]) {
      st.l[t] *= rescale(st.m[t], m);
      if (e) st.lq[t] *= st.m[t] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp((st.m[t] - m) * inv_tau);
      st.m[t] = m;
    }
    st.l[t] += sums.sum;
    st.sz[t] += sums.sum_z;
    if (e) {
      st.lq[t] += sums.sum_q;
      const int64_t d = tr.of_token[t];
      st.a[t] = st.a[t] * tr.scale[d] + sums.sum_a * inv_tau;
    }
    const int64_t y = targets[t] - v0;
    if (y >= 0 && y < cols) st.zy[t] = r[y];
  }
}

// into = into ⊕ from: the statistics of the union of both partitions (of_token: each token's
// distinct target, for the augmented loss).
inline void merge_stats(const Stats& into, const Stats& from, int64_t tokens, int64_t targets,
                        const int64_t* of_token, float inv_tau, bool augmented) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float m = std::max(into.m[t], from.m[t]);
    if (augmented) {
      const auto q_scale = [&](float old) {
        return old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp((old - m) * inv_tau);
      };
      into.lq[t] = into.lq[t] * q_scale(into.m[t]) + from.lq[t] * q_scale(from.m[t]);
      const int64_t d = of_token[t];
      const float ms = std::max(into.ms[d], from.ms[d]);
      into.a[t] = into.a[t] * rescale(into.ms[d], ms) + from.a[t] * rescale(from.ms[d], ms);
    }
    into.l[t] = into.l[t] * rescale(into.m[t], m) + from.l[t] * rescale(from.m[t], m);
    into.sz[t] += from.sz[t];
    into.zy[t] += from.zy[t];
    into.m[t] = m;
  }
  if (!augmented) return;
  for (int64_t d = 0; d < targets; ++d) {  // after the tokens, which read both maxima
    const float ms = std::max(into.ms[d], from.ms[d]);
    const float a_scale = rescale(into.ms[d], ms), b_scale = rescale(from.ms[d], ms);
    into.ls[d] = into.ls[d] * a_scale + from.ls[d] * b_scale;
    into.bs[d] = into.bs[d] * a_scale + from.bs[d] * b_scale;
    into.ms[d] = ms;
  }
}

// The augmented loss's parts of token t from merged statistics: lse(z/τ), lse(s/τ) and the KL.
struct KlParts {
  float lse_q, lse_s, kl;
};
inline KlParts kl_parts(const Stats& st, int64_t t, int64_t d, float inv_tau) {
  const float lse_q = st.m[t] * inv_tau + std::log(st.lq[t]);
  const float lse_s = st.ms[d] + std::log(st.ls[d]);
  return {lse_q, lse_s, (st.bs[d] - st.a[t]) / st.ls[d] - lse_s + lse_q};
}

// The loss terms' constants, as the ops take them.
struct Coefs {
  float smoothing, z_loss, kl_coef, inv_tau;
  int64_t vocab;
};

// Target rows [0, rows) of the tile (distinct targets d0 + i) of the augmented loss, backward:
// out = ỹ = exp(s/τ - lse(s/τ)) (lse_s per distinct target); s as in target_forward_tile, row
// stride ld in s and out; out may be s itself.
template <typename S>
void target_backward_tile(const S* s, int64_t ld, int64_t rows, int64_t cols, int64_t d0, float inv_tau,
                          const float* lse_s, float* out) {
  float q[kMaxTileCols];
  for (int64_t i = 0; i < rows; ++i) {
    const S* srow = s + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) q[j] = static_cast<float>(srow[j]) * inv_tau;
    row_exp(out + i * ld, q, cols, lse_s[d0 + i]);
  }
}

// dz over the tile (rows = tokens t0 + i) into out (row stride ld_out; may be z itself):
// dz = g [(1 + 2 λ lse) p - (1 - ε)[v = y] - ε/V + (α/τ)(q - ỹ)], then col_sums[j] += Σ_i dz_ij
// (the bias gradient, in row order; col_sums is null without a bias). stats rows are (lse,
// lse(z/τ), lse(s/τ)) per token; tr holds ỹ of this tile per distinct target
// (target_backward_tile).
template <typename Z, typename Out>
void backward_tile(const Z* z, int64_t ld, const float* bias, int64_t rows, int64_t cols, int64_t v0,
                   const int64_t* targets, const float* grad, const float* stats, int64_t t0, const Coefs& c,
                   const TargetRows& tr, float* col_sums, Out* out_base, int64_t ld_out) {
  float r[kMaxTileCols];
  const float uniform = c.smoothing / static_cast<float>(c.vocab);
  const float kl_scale = c.kl_coef * c.inv_tau;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = t0 + i;
    const float g = grad[t], lse = stats[3 * t], lse_q = stats[3 * t + 1];
    const float gp = g * (1.0f + 2.0f * c.z_loss * lse), g_uniform = g * uniform;
    load_row(r, z + i * ld, bias, cols);
    row_dz(r, cols, gp, g_uniform, lse, g * kl_scale, c.inv_tau, lse_q, tr.y ? tr.y + tr.of_token[t] * tr.ld : nullptr);
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
