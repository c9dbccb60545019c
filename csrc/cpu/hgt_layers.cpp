// See hgt_layers.h.
#include "hgt_layers.h"

#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace define_kernels::cpu {
namespace {

// Group j's slices of u for the layer's input kind (see hgt_layers.h).
std::vector<std::vector<Segment>> layer_segments(const LayerDesc& d, int64_t p) {
  const int64_t g = d.groups, ag = d.in_per_group(), hw = d.in_features - p;
  std::vector<std::vector<Segment>> out(g);
  for (int64_t j = 0; j < g; ++j) {
    auto& segs = out[j];
    if (d.input_kind == kInputX) {
      segs.push_back({kFromX, j * ag, 0, ag});
    } else if (d.input_kind == kInputPrev) {
      segs.push_back({kFromPrev, j * ag, 0, ag});
    } else if (d.input_kind == kInputMix) {  // chunk j of x, then chunk j of h
      const int64_t xg = p / g, hg = hw / g;
      segs.push_back({kFromX, j * xg, 0, xg});
      segs.push_back({kFromPrev, j * hg, xg, hg});
    } else {  // concat [x, h], cut into g equal groups that may straddle the boundary
      const int64_t lo = j * ag, hi = lo + ag;
      if (lo < p) segs.push_back({kFromX, lo, 0, std::min(hi, p) - lo});
      if (hi > p) {
        const int64_t start = std::max(lo, p);
        segs.push_back({kFromPrev, start - p, start - lo, hi - start});
      }
    }
  }
  return out;
}

}  // namespace

Plan make_plan(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
               c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed) {
  Plan plan;
  plan.layers = check_hgt_args(x, ids, params, layers, dropout, seed);
  plan.p = x.size(1);
  if (ids.has_value()) {
    check_ids_in_range(*ids, x.size(0));
    plan.ids = ids->to(at::kLong).contiguous();
    plan.rows = ids->size(0);
  } else {
    plan.rows = x.size(0);
  }
  for (const auto& d : plan.layers) {
    plan.segments.push_back(layer_segments(d, plan.p));
    std::vector<int64_t> perm(d.out_features);
    const int64_t g = d.groups, c = d.out_per_group();
    for (int64_t f = 0; f < d.out_features; ++f) perm[f] = shuffle ? (f % g) * c + f / g : f;
    plan.perm.push_back(std::move(perm));
  }
  plan.scale = scale;
  plan.dropout_on = seed >= 0 && dropout > 0.0;
  plan.threshold = dropout_threshold(dropout);
  plan.keep_scale = 1.0 / (1.0 - dropout);
  plan.seed = seed;
  return plan;
}

at::Tensor gather_input(const at::Tensor& x, const Plan& plan) {
  at::Tensor rows = plan.ids.defined() ? at::index_select(x, 0, plan.ids) : x.contiguous();
  if (plan.scale == 1.0) return rows;
  return plan.ids.defined() ? rows.mul_(plan.scale) : rows.mul(plan.scale);
}

void layer_gemm_forward(const Plan& plan, int64_t l, const at::Tensor& xs, const at::Tensor& h_prev,
                        const at::Tensor& weight, at::Tensor& out) {
  const auto& d = plan.layers[l];
  const int64_t c = d.out_per_group();
  for (int64_t j = 0; j < d.groups; ++j) {
    at::Tensor out_j = out.narrow(1, j * c, c);
    const at::Tensor w_j = weight[j];
    bool first = true;
    for (const auto& s : plan.segments[l][j]) {
      const at::Tensor& src = s.source == kFromX ? xs : h_prev;
      const at::Tensor a = src.narrow(1, s.src_col, s.len), b = w_j.narrow(0, s.weight_row, s.len);
      if (first) at::mm_out(out_j, a, b);
      else out_j.addmm_(a, b);
      first = false;
    }
  }
}

void layer_gemm_backward(const Plan& plan, int64_t l, const at::Tensor& xs, const at::Tensor& h_prev,
                         const at::Tensor& weight, const at::Tensor& gz, at::Tensor& grad_weight,
                         at::Tensor& grad_xs, at::Tensor& grad_prev) {
  const auto& d = plan.layers[l];
  const int64_t c = d.out_per_group();
  for (int64_t j = 0; j < d.groups; ++j) {
    const at::Tensor gz_j = gz.narrow(1, j * c, c);
    const at::Tensor w_j = weight[j];
    at::Tensor gw_j = grad_weight[j];
    for (const auto& s : plan.segments[l][j]) {
      const bool from_x = s.source == kFromX;
      const at::Tensor& src = from_x ? xs : h_prev;
      at::Tensor gw_s = gw_j.narrow(0, s.weight_row, s.len);
      at::mm_out(gw_s, src.narrow(1, s.src_col, s.len).t(), gz_j);
      const at::Tensor w_s_t = w_j.narrow(0, s.weight_row, s.len).t();
      if (from_x) {
        grad_xs.narrow(1, s.src_col, s.len).addmm_(gz_j, w_s_t);
      } else {  // every column of h belongs to exactly one segment: write, no accumulate
        at::Tensor gp = grad_prev.narrow(1, s.src_col, s.len);
        at::mm_out(gp, gz_j, w_s_t);
      }
    }
  }
}

}  // namespace define_kernels::cpu
