// The fused per-layer passes of the CPU stack, over blocks of rows in parallel.
//
// Forward, per row: v = z[perm] + bias (shuffle folded into the read; bf16 GEMMs added the bias
// themselves, see bias_in_epilogue); LayerNorm per group with statistics in the compute type
// (float for fp32/bf16/fp16, double for fp64); activation; hashed dropout; one store into the
// next layer's input buffer through its column map's runs (hgt_layers.h), beside a copy of the
// stack input's row.
// With `keep` the pre-norm row v is stored too (in place when z is the kept buffer): it is all
// the backward needs besides the layer inputs (LN statistics are recomputed from it).
// Backward, per row: dropout mask, then per LN group one fused pass (x-hat recomputed from pre,
// activation derivative, LN backward sums) and one that stores gz at the pre-shuffle positions;
// bias and norm-affine gradients go to per-block partial sums that are added in block order
// afterwards (fixed order: deterministic for any thread count).
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
  const int64_t* perm = plan.perm[l].data();
  const bool shuffled = plan.shuffled[l];
  const bool add_bias = bias_in_epilogue(z.scalar_type());
  const T* zp = z.data_ptr<T>();
  const T* xsp = xs ? xs->data_ptr<T>() : nullptr;
  const int64_t p = plan.p;
  T* prep = pre ? pre->data_ptr<T>() : nullptr;
  const LayerDropout& drop = plan.drop[l];
  const uint32_t layer_hash = drop.on ? dropout_layer_hash(plan.seed, l) : 0;
  const A keep_scale = A(drop.keep_scale);
  at::parallel_for(0, num_blocks(plan.rows), 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> row(w);
    A* v = row.data();
    for (int64_t t = b0 * kBlockRows; t < std::min(plan.rows, b1 * kBlockRows); ++t) {
      const T* zt = zp + t * w;
      if (shuffled) {
        for (int64_t f = 0; f < w; ++f) v[f] = A(zt[perm[f]]);
        if (add_bias)
          for (int64_t f = 0; f < w; ++f) v[f] += A(lp.bias[perm[f]]);
      } else if (add_bias) {
#pragma omp simd
        for (int64_t f = 0; f < w; ++f) v[f] = A(zt[f]) + A(lp.bias[f]);
      } else {
        convert(v, zt, w);
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
template <typename T>
void epilogue_backward(const Plan& plan, int64_t l, at::TensorList params, const Columns<T>& gh,
                       const at::Tensor& pre, at::Tensor& gz, std::vector<at::Tensor>& grad_params) {
  using A = at::opmath_type<T>;
  const auto& d = plan.layers[l];
  const int64_t w = d.out_features, c = d.out_per_group(), g = d.groups;
  const auto lp = layer_params<T>(plan, l, params);
  const int64_t* perm = plan.perm[l].data();
  const bool shuffled = plan.shuffled[l];
  const T* prep = pre.data_ptr<T>();
  T* gzp = gz.data_ptr<T>();
  const LayerDropout& drop = plan.drop[l];
  const uint32_t layer_hash = drop.on ? dropout_layer_hash(plan.seed, l) : 0;
  const A keep_scale = A(drop.keep_scale);
  // Per block: bias partial [w] (pre-shuffle order), then dgamma [c], dbeta [c].
  const int64_t blocks = num_blocks(plan.rows), width = w + (d.has_norm ? 2 * c : 0);
  std::vector<A> partial(blocks * width, A(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> buf(2 * w);
    A* gr = buf.data();          // gradient row
    A* pre_row = gr + w;         // the pre-norm row in A (16-bit types: converted once)
    for (int64_t b = b0; b < b1; ++b) {
      A* db = partial.data() + b * width;
      A* dgamma = db + w;
      A* dbeta = dgamma + c;
      for (int64_t t = b * kBlockRows; t < std::min(plan.rows, (b + 1) * kBlockRows); ++t) {
        const A* pt;
        if constexpr (std::is_same_v<A, T>) {
          pt = prep + t * w;
        } else {
          convert(pre_row, prep + t * w, w);
          pt = pre_row;
        }
        T* gzt = gzp + t * w;
        load_runs(gr, gh.row(t), gh.runs);
        if (drop.on) {
          const uint32_t rh = dropout_row_hash(layer_hash, row_key(plan, t));
          for (int64_t f = 0; f < w; ++f)
            gr[f] = dropout_keep(rh, f, drop.threshold) ? gr[f] * keep_scale : A(0);
        }
        // From here each feature is touched by few fused loops: the normalized value and the
        // activation input are recomputed from pre where needed instead of stored.
        with_act(d.act, [&](auto act_kind) {
          constexpr int64_t kAct = decltype(act_kind)::value;
          if (!d.has_norm) {
#pragma omp simd
            for (int64_t f = 0; f < w; ++f) gr[f] = act_backward_element<kAct>(A(pt[f]), gr[f]);
            return;
          }
          // Locals, not the captured references: stores through gg could alias those, and
          // would then keep the loops from vectorizing.
          const T* const gamma_p = lp.gamma;
          const T* const beta_p = lp.beta;
          A* const dgamma_p = dgamma;
          A* const dbeta_p = dbeta;
          for (int64_t j = 0; j < g; ++j) {
            const A* pg = pt + j * c;
            A* gg = gr + j * c;
            A mean, rstd;
            group_stats(pg, c, mean, rstd);
            A sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : sum1, sum2)
            for (int64_t k = 0; k < c; ++k) {
              const A xhat = (A(pg[k]) - mean) * rstd, gamma = A(gamma_p[k]);
              const A gk = act_backward_element<kAct>(xhat * gamma + A(beta_p[k]), gg[k]);
              dgamma_p[k] += gk * xhat;
              dbeta_p[k] += gk;
              gg[k] = gk * gamma;
              sum1 += gg[k];
              sum2 += gg[k] * xhat;
            }
            const A m1 = sum1 / A(c), m2 = sum2 / A(c);
            if (shuffled) {
#pragma omp simd
              for (int64_t k = 0; k < c; ++k) gg[k] = rstd * (gg[k] - m1 - (A(pg[k]) - mean) * rstd * m2);
            } else {  // fused with the store: gz and the bias gradient
              T* gzg = gzt + j * c;
              A* dbg = db + j * c;
#pragma omp simd
              for (int64_t k = 0; k < c; ++k) {
                const A v = rstd * (gg[k] - m1 - (A(pg[k]) - mean) * rstd * m2);
                gzg[k] = to_storage<T>(v);
                dbg[k] += v;
              }
            }
          }
        });
        if (shuffled) {
          for (int64_t f = 0; f < w; ++f) {
            gzt[perm[f]] = to_storage<T>(gr[f]);
            db[perm[f]] += gr[f];
          }
        } else if (!d.has_norm) {
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
  if (d.has_norm) {
    T* dg = grad_params[o + 2].data_ptr<T>();
    T* dbt = grad_params[o + 3].data_ptr<T>();
    for (int64_t k = 0; k < c; ++k) {
      dg[k] = T(total[w + k]);
      dbt[k] = T(total[w + c + k]);
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
