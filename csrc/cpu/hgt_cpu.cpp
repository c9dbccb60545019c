// CPU implementation of the define_kernels_C ops (fp32, fp64, bf16 with fp32 accumulation and
// LayerNorm statistics, fp16 computed in fp32):
//   hgt_forward / hgt_backward            recompute policy: backward reruns the forward;
//   hgt_forward_saving / hgt_backward_saved  save policy: forward also returns the activations
//                                          backward needs (per layer its pre-norm rows and its
//                                          input buffer, see run_forward).
// Layer by layer over the whole batch: the grouped GEMMs of hgt_layers.h, then the fused
// epilogue of hgt_epilogue.h. The layer loop is generic over the layer table; with an in-proj
// (layer 0) its output x' is the stack input every later skip reads, and x' gathers the
// gradients of those reads before they go back through layer 0 to the map rows.
#include "buffer_pool.h"
#include "hgt_epilogue.h"
#include "hgt_layers.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace define_kernels::cpu {
namespace {

struct Inputs {
  Plan plan;
  at::Tensor x;
  std::vector<at::Tensor> params;  // detached, contiguous, in the compute type
  at::ScalarType io, compute;      // the tensors' dtype; the dtype the GEMMs run in
};

// fp16 runs in fp32: CPUs without AVX512-FP16 have no fp16 GEMM (ATen's fallback is slower
// than fp32), and fp32 GEMM outputs keep fp16's gradients within the reference's error.
at::ScalarType compute_type(at::ScalarType st) { return st == at::kHalf ? at::kFloat : st; }

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
  in.io = st;
  in.compute = compute_type(st);
  for (const auto& p : params) in.params.push_back(p.detach().to(in.compute).contiguous());
  return in;
}

#define DK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Runs the stack (output in the io type); with `keep`, also returns, in the compute type, saved = [pre_0, u_1, pre_1, ..., u_{L-1}, pre_{L-1}]
// (pre_l [rows, w_l]: pre-norm rows; u_l [rows, a_l]: layer l's input buffer, see hgt_layers.h).
std::tuple<at::Tensor, std::vector<at::Tensor>> run_forward(const Inputs& in, bool keep) {
  const Plan& plan = in.plan;
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  const at::Tensor xs = gather_input(in.x, plan).to(in.compute);
  std::vector<at::Tensor> saved;
  ScratchRows scratch(plan.rows, xs.options());  // GEMM outputs that are not kept
  at::Tensor u = xs;
  at::Tensor xstack = xs;  // the x of the skip reads: x' once the in-proj has run
  for (int64_t l = 0; l < L; ++l) {
    const auto& d = plan.layers[l];
    // Kept and unshuffled, the GEMM output is the saved pre-norm buffer itself (the epilogue
    // adds the bias in place); otherwise it is scratch shared by every layer. Not kept, a grouped
    // layer's output is scratch in [g, rows, c] blocks: one bmm with contiguous outputs beats a
    // GEMM per group into column slices, but not when the pre-norm rows must be stored as well.
    const bool z_is_pre = keep && !plan.shuffled[l];
    const at::Tensor& weight = in.params[d.param_offset];
    const at::Tensor& bias = in.params[d.param_offset + 1];
    at::Tensor z;
    if (fused_bias_gemm(d, u, in.compute)) {
      z = gemm_with_fused_bias(u, weight, bias);
    } else {
      z = z_is_pre ? pooled_rows(plan.rows, d.out_features, xs.options()) : scratch.rows_of(0, d.out_features);
      if (!keep && d.groups > 1) z = z.view({d.groups, plan.rows, d.out_per_group()});
      layer_gemm_forward(d, u, weight, bias, z);
    }
    const bool last = l == L - 1;
    // The stack's output is a fresh tensor; the layer inputs and pre-norm rows are pooled (but
    // for gemm_with_fused_bias's fresh output, which is a kept layer's pre-norm rows itself).
    at::Tensor next = last ? at::empty({plan.rows, d.out_features}, xs.options())
                           : pooled_rows(plan.rows, plan.layers[l + 1].in_features, xs.options());
    at::Tensor pre = keep ? (z_is_pre ? z : pooled_rows(plan.rows, d.out_features, xs.options())) : at::Tensor();
    const bool copy_x = !last && !plan.xcol[l + 1].empty();
    RECORD_FUNCTION("define_kernels::cpu::epilogue_forward", {});  // a profiler scope
    DK_DISPATCH(xs.scalar_type(), "hgt_epilogue_forward", [&] {
      const auto out = last ? columns<scalar_t>(next) : columns<scalar_t>(next, &plan.hcol[l + 1]);
      const auto x_out = copy_x ? columns<scalar_t>(next, &plan.xcol[l + 1]) : Columns<scalar_t>{};
      epilogue_forward<scalar_t>(plan, l, in.params, z, out, keep ? &pre : nullptr,
                                 copy_x ? &xstack : nullptr, x_out);
    });
    if (keep) {
      if (l > 0) saved.push_back(u);
      saved.push_back(pre);
    }
    u = next;
    if (l == 0 && plan.in_proj) xstack = next;  // u_1 = x' [rows, p] (identity layout)
  }
  return {u.to(in.io), saved};
}

void check_saved(const Inputs& in, const std::vector<at::Tensor>& saved) {
  const Plan& plan = in.plan;
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  DK_CHECK(static_cast<int64_t>(saved.size()) == 2 * L - 1, "saved", "must hold ", 2 * L - 1,
           " tensors for these layers, got ", saved.size());
  for (int64_t k = 0; k < 2 * L - 1; ++k) {
    const auto& d = plan.layers[(k + 1) / 2];
    const int64_t width = k % 2 == 0 ? d.out_features : d.in_features;
    DK_CHECK(saved[k].dim() == 2 && saved[k].size(0) == plan.rows && saved[k].size(1) == width,
             indexed("saved", k), "must have shape [", plan.rows, ", ", width, "], got ", saved[k].sizes());
    check_same_place(saved[k], in.x, indexed("saved", k));
  }
}

// Backward from the kept activations (as run_forward(keep=true) returns them).
std::tuple<at::Tensor, std::vector<at::Tensor>> run_backward(const Inputs& in, const at::Tensor& grad_y,
                                                             const std::vector<at::Tensor>& saved) {
  const Plan& plan = in.plan;
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  const at::Tensor xs = gather_input(in.x, plan).to(in.compute);
  std::vector<at::Tensor> grad_params;
  for (const auto& p : in.params) grad_params.push_back(at::empty_like(p));
  const auto acc_type = xs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_acc = at::zeros({plan.rows, plan.p}, xs.options().dtype(acc_type));
  at::Tensor gh = grad_y.to(in.compute).contiguous();  // gradient of layer l's output, seen through hcol[l + 1]
  at::Tensor grad_rows;
  ScratchRows scratch(plan.rows, xs.options());  // slot 0: gz; slots 1, 2: gu, alternating; 3: u^T or gz^T
  const bool transposed_copies = wgrad_from_transposed_copy(in.compute);
  for (int64_t l = L - 1; l >= 0; --l) {
    const auto& d = plan.layers[l];
    const bool in_proj = l == 0 && plan.in_proj;
    if (in_proj)  // x' = the in-proj's output: layer 1's read (gh) plus every skip read (grad_acc)
      gh = grad_acc.add_(gh.to(acc_type)).to(in.compute).contiguous();
    const at::Tensor pre = saved[2 * l].to(in.compute).contiguous();
    const at::Tensor u = l > 0 ? saved[2 * l - 1].to(in.compute).contiguous() : xs;
    at::Tensor gz = scratch.rows_of(0, d.out_features);
    RECORD_FUNCTION("define_kernels::cpu::epilogue_backward", {});  // a profiler scope
    DK_DISPATCH(xs.scalar_type(), "hgt_epilogue_backward", [&] {
      const auto src = l == L - 1 ? columns<scalar_t>(gh) : columns<scalar_t>(gh, &plan.hcol[l + 1]);
      epilogue_backward<scalar_t>(plan, l, in.params, src, pre, gz, grad_params);
    });
    at::Tensor gu = scratch.rows_of(1 + l % 2, d.in_features);
    at::Tensor ut, gzt;  // with transposed copies: u^T or gz^T, whichever is narrower
    if (transposed_copies) {
      RECORD_FUNCTION("define_kernels::cpu::transposed_copy", {});  // a profiler scope
      const bool of_gz = d.out_features < d.in_features;
      at::Tensor& copy = of_gz ? gzt : ut;
      copy = scratch.transposed_of(3, of_gz ? d.out_features : d.in_features);
      transpose_16bit(of_gz ? gz : u, copy);
    }
    layer_gemm_backward(d, u, ut, gzt, in.params[d.param_offset], gz, grad_params[d.param_offset], &gu);
    if (in_proj) {
      grad_rows = gu.to(acc_type, /*non_blocking=*/false, /*copy=*/true);  // gu is call scratch
    } else if (l == 0 || !plan.xcol[l].empty()) {
      RECORD_FUNCTION("define_kernels::cpu::input_grad", {});  // a profiler scope
      DK_DISPATCH(xs.scalar_type(), "hgt_input_grad", [&] {
        add_input_grad<scalar_t>(plan, l == 0 ? columns<scalar_t>(gu) : columns<scalar_t>(gu, &plan.xcol[l]),
                                 grad_acc.data_ptr<at::opmath_type<scalar_t>>());
      });
    }
    gh = gu;
  }
  if (!plan.in_proj) grad_rows = grad_acc;
  if (plan.scale != 1.0) grad_rows.mul_(plan.scale);
  for (auto& g : grad_params) g = g.to(in.io);
  return {grad_rows.to(in.io), grad_params};
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
  auto [y, saved] = run_forward(in, /*keep=*/true);
  for (auto& t : saved) t = t.to(in.io);
  return {y, saved};
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
  check_saved(in, kept);
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
