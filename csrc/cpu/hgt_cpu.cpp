// CPU implementation of the define_kernels_C ops (fp32, fp64, bf16, fp16; compute in fp32 for
// the 16-bit types, LayerNorm statistics in fp32):
//   hgt_forward / hgt_backward            recompute policy: backward reruns the forward;
//   hgt_forward_saving / hgt_backward_saved  save policy: forward also returns the activations
//                                          backward needs (per layer the pre-norm rows, and the
//                                          output of every layer but the last).
// Layer by layer over the whole batch: the grouped GEMMs of hgt_layers.h, then the fused
// epilogue of hgt_epilogue.h. The layer loop is generic over the layer table.
#include "hgt_epilogue.h"
#include "hgt_layers.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace define_kernels::cpu {
namespace {

struct Inputs {
  Plan plan;
  at::Tensor x;
  std::vector<at::Tensor> params;  // detached, contiguous
};

Inputs prepare(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
               c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed) {
  Inputs in;
  in.plan = make_plan(x, ids, params, layers, shuffle, dropout, scale, seed);
  const auto st = x.scalar_type();
  DK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, "x",
           "must be float32, float64, bfloat16 or float16 for the CPU implementation, got ", st);
  // Detached: the GEMMs write into views (mm out=), which autograd refuses for inputs that
  // require grad; these ops are differentiated by their Python autograd rules instead.
  in.x = x.detach();
  for (const auto& p : params) in.params.push_back(p.detach().contiguous());
  return in;
}

// Runs the stack; with `keep`, returns [pre_0, h_0, pre_1, h_1, ..., pre_{L-1}] too.
std::tuple<at::Tensor, std::vector<at::Tensor>> run_forward(const Inputs& in, bool keep) {
  const Plan& plan = in.plan;
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  const at::Tensor xs = gather_input(in.x, plan);
  std::vector<at::Tensor> saved;
  at::Tensor h_prev;
  for (int64_t l = 0; l < L; ++l) {
    const auto& d = plan.layers[l];
    at::Tensor z = at::empty({plan.rows, d.out_features}, xs.options());
    layer_gemm_forward(plan, l, xs, h_prev, in.params[d.param_offset], z);
    at::Tensor h = at::empty_like(z);
    at::Tensor pre = keep ? at::empty_like(z) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "hgt_epilogue_forward", [&] {
      epilogue_forward<scalar_t>(plan, l, in.params, z, h, keep ? &pre : nullptr);
    });
    if (keep) {
      saved.push_back(pre);
      if (l < L - 1) saved.push_back(h);
    }
    h_prev = h;
  }
  return {h_prev, saved};
}

// Backward from the kept activations (saved as run_forward(keep=true) returns them).
std::tuple<at::Tensor, std::vector<at::Tensor>> run_backward(const Inputs& in, const at::Tensor& grad_y,
                                                             const std::vector<at::Tensor>& saved) {
  const Plan& plan = in.plan;
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  DK_CHECK(static_cast<int64_t>(saved.size()) == 2 * L - 1, "saved", "must hold ", 2 * L - 1,
           " tensors for these layers, got ", saved.size());
  for (int64_t l = 0; l < L; ++l) {
    const int64_t w = plan.layers[l].out_features;
    for (int64_t k = 2 * l; k <= std::min(2 * l + 1, 2 * L - 2); ++k) {
      DK_CHECK(saved[k].dim() == 2 && saved[k].size(0) == plan.rows && saved[k].size(1) == w,
               indexed("saved", k), "must have shape [", plan.rows, ", ", w, "], got ", saved[k].sizes());
      check_same_place(saved[k], in.x, indexed("saved", k));
    }
  }
  const at::Tensor xs = gather_input(in.x, plan);
  std::vector<at::Tensor> grad_params;
  for (const auto& p : in.params) grad_params.push_back(at::empty_like(p));
  at::Tensor grad_xs = at::zeros_like(xs);
  at::Tensor gh = grad_y.contiguous();
  for (int64_t l = L - 1; l >= 0; --l) {
    const auto& d = plan.layers[l];
    const at::Tensor pre = saved[2 * l].contiguous();
    const at::Tensor h_prev = l > 0 ? saved[2 * l - 1].contiguous() : at::Tensor();
    at::Tensor gz = at::empty_like(pre);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "hgt_epilogue_backward", [&] {
      epilogue_backward<scalar_t>(plan, l, in.params, gh, pre, gz, grad_params);
    });
    at::Tensor grad_prev = l > 0 ? at::empty_like(h_prev) : at::Tensor();
    layer_gemm_backward(plan, l, xs, h_prev, in.params[d.param_offset], gz,
                        grad_params[d.param_offset], grad_xs, grad_prev);
    gh = grad_prev;
  }
  if (plan.scale != 1.0) grad_xs.mul_(plan.scale);
  return {grad_xs, grad_params};
}

at::Tensor hgt_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& ids,
                           at::TensorList params, c10::IntArrayRef layers, bool shuffle,
                           double dropout, double scale, int64_t seed) {
  const Inputs in = prepare(x, ids, params, layers, shuffle, dropout, scale, seed);
  return std::get<0>(run_forward(in, /*keep=*/false));
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hgt_forward_saving_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
    c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed) {
  const Inputs in = prepare(x, ids, params, layers, shuffle, dropout, scale, seed);
  return run_forward(in, /*keep=*/true);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hgt_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& ids,
    at::TensorList params, c10::IntArrayRef layers, bool shuffle, double dropout, double scale,
    int64_t seed) {
  const Inputs in = prepare(x, ids, params, layers, shuffle, dropout, scale, seed);
  check_grad_y(grad_y, x, in.plan.rows, in.plan.layers.back().out_features);
  const auto saved = std::get<1>(run_forward(in, /*keep=*/true));
  return run_backward(in, grad_y.detach(), saved);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hgt_backward_saved_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& ids,
    at::TensorList params, at::TensorList saved, c10::IntArrayRef layers, bool shuffle,
    double dropout, double scale, int64_t seed) {
  const Inputs in = prepare(x, ids, params, layers, shuffle, dropout, scale, seed);
  check_grad_y(grad_y, x, in.plan.rows, in.plan.layers.back().out_features);
  std::vector<at::Tensor> kept;
  for (const auto& s : saved) kept.push_back(s.detach());
  return run_backward(in, grad_y.detach(), kept);
}

}  // namespace
}  // namespace define_kernels::cpu

TORCH_LIBRARY_IMPL(define_kernels_C, CPU, m) {
  m.impl("hgt_forward", &define_kernels::cpu::hgt_forward_cpu);
  m.impl("hgt_backward", &define_kernels::cpu::hgt_backward_cpu);
  m.impl("hgt_forward_saving", &define_kernels::cpu::hgt_forward_saving_cpu);
  m.impl("hgt_backward_saved", &define_kernels::cpu::hgt_backward_saved_cpu);
}
