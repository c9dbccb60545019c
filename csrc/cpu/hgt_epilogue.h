// The fused per-layer passes of the CPU stack, over blocks of rows in parallel.
//
// Forward, per row: v = z[perm] + bias (shuffle folded into the read; bf16 GEMMs added the bias
// themselves, see bias_in_epilogue); LayerNorm per group with statistics in the compute type
// (float for fp32/bf16/fp16, double for fp64); activation; hashed dropout; one store into the
// next layer's input buffer through its column map's runs (hgt_layers.h), beside a copy of the
// stack input's row.
// With `keep` the pre-norm row v is stored too (in place when z is the kept buffer): it is all
// the backward needs besides the layer inputs (LN statistics are recomputed from it).
// Backward, per row: dropout mask; x-hat recomputed from pre per LN group; the activation
// derivative over the whole row; the LN backward per group; gz stored at the pre-shuffle
// positions. Bias and norm-affine gradients go to per-block partial sums that are added in block
// order afterwards (fixed order: deterministic for any thread count).
// The shuffle is a gather both ways (perm forward, unperm backward) so those loops vectorize.
#pragma once

#include "activations.h"
#include "hgt_layers.h"
#include "storage_cast.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace define_kernels::cpu {

constexpr int64_t kBlockRows = 32;  // rows per work item: one block's rows stay in L2

inline int64_t num_blocks(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

// A column map as contiguous runs: features [first, first + length) live at columns
// [column, column + length). The split-and-mix and concat maps are a few long runs, so every
// copy through a map is a handful of vectorized loops instead of one indexed access per feature.
struct Run {
  int64_t first, column, length;
};

inline std::vector<Run> runs_of(const int64_t* col, int64_t n) {
  std::vector<Run> runs;
  for (int64_t f = 0; f < n; ++f) {
    const int64_t column = col ? col[f] : f;
    if (!runs.empty() && runs.back().column + runs.back().length == column &&
        runs.back().first + runs.back().length == f) {
      ++runs.back().length;
    } else {
      runs.push_back({f, column, 1});
    }
  }
  return runs;
}

// Rows of a [rows, ld] buffer seen as [rows, w] through a column map (none: identity).
template <typename T>
struct Columns {
  T* base = nullptr;
  int64_t ld = 0;
  std::vector<Run> runs;
  T* row(int64_t t) const { return base + t * ld; }
};

template <typename T>
Columns<T> columns(const at::Tensor& t, const std::vector<int64_t>* col = nullptr) {
  const bool mapped = col && !col->empty();
  return {t.data_ptr<T>(), t.size(1), runs_of(mapped ? col->data() : nullptr,
                                              mapped ? static_cast<int64_t>(col->size()) : t.size(1))};
}

// dst[i] = src[i] for i < n, converted (vectorized; bf16 rounds as storage_cast.h).
template <typename D, typename S>
inline void convert(D* dst, const S* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_storage<D>(src[i]);
}

// dst[run.column + i] = src[run.first + i] over the runs (a row stored through a map).
template <typename D, typename S>
inline void store_runs(D* dst, const S* src, const std::vector<Run>& runs) {
  for (const Run& r : runs) convert(dst + r.column, src + r.first, r.length);
}

// dst[run.first + i] = src[run.column + i] (a row read through a map).
template <typename D, typename S>
inline void load_runs(D* dst, const S* src, const std::vector<Run>& runs) {
  for (const Run& r : runs) convert(dst + r.first, src + r.column, r.length);
}

template <typename T>
struct LayerParams {
  const T* bias;
  const T* gamma;  // nullptr without norm
  const T* beta;
};

template <typename T>
LayerParams<T> layer_params(const Plan& plan, int64_t l, at::TensorList params) {
  const auto& d = plan.layers[l];
  const int64_t o = d.param_offset;
  return {params[o + 1].data_ptr<T>(), d.has_norm ? params[o + 2].data_ptr<T>() : nullptr,
          d.has_norm ? params[o + 3].data_ptr<T>() : nullptr};
}

// values [w] (pre-shuffle order) in output order and in A: values[perm[f]] at f.
template <typename A, typename T>
std::vector<A> output_order(const T* values, const int32_t* perm, int64_t w) {
  std::vector<A> out(w);
  for (int64_t f = 0; f < w; ++f) out[f] = A(values[perm[f]]);
  return out;
}

// values [c] repeated for each of the g groups of a row: [g * c] in A.
template <typename A, typename T>
std::vector<A> tiled(const T* values, int64_t c, int64_t g) {
  std::vector<A> out(g * c);
  for (int64_t f = 0; f < g * c; ++f) out[f] = A(values[f % c]);
  return out;
}

inline int64_t row_key(const Plan& plan, int64_t r) {
  return plan.ids.defined() ? plan.ids.data_ptr<int64_t>()[r] : r;
}

// Per-group mean and 1/std of v [c] in A (biased variance, eps 1e-5 as nn.LayerNorm).
template <typename A, typename S>
inline void group_stats(const S* v, int64_t c, A& mean, A& rstd) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < c; ++k) sum += A(v[k]);
  mean = sum / A(c);
  A var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t k = 0; k < c; ++k) var += (A(v[k]) - mean) * (A(v[k]) - mean);
  rstd = A(1) / std::sqrt(var / A(c) + A(1e-5));
}

// z [rows, w] GEMM output -> out; pre [rows, w] (pre-norm rows) when given; with x_out, also
// copies xs [rows, p] into the next layer's input.
template <typename T>
void epilogue_forward(const Plan& plan, int64_t l, at::TensorList params, const at::Tensor& z,
                      const Columns<T>& out, at::Tensor* pre, const at::Tensor* xs,
                      const Columns<T>& x_out) {
  using A = at::opmath_type<T>;
  const auto& d = plan.layers[l];
  const int64_t w = d.out_features, c = d.out_per_group(), g = d.groups;
  const auto lp = layer_params<T>(plan, l, params);
  const int32_t* perm = plan.perm[l].data();
  const bool shuffled = plan.shuffled[l];
  const bool add_bias = bias_in_epilogue(z.scalar_type());
  const std::vector<A> bias = output_order<A>(lp.bias, perm, w);
  const A* const bias_p = bias.data();
  const T* zp = z.data_ptr<T>();
  // z is [rows, w], or [g, rows, c] (group j of row t at j * rows * c + t * c)
  const bool z_grouped = z.dim() == 3;
  const int64_t z_ld = z_grouped ? c : w, z_gs = z_grouped ? plan.rows * c : c;
  const T* xsp = xs ? xs->data_ptr<T>() : nullptr;
  const int64_t p = plan.p;
  T* prep = pre ? pre->data_ptr<T>() : nullptr;
  const LayerDropout& drop = plan.drop[l];
  const uint32_t layer_hash = drop.on ? dropout_layer_hash(plan.seed, l) : 0;
  const A keep_scale = A(drop.keep_scale);
  at::parallel_for(0, num_blocks(plan.rows), 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> row(2 * w);
    A* v = row.data();
    A* z_row = v + w;  // a shuffled layer's GEMM row in A, gathered from (vectorized) into v
    for (int64_t t = b0 * kBlockRows; t < std::min(plan.rows, b1 * kBlockRows); ++t) {
      const T* zt = zp + t * z_ld;
      A* const z_dst = shuffled ? z_row : v;
      if (z_gs == c) {
        convert(z_dst, zt, w);
      } else {
        for (int64_t j = 0; j < g; ++j) convert(z_dst + j * c, zt + j * z_gs, c);
      }
      if (shuffled) {
#pragma omp simd
        for (int64_t f = 0; f < w; ++f) v[f] = z_row[perm[f]];
      }
      if (add_bias) {
#pragma omp simd
        for (int64_t f = 0; f < w; ++f) v[f] += bias_p[f];
      }
      if (prep && (prep != zp || add_bias))  // pre may be z itself: then only the bias is new
        convert(prep + t * w, v, w);
      if (d.has_norm) {
        for (int64_t j = 0; j < g; ++j) {
          A* vg = v + j * c;
          A mean, rstd;
          group_stats(vg, c, mean, rstd);
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) vg[k] = (vg[k] - mean) * rstd * A(lp.gamma[k]) + A(lp.beta[k]);
        }
      }
      act_forward_row(d.act, v, w);
      if (drop.on) {
        const uint32_t rh = dropout_row_hash(layer_hash, row_key(plan, t));
        for (int64_t f = 0; f < w; ++f)
          if (!dropout_keep(rh, f, drop.threshold)) v[f] = A(0);
#pragma omp simd
        for (int64_t f = 0; f < w; ++f) v[f] *= keep_scale;
      }
      store_runs(out.row(t), v, out.runs);
      if (xsp) store_runs(x_out.row(t), xsp + t * p, x_out.runs);
    }
  });
}

// gh (gradient of the layer output, through a column map), pre [rows, w] -> gz [rows, w]
// (pre-shuffle); writes the bias / norm gradients of the layer (grad_params entries).
// Per row the costly part (the activation derivative) is one loop over the whole row, not one
// per LayerNorm group: a group width that is not a multiple of the vector width (44 at
// wt103-base's first layer) would leave a scalar tail per group. gamma and beta are tiled to the
// row for it, and dgamma / dbeta are kept per row position, folded per group at the end.
template <typename T>
void epilogue_backward(const Plan& plan, int64_t l, at::TensorList params, const Columns<T>& gh,
                       const at::Tensor& pre, at::Tensor& gz, std::vector<at::Tensor>& grad_params) {
  using A = at::opmath_type<T>;
  const auto& d = plan.layers[l];
  const int64_t w = d.out_features, c = d.out_per_group(), g = d.groups;
  const auto lp = layer_params<T>(plan, l, params);
  const int32_t* unperm = plan.unperm[l].data();
  const bool shuffled = plan.shuffled[l];
  const T* prep = pre.data_ptr<T>();
  T* gzp = gz.data_ptr<T>();
  const LayerDropout& drop = plan.drop[l];
  const uint32_t layer_hash = drop.on ? dropout_layer_hash(plan.seed, l) : 0;
  const A keep_scale = A(drop.keep_scale);
  const std::vector<A> gamma = d.has_norm ? tiled<A>(lp.gamma, c, g) : std::vector<A>();
  const std::vector<A> beta = d.has_norm ? tiled<A>(lp.beta, c, g) : std::vector<A>();
  // Per block: bias partial [w] (pre-shuffle order), then dgamma [w], dbeta [w] (output order).
  const int64_t blocks = num_blocks(plan.rows), width = w * (d.has_norm ? 3 : 1);
  std::vector<A> partial(blocks * width, A(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> buf(3 * w + g);
    A* gr = buf.data();       // gradient row
    A* pre_row = gr + w;      // the pre-norm row in A (16-bit types: converted once)
    A* xhat = pre_row + w;    // normalized row
    A* rstd = xhat + w;       // per group: 1 / std
    // Locals, not captured references: stores through gr could alias those, and would then keep
    // the loops from vectorizing.
    const A* const gamma_p = gamma.data();
    const A* const beta_p = beta.data();
    for (int64_t b = b0; b < b1; ++b) {
      A* const db = partial.data() + b * width;
      A* const dgamma = db + w;
      A* const dbeta = dgamma + w;
      for (int64_t t = b * kBlockRows; t < std::min(plan.rows, (b + 1) * kBlockRows); ++t) {
        const A* pt;
        if constexpr (std::is_same_v<A, T>) {
          pt = prep + t * w;
        } else {
          convert(pre_row, prep + t * w, w);
          pt = pre_row;
        }
        load_runs(gr, gh.row(t), gh.runs);
        if (drop.on) {
          const uint32_t rh = dropout_row_hash(layer_hash, row_key(plan, t));
          for (int64_t f = 0; f < w; ++f)
            gr[f] = dropout_keep(rh, f, drop.threshold) ? gr[f] * keep_scale : A(0);
        }
        with_act(d.act, [&](auto act_kind) {
          constexpr int64_t kAct = decltype(act_kind)::value;
          if (!d.has_norm) {
#pragma omp simd
            for (int64_t f = 0; f < w; ++f) gr[f] = act_backward_element<kAct>(A(pt[f]), gr[f]);
            return;
          }
          for (int64_t j = 0; j < g; ++j) {
            A mean;
            group_stats(pt + j * c, c, mean, rstd[j]);
            const A* pg = pt + j * c;
            A* xg = xhat + j * c;
            const A r = rstd[j];
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) xg[k] = (A(pg[k]) - mean) * r;
          }
#pragma omp simd
          for (int64_t f = 0; f < w; ++f) {
            const A gk = act_backward_element<kAct>(xhat[f] * gamma_p[f] + beta_p[f], gr[f]);
            dgamma[f] += gk * xhat[f];
            dbeta[f] += gk;
            gr[f] = gk * gamma_p[f];
          }
          for (int64_t j = 0; j < g; ++j) {  // LayerNorm backward per group
            A* gg = gr + j * c;
            const A* xg = xhat + j * c;
            A sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : sum1, sum2)
            for (int64_t k = 0; k < c; ++k) {
              sum1 += gg[k];
              sum2 += gg[k] * xg[k];
            }
            const A m1 = sum1 / A(c), m2 = sum2 / A(c), r = rstd[j];
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) gg[k] = r * (gg[k] - m1 - xg[k] * m2);
          }
        });
        T* gzt = gzp + t * w;
        if (shuffled) {  // gz at pre-shuffle position q is the row's value at unperm[q]
#pragma omp simd
          for (int64_t q = 0; q < w; ++q) {
            const A v = gr[unperm[q]];
            gzt[q] = to_storage<T>(v);
            db[q] += v;
          }
        } else {
#pragma omp simd
          for (int64_t f = 0; f < w; ++f) {
            gzt[f] = to_storage<T>(gr[f]);
            db[f] += gr[f];
          }
        }
      }
    }
  });
  // Block partials in block order, parallel over columns.
  std::vector<A> total(width, A(0));
  at::parallel_for(0, width, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t b = 0; b < blocks; ++b) {
      const A* pb = partial.data() + b * width;
      for (int64_t k = k0; k < k1; ++k) total[k] += pb[k];
    }
  });
  const int64_t o = d.param_offset;
  T* gb = grad_params[o + 1].data_ptr<T>();
  for (int64_t k = 0; k < w; ++k) gb[k] = T(total[k]);
  if (d.has_norm) {  // per-position sums folded over the groups, in group order
    T* dg = grad_params[o + 2].data_ptr<T>();
    T* dbt = grad_params[o + 3].data_ptr<T>();
    for (int64_t k = 0; k < c; ++k) {
      A sum_g = 0, sum_b = 0;
      for (int64_t j = 0; j < g; ++j) {
        sum_g += total[w + j * c + k];
        sum_b += total[2 * w + j * c + k];
      }
      dg[k] = T(sum_g);
      dbt[k] = T(sum_b);
    }
  }
}

// acc [rows, p] (compute type) += the stack-input columns of gu (the gradient of a layer input).
template <typename T>
void add_input_grad(const Plan& plan, const Columns<T>& gu, at::opmath_type<T>* acc) {
  const int64_t p = plan.p;
  at::parallel_for(0, num_blocks(plan.rows), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t t = b0 * kBlockRows; t < std::min(plan.rows, b1 * kBlockRows); ++t) {
      const T* src = gu.row(t);
      auto* dst = acc + t * p;
      for (const Run& r : gu.runs) {
#pragma omp simd
        for (int64_t i = 0; i < r.length; ++i) dst[r.first + i] += src[r.column + i];
      }
    }
  });
}

}  // namespace define_kernels::cpu
