// See hgt_layers.h.
#include "hgt_layers.h"
#include "buffer_pool.h"
#include "transpose16.h"

#include <ATen/ops/index_select.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>

namespace define_kernels::cpu {
namespace {

// Column maps of u_l for layer l >= 1 (see hgt_layers.h and reference.mix_input).
void input_maps(const LayerDesc& d, int64_t p, int64_t prev_width, std::vector<int64_t>& xcol,
                std::vector<int64_t>& hcol) {
  xcol.clear();
  hcol.resize(prev_width);
  if (d.input_kind == kInputPrev || d.input_kind == kInputX) {  // X at l >= 1: after the in-proj, u = x' = h_0
    std::iota(hcol.begin(), hcol.end(), int64_t(0));
    return;
  }
  xcol.resize(p);
  if (d.input_kind == kInputConcat) {  // u = [x, h]
    std::iota(xcol.begin(), xcol.end(), int64_t(0));
    std::iota(hcol.begin(), hcol.end(), p);
    return;
  }
  const int64_t g = d.groups, xg = p / g, hg = prev_width / g;  // mix: per group j, x_j then h_j
  for (int64_t k = 0; k < p; ++k) xcol[k] = (k / xg) * (xg + hg) + k % xg;
  for (int64_t k = 0; k < prev_width; ++k) hcol[k] = (k / hg) * (xg + hg) + xg + k % hg;
}

}  // namespace

Plan make_plan(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
               c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed) {
  Plan plan;
  plan.layers = check_hgt_args(x, ids, params, layers, dropout, seed, /*allow_in_proj=*/true);
  plan.p = stack_width(plan.layers, x.size(1));
  plan.in_proj = plan.layers.front().input_kind == kInputProj;
  if (ids.has_value()) {
    check_ids_in_range(*ids, x.size(0));
    plan.ids = ids->to(at::kLong).contiguous();
    plan.rows = ids->size(0);
  } else {
    plan.rows = x.size(0);
  }
  const size_t L = plan.layers.size();
  plan.xcol.resize(L);
  plan.hcol.resize(L);
  for (size_t l = 0; l < L; ++l) {
    const auto& d = plan.layers[l];
    if (l > 0) input_maps(d, plan.p, plan.layers[l - 1].out_features, plan.xcol[l], plan.hcol[l]);
    DK_CHECK(d.out_features < (int64_t(1) << 31), indexed("layers", l), "out_features must be < 2^31, got ",
             d.out_features);
    std::vector<int32_t> perm(d.out_features), unperm(d.out_features);
    const int64_t g = d.groups, c = d.out_per_group();
    for (int64_t f = 0; f < d.out_features; ++f) {
      perm[f] = static_cast<int32_t>(shuffle ? (f % g) * c + f / g : f);
      unperm[perm[f]] = static_cast<int32_t>(f);
    }
    plan.perm.push_back(std::move(perm));
    plan.unperm.push_back(std::move(unperm));
    plan.shuffled.push_back(shuffle && g > 1);
  }
  plan.scale = scale;
  for (const auto& d : plan.layers)  // per layer: the in-proj has its own p
    plan.drop.push_back({seed >= 0 && d.dropout > 0.0, dropout_threshold(d.dropout), 1.0 / (1.0 - d.dropout)});
  plan.seed = seed;
  return plan;
}

at::Tensor ScratchRows::flat_of(size_t slot, int64_t elements) {
  if (slots_.size() <= slot) slots_.resize(slot + 1);
  at::Tensor& buffer = slots_[slot];
  if (!buffer.defined() || buffer.numel() < elements) buffer = pooled_rows(1, elements, options_).view(-1);
  return buffer.narrow(0, 0, elements);
}

at::Tensor ScratchRows::rows_of(size_t slot, int64_t width) {
  return flat_of(slot, rows_ * width).view({rows_, width});
}

at::Tensor ScratchRows::transposed_of(size_t slot, int64_t width) {
  const int64_t ld = (rows_ + 31) / 32 * 32;
  at::Tensor padded = flat_of(slot, ld * width).view({width, ld});
  // Zeroed padding: oneDNN's AMX GEMMs read a row's K tail up to the row stride (the packed
  // other operand is zero there), so a NaN left in the padding would reach the result.
  padded.narrow(1, rows_, ld - rows_).zero_();
  return padded.narrow(1, 0, rows_);
}

at::Tensor gather_input(const at::Tensor& x, const Plan& plan) {
  at::Tensor rows = plan.ids.defined() ? at::index_select(x, 0, plan.ids) : x.contiguous();
  if (plan.scale == 1.0) return rows;
  return plan.ids.defined() ? rows.mul_(plan.scale) : rows.mul(plan.scale);
}

namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                   c10::string_view, c10::List<c10::optional<c10::Scalar>>,
                                   c10::optional<c10::string_view>);

// mkldnn::_linear_pointwise (X [rows, in], W [out, in], B [out]; no activation), or null where
// this torch has no such op or a different schema for it. Looked up once.
const c10::TypedOperatorHandle<LinearPointwise>* linear_pointwise() {
  static const auto handle = []() -> c10::optional<c10::TypedOperatorHandle<LinearPointwise>> {
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return c10::nullopt;
    try {
      return op->typed<LinearPointwise>();
    } catch (const c10::Error&) {  // another schema: keep the plain path
      return c10::nullopt;
    }
#else
    return c10::nullopt;
#endif
  }();
  return handle.has_value() ? &*handle : nullptr;
}

}  // namespace

bool fused_bias_gemm(const LayerDesc& d, const at::Tensor& u, at::ScalarType compute) {
  if (compute != at::kBFloat16 || d.groups != 1 || u.size(0) == 0 || u.stride(1) != 1) return false;
  // torch.backends.mkldnn.enabled = False (read per call) keeps the plain path.
  return at::globalContext().userEnabledMkldnn() && linear_pointwise() != nullptr;
}

at::Tensor gemm_with_fused_bias(const at::Tensor& u, const at::Tensor& weight, const at::Tensor& bias) {
  // weight[0] is [in, out]; its transposed view is the [out, in] the op takes (no copy made).
  return linear_pointwise()->call(u, weight[0].t(), bias.reshape({-1}), "none", c10::List<c10::optional<c10::Scalar>>(),
                                  c10::nullopt).contiguous();
}

void layer_gemm_forward(const LayerDesc& d, const at::Tensor& u, const at::Tensor& weight,
                        const at::Tensor& bias, at::Tensor& z) {
  const int64_t ag = d.in_per_group(), c = d.out_per_group();
  if (z.dim() == 3) {  // [g, rows, c]: one batched GEMM into contiguous group blocks
    const at::Tensor u_g = u.as_strided({d.groups, u.size(0), ag}, {ag * u.stride(1), u.stride(0), u.stride(1)});
    if (bias_in_epilogue(z.scalar_type())) {
      at::bmm_out(z, u_g, weight);
      return;
    }
    z.copy_(bias.reshape({d.groups, 1, c}).expand_as(z));
    at::baddbmm_out(z, z, u_g, weight);
    return;
  }
  const bool with_bias = !bias_in_epilogue(z.scalar_type());
  // One broadcast fill of every group's bias, then each GEMM accumulates onto its slice
  // (addmm with self = out copies nothing; addmm from the bias would copy it per group).
  if (with_bias) z.copy_(bias.reshape({1, d.out_features}).expand({z.size(0), d.out_features}));
  for (int64_t j = 0; j < d.groups; ++j) {
    at::Tensor z_j = z.narrow(1, j * c, c);
    if (with_bias) {
      at::addmm_out(z_j, z_j, u.narrow(1, j * ag, ag), weight[j]);
    } else {
      at::mm_out(z_j, u.narrow(1, j * ag, ag), weight[j]);
    }
  }
}

void transpose_16bit(const at::Tensor& src, at::Tensor& dst) {
  DK_CHECK(src.element_size() == 2 && dst.element_size() == 2 && src.stride(1) == 1 && dst.stride(1) == 1 &&
               dst.size(0) == src.size(1) && dst.size(1) == src.size(0),
           "src", "must be a 16-bit [rows, cols] tensor with unit column stride and dst its [cols, rows] buffer");
  const int64_t rows = src.size(0), cols = src.size(1), lds = src.stride(0), ldd = dst.stride(0);
  const auto* from = static_cast<const uint16_t*>(src.data_ptr());
  auto* to = static_cast<uint16_t*>(dst.data_ptr());
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (rows + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) {
    transpose16_rows(from, lds, to, ldd, t0 * kTile, std::min(rows, t1 * kTile), cols);
  });
}

void layer_gemm_backward(const LayerDesc& d, const at::Tensor& u, const at::Tensor& ut, const at::Tensor& gzt,
                         const at::Tensor& weight, const at::Tensor& gz, at::Tensor& grad_weight,
                         at::Tensor* grad_u) {
  const int64_t ag = d.in_per_group(), c = d.out_per_group();
  at::Tensor gwt = !ut.defined() && gzt.defined() ? at::empty({c, ag}, gz.options()) : at::Tensor();
  for (int64_t j = 0; j < d.groups; ++j) {
    const at::Tensor gz_j = gz.narrow(1, j * c, c);
    at::Tensor gw_j = grad_weight[j];
    if (ut.defined()) {
      at::mm_out(gw_j, ut.narrow(0, j * ag, ag), gz_j);
    } else if (gzt.defined()) {  // gw_j^T = gz_j^T u_j, then transposed into place
      at::mm_out(gwt, gzt.narrow(0, j * c, c), u.narrow(1, j * ag, ag));
      transpose_16bit(gwt, gw_j);
    } else {
      at::mm_out(gw_j, u.narrow(1, j * ag, ag).t(), gz_j);
    }
    if (grad_u) {
      at::Tensor gu_j = grad_u->narrow(1, j * ag, ag);
      at::mm_out(gu_j, gz_j, weight[j].t());
    }
  }
}

}  // namespace define_kernels::cpu
