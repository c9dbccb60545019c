// One tile of tokens carried through every layer of the HGT stack, forward and backward.
//
// A tile's rows stay in per-tile buffers (cache resident for ~32-64 rows) from the gather to the
// output: per layer one grouped matmul per group (ATen mm on views of the buffers, MKL on CPU
// builds), then one fused pass for bias, shuffle, LayerNorm, activation and dropout. Backward
// recomputes the tile's forward keeping its activations, then walks the layers down; weight,
// bias and norm gradients accumulate into the caller's per-chunk buffers.
#pragma once

#include "activations.h"

#include <define_kernels/checks.h>
#include <define_kernels/dropout_hash.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace define_kernels::cpu {

// What every tile of one op call shares (read-only).
template <typename T>
struct StackArgs {
  const T* x;                  // [V or T, p], contiguous
  const int64_t* ids;          // [T] or nullptr
  std::vector<const T*> params;
  std::vector<at::Tensor> weights;         // per layer, [g, a/g, c] (for mm views)
  std::vector<LayerDesc> layers;
  std::vector<std::vector<int64_t>> perm;  // per layer: output position -> pre-shuffle position
  int64_t p;
  T scale;
  bool dropout_on;
  uint32_t threshold;
  T keep_scale;
  int64_t seed;
};

// Gradient accumulators of one chunk of tiles, laid out like params.
template <typename T>
struct GradBuffers {
  std::vector<at::Tensor> grads;
  std::vector<T*> ptrs;
};

template <typename T>
inline at::Tensor view2d(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
class HgtTile {
 public:
  HgtTile(const StackArgs<T>& args, int64_t max_rows, bool record) : a_(args), record_(record) {
    const auto& L = a_.layers;
    int64_t wmax = 0, amax = 0;
    for (const auto& d : L) {
      wmax = std::max(wmax, d.out_features);
      amax = std::max(amax, d.in_features);
    }
    xs_.resize(max_rows * a_.p);
    z_.resize(max_rows * wmax);
    row_.resize(wmax);
    const size_t n = L.size();
    h_.resize(n);
    u_.resize(n);
    xhat_.resize(n);
    rstd_.resize(n);
    for (size_t l = 0; l < n; ++l) {
      const auto& d = L[l];
      const bool own_input = d.input_kind == kInputMix || d.input_kind == kInputConcat;
      if (record_ || l < 2) h_[l].resize(max_rows * (record_ ? d.out_features : wmax));
      if (own_input && (record_ || u_shared_.empty())) {
        if (record_) u_[l].resize(max_rows * d.in_features);
        else u_shared_.resize(max_rows * amax);
      }
      if (record_) {
        xhat_[l].resize(max_rows * d.out_features);
        if (d.has_norm) rstd_[l].resize(max_rows * d.groups);
      }
    }
    if (record_) {
      gz_.resize(max_rows * wmax);
      gu_.resize(max_rows * amax);
      gh_[0].resize(max_rows * wmax);
      gh_[1].resize(max_rows * wmax);
      gxs_.resize(max_rows * a_.p);
    }
  }

  // Rows [r0, r0 + n) of the op; writes y rows (forward only) when `y` is given.
  void forward(int64_t r0, int64_t n, T* y) {
    gather(r0, n);
    const int64_t L = static_cast<int64_t>(a_.layers.size());
    const T* prev = nullptr;
    for (int64_t l = 0; l < L; ++l) {
      const auto& d = a_.layers[l];
      const T* u = layer_input(l, n, prev);
      for (int64_t j = 0; j < d.groups; ++j) {  // z_j = u_j @ W_j (bias added in the epilogue)
        const int64_t ag = d.in_per_group(), c = d.out_per_group();
        at::Tensor z_j = view2d(z_.data() + j * c, n, c, d.out_features);
        at::mm_out(z_j, view2d(u + j * ag, n, ag, d.in_features), a_.weights[l][j]);
      }
      T* out = (y != nullptr && l == L - 1) ? y : h_buffer(l);
      epilogue_forward(l, r0, n, out);
      prev = out;
    }
  }

  // Recomputes the forward of rows [r0, r0 + n), then back-propagates grad_y rows into
  // grad_rows rows and the chunk's parameter gradients.
  void backward(int64_t r0, int64_t n, const T* grad_y, T* grad_rows, GradBuffers<T>& grads) {
    forward(r0, n, nullptr);
    std::fill(gxs_.begin(), gxs_.begin() + n * a_.p, T(0));
    const int64_t L = static_cast<int64_t>(a_.layers.size());
    const T* gh = grad_y + r0 * a_.layers.back().out_features;
    for (int64_t l = L - 1; l >= 0; --l) {
      const auto& d = a_.layers[l];
      const int64_t ag = d.in_per_group(), c = d.out_per_group(), w = d.out_features;
      epilogue_backward(l, r0, n, gh, grads);
      const T* u = input_pointer(l);
      T* gw = grads.ptrs[d.param_offset];
      T* gb = grads.ptrs[d.param_offset + 1];
      for (int64_t t = 0; t < n; ++t)
        for (int64_t f = 0; f < w; ++f) gb[f] += gz_[t * w + f];
      for (int64_t j = 0; j < d.groups; ++j) {
        const at::Tensor gz_j = view2d(gz_.data() + j * c, n, c, w);
        view2d(gw + j * ag * c, ag, c, c).addmm_(view2d(u + j * ag, n, ag, d.in_features).t(), gz_j);
        at::Tensor gu_j = view2d(gu_.data() + j * ag, n, ag, d.in_features);
        at::mm_out(gu_j, gz_j, a_.weights[l][j].t());
      }
      T* gh_next = gh_[l % 2].data();
      distribute_input_grad(l, n, gh_next);
      gh = gh_next;
    }
    T* out = grad_rows + r0 * a_.p;
    for (int64_t i = 0; i < n * a_.p; ++i) out[i] = gxs_[i] * a_.scale;
  }

 private:
  T* h_buffer(int64_t l) { return record_ ? h_[l].data() : h_[l % 2].data(); }

  int64_t row_key(int64_t r) const { return a_.ids ? a_.ids[r] : r; }

  void gather(int64_t r0, int64_t n) {
    const int64_t p = a_.p;
    for (int64_t t = 0; t < n; ++t) {
      const T* src = a_.x + (a_.ids ? a_.ids[r0 + t] : r0 + t) * p;
      T* dst = xs_.data() + t * p;
      if (a_.scale == T(1)) std::memcpy(dst, src, p * sizeof(T));
      else for (int64_t k = 0; k < p; ++k) dst[k] = src[k] * a_.scale;
    }
  }

  // The layer's input u [n, a] (a pointer into xs, the previous output, or a built buffer).
  const T* layer_input(int64_t l, int64_t n, const T* prev) {
    const auto& d = a_.layers[l];
    const int64_t p = a_.p;
    if (d.input_kind == kInputX) return xs_.data();
    if (d.input_kind == kInputPrev) return prev;
    T* u = record_ ? u_[l].data() : u_shared_.data();
    const int64_t a = d.in_features, hw = a - p;
    const int64_t parts = d.input_kind == kInputMix ? d.groups : 1;
    const int64_t xg = p / parts, hg = hw / parts;
    for (int64_t t = 0; t < n; ++t) {
      T* dst = u + t * a;
      for (int64_t j = 0; j < parts; ++j) {
        std::memcpy(dst, xs_.data() + t * p + j * xg, xg * sizeof(T));
        std::memcpy(dst + xg, prev + t * hw + j * hg, hg * sizeof(T));
        dst += xg + hg;
      }
    }
    return u;
  }

  // Where backward finds layer l's input (kept by the recording forward).
  const T* input_pointer(int64_t l) const {
    const auto& d = a_.layers[l];
    if (d.input_kind == kInputX) return xs_.data();
    if (d.input_kind == kInputPrev) return h_[l - 1].data();
    return u_[l].data();
  }

  // bias + shuffle + LayerNorm + act + dropout of layer l, from z_ into out [n, w].
  void epilogue_forward(int64_t l, int64_t r0, int64_t n, T* out) {
    const auto& d = a_.layers[l];
    const int64_t w = d.out_features, c = d.out_per_group();
    const T* bias = a_.params[d.param_offset + 1];
    const T* gamma = d.has_norm ? a_.params[d.param_offset + 2] : nullptr;
    const T* beta = d.has_norm ? a_.params[d.param_offset + 3] : nullptr;
    const int64_t* perm = a_.perm[l].data();
    const uint32_t layer_hash = a_.dropout_on ? dropout_layer_hash(a_.seed, l) : 0;
    T* v = row_.data();
    for (int64_t t = 0; t < n; ++t) {
      const T* z = z_.data() + t * w;
      for (int64_t f = 0; f < w; ++f) v[f] = z[perm[f]] + bias[perm[f]];
      if (d.has_norm) {
        for (int64_t j = 0; j < d.groups; ++j) {
          T* vg = v + j * c;
          T mean = 0, var = 0;
          for (int64_t k = 0; k < c; ++k) mean += vg[k];
          mean /= T(c);
          for (int64_t k = 0; k < c; ++k) var += (vg[k] - mean) * (vg[k] - mean);
          const T rstd = T(1) / std::sqrt(var / T(c) + T(1e-5));
          for (int64_t k = 0; k < c; ++k) vg[k] = (vg[k] - mean) * rstd;
          if (record_) {
            rstd_[l][t * d.groups + j] = rstd;
            std::memcpy(xhat_[l].data() + t * w + j * c, vg, c * sizeof(T));
          }
          for (int64_t k = 0; k < c; ++k) vg[k] = vg[k] * gamma[k] + beta[k];
        }
      } else if (record_) {
        std::memcpy(xhat_[l].data() + t * w, v, w * sizeof(T));
      }
      act_forward_row(d.act, v, w);
      apply_dropout_row(layer_hash, r0 + t, v, out + t * w, w);
    }
  }

  // dst = src * keep / (1 - p) for row r's mask (or a copy without dropout); the forward applies
  // it to values and the backward to gradients, so both must see the very same mask.
  void apply_dropout_row(uint32_t layer_hash, int64_t r, const T* src, T* dst, int64_t w) const {
    if (!a_.dropout_on) {
      std::memcpy(dst, src, w * sizeof(T));
      return;
    }
    const uint32_t row_hash = dropout_row_hash(layer_hash, row_key(r));
    for (int64_t f = 0; f < w; ++f)
      dst[f] = dropout_keep(row_hash, f, a_.threshold) ? src[f] * a_.keep_scale : T(0);
  }

  // From the gradient gh [n, w] of layer l's output to gz_ [n, w] (pre-shuffle), plus the
  // norm affine gradients.
  void epilogue_backward(int64_t l, int64_t r0, int64_t n, const T* gh, GradBuffers<T>& grads) {
    const auto& d = a_.layers[l];
    const int64_t w = d.out_features, c = d.out_per_group();
    const T* gamma = d.has_norm ? a_.params[d.param_offset + 2] : nullptr;
    const T* beta = d.has_norm ? a_.params[d.param_offset + 3] : nullptr;
    T* dgamma = d.has_norm ? grads.ptrs[d.param_offset + 2] : nullptr;
    T* dbeta = d.has_norm ? grads.ptrs[d.param_offset + 3] : nullptr;
    const int64_t* perm = a_.perm[l].data();
    const uint32_t layer_hash = a_.dropout_on ? dropout_layer_hash(a_.seed, l) : 0;
    T* g = row_.data();
    std::vector<T>& pre_buf = pre_;
    pre_buf.resize(w);
    T* pre = pre_buf.data();
    for (int64_t t = 0; t < n; ++t) {
      const T* xh = xhat_[l].data() + t * w;
      const T* ght = gh + t * w;
      apply_dropout_row(layer_hash, r0 + t, ght, g, w);
      if (d.act != kActNone) {
        if (d.has_norm) {
          for (int64_t j = 0; j < d.groups; ++j)
            for (int64_t k = 0; k < c; ++k) pre[j * c + k] = xh[j * c + k] * gamma[k] + beta[k];
          act_backward_row(d.act, pre, g, w);
        } else {
          act_backward_row(d.act, xh, g, w);
        }
      }
      T* gz = gz_.data() + t * w;
      if (d.has_norm) {
        for (int64_t j = 0; j < d.groups; ++j) {
          const T* xg = xh + j * c;
          T* gg = g + j * c;
          T sum1 = 0, sum2 = 0;
          for (int64_t k = 0; k < c; ++k) {
            dgamma[k] += gg[k] * xg[k];
            dbeta[k] += gg[k];
            gg[k] *= gamma[k];
            sum1 += gg[k];
            sum2 += gg[k] * xg[k];
          }
          const T rstd = rstd_[l][t * d.groups + j], m1 = sum1 / T(c), m2 = sum2 / T(c);
          for (int64_t k = 0; k < c; ++k) gg[k] = rstd * (gg[k] - m1 - xg[k] * m2);
        }
      }
      for (int64_t f = 0; f < w; ++f) gz[perm[f]] = g[f];
    }
  }

  // Splits gu_ (gradient of layer l's input) into the stack input's gradient (accumulated) and
  // the previous layer output's gradient (written to gh_next).
  void distribute_input_grad(int64_t l, int64_t n, T* gh_next) {
    const auto& d = a_.layers[l];
    const int64_t p = a_.p, a = d.in_features, hw = a - p;
    if (d.input_kind == kInputX) {
      for (int64_t i = 0; i < n * p; ++i) gxs_[i] += gu_[i];
      return;
    }
    if (d.input_kind == kInputPrev) {
      std::memcpy(gh_next, gu_.data(), n * a * sizeof(T));
      return;
    }
    const int64_t parts = d.input_kind == kInputMix ? d.groups : 1;
    const int64_t xg = p / parts, hg = hw / parts;
    for (int64_t t = 0; t < n; ++t) {
      const T* src = gu_.data() + t * a;
      for (int64_t j = 0; j < parts; ++j) {
        T* gx = gxs_.data() + t * p + j * xg;
        for (int64_t k = 0; k < xg; ++k) gx[k] += src[k];
        std::memcpy(gh_next + t * hw + j * hg, src + xg, hg * sizeof(T));
        src += xg + hg;
      }
    }
  }

  const StackArgs<T>& a_;
  bool record_;
  std::vector<T> xs_, z_, row_, pre_, u_shared_, gz_, gu_, gxs_;
  std::vector<T> gh_[2];
  std::vector<std::vector<T>> h_, u_, xhat_, rstd_;
};

}  // namespace define_kernels::cpu
