// CUDA implementation of define_kernels_C::hgt_forward / hgt_backward (fp32, fp16, bf16).
//
// Checks the arguments (checks.h: every error names its argument, before any kernel), allocates
// the outputs and one workspace through torch's caching allocator, and calls the raw-pointer
// launchers of hgt_kernels.cu on the current stream of x's device. The backward is deterministic
// (no atomics: every reduction runs in a fixed order), so it needs no determinism guard.
#include "hgt_kernels.cuh"

#include <define_kernels/checks.h>
#include <define_kernels/dropout_hash.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // = at::cuda::getCurrentCUDAStream, without cuBLAS headers
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace define_kernels::cuda {
namespace {

struct Prepared {
  std::vector<LayerDesc> layers;
  at::Tensor ids;                  // contiguous int32/int64, or undefined
  std::vector<at::Tensor> params;  // contiguous: the kernels index them densely
  int64_t rows;
};

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
                 c10::IntArrayRef layers, double dropout, int64_t seed) {
  Prepared out;
  out.layers = check_hgt_args(x, ids, params, layers, dropout, seed);
  DK_CHECK(x.is_cuda(), "x", "must be a CUDA tensor for the CUDA implementation, got ", x.device());
  const auto dtype = x.scalar_type();
  DK_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "x",
           "must be float32, float16 or bfloat16 for the CUDA implementation, got ", dtype);
  DK_CHECK(static_cast<int64_t>(out.layers.size()) <= dk_cuda::kMaxLayers, "layers",
           "the CUDA kernels take at most ", dk_cuda::kMaxLayers, " layers, got ", out.layers.size());
  // Widths and per-token offsets are int32 inside a tile; token offsets are int64 everywhere.
  constexpr int64_t kMaxWidth = int64_t(1) << 24;
  DK_CHECK(x.size(1) < kMaxWidth, "x", "width ", x.size(1), " is too large for the CUDA kernels");
  for (const auto& d : out.layers)
    DK_CHECK(d.in_features < kMaxWidth && d.out_features < kMaxWidth, "layers", "width ",
             std::max(d.in_features, d.out_features), " is too large for the CUDA kernels");
  if (ids.has_value()) {
    check_ids_in_range(*ids, x.size(0));
    out.ids = ids->contiguous();
    out.rows = ids->size(0);
  } else {
    out.rows = x.size(0);
  }
  DK_CHECK(out.rows < std::numeric_limits<int32_t>::max() - 64, ids.has_value() ? "ids" : "x",
           "has ", out.rows, " rows; the CUDA kernels take fewer than 2^31 tokens per call");
  for (const auto& p : params) out.params.push_back(p.contiguous());
  return out;
}

dk_cuda::HgtStack make_stack(const Prepared& prep, int64_t in_dim, bool shuffle, double dropout,
                             double scale, int64_t seed) {
  dk_cuda::HgtStack st{};
  st.num_layers = static_cast<int>(prep.layers.size());
  st.in_dim = static_cast<int>(in_dim);
  st.shuffle = shuffle ? 1 : 0;
  st.scale = static_cast<float>(scale);
  st.dropout_on = seed >= 0 && dropout > 0.0;
  st.seed = static_cast<uint32_t>(std::max<int64_t>(seed, 0));
  st.drop_threshold = dropout_threshold(dropout);
  st.keep_prob = static_cast<float>(1.0 - dropout);  // the reference divides by (1 - p)
  for (int l = 0; l < st.num_layers; ++l) {
    const LayerDesc& d = prep.layers[l];
    dk_cuda::HgtLayer& L = st.layers[l];
    L.weight = prep.params[d.param_offset].data_ptr();
    L.bias = prep.params[d.param_offset + 1].data_ptr();
    L.norm_weight = d.has_norm ? prep.params[d.param_offset + 2].data_ptr() : nullptr;
    L.norm_bias = d.has_norm ? prep.params[d.param_offset + 3].data_ptr() : nullptr;
    L.in_features = static_cast<int>(d.in_features);
    L.out_features = static_cast<int>(d.out_features);
    L.groups = static_cast<int>(d.groups);
    L.input_kind = static_cast<int>(d.input_kind);
    L.has_norm = d.has_norm ? 1 : 0;
    L.act = static_cast<int>(d.act);
    st.max_width = std::max(st.max_width, L.out_features);
  }
  return st;
}

dk_cuda::HgtRows make_rows(const at::Tensor& x, const Prepared& prep) {
  dk_cuda::HgtRows rows{};
  rows.x = x.data_ptr();  // strided reads: a table is never copied
  rows.x_stride0 = x.stride(0);
  rows.x_stride1 = x.stride(1);
  rows.ids = prep.ids.defined() ? prep.ids.data_ptr() : nullptr;
  rows.ids_are_64bit = prep.ids.defined() && prep.ids.scalar_type() == at::kLong;
  rows.rows = prep.rows;
  return rows;
}

void check_cuda(cudaError_t status, const char* op, const char* step) {
  TORCH_CHECK(status == cudaSuccess, "define_kernels_C::", op, " (CUDA): ", step, " failed: ",
              cudaGetErrorString(status));
}

at::Tensor byte_buffer(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Runs `body` with T the CUDA type of x's dtype (prepare() admitted only these three).
template <typename Body>
void dispatch_dtype(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(__half{}); break;
    case at::kBFloat16: body(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "unreachable dtype ", dtype);
  }
}

at::Tensor hgt_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& ids,
                            at::TensorList params, c10::IntArrayRef layers, bool shuffle,
                            double dropout, double scale, int64_t seed) {
  const Prepared prep = prepare(x, ids, params, layers, dropout, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({prep.rows, prep.layers.back().out_features}, x.options());
  if (prep.rows == 0) return y;
  const auto st = make_stack(prep, x.size(1), shuffle, dropout, scale, seed);
  const auto rows = make_rows(x, prep);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dk_cuda::HgtForwardPlan plan{};
    check_cuda(dk_cuda::plan_hgt_forward<T>(st, prep.rows, &plan), "hgt_forward", "planning");
    at::Tensor workspace;  // kept alive until the launch is enqueued; the allocator is stream-ordered
    if (plan.workspace_bytes > 0) workspace = byte_buffer(x, plan.workspace_bytes);
    check_cuda(dk_cuda::launch_hgt_forward<T>(st, rows, y.data_ptr(), plan,
                                              workspace.defined() ? workspace.data_ptr() : nullptr,
                                              stream),
               "hgt_forward", "kernel launch");
  });
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hgt_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& ids,
    at::TensorList params, c10::IntArrayRef layers, bool shuffle, double dropout, double scale,
    int64_t seed) {
  const Prepared prep = prepare(x, ids, params, layers, dropout, seed);
  check_grad_y(grad_y, x, prep.rows, prep.layers.back().out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_rows = at::empty({prep.rows, x.size(1)}, x.options());
  std::vector<at::Tensor> grad_params;
  if (prep.rows == 0) {  // no tokens: nothing flows back
    for (const auto& p : prep.params) grad_params.push_back(at::zeros(p.sizes(), p.options()));
    return {grad_rows, grad_params};
  }
  for (const auto& p : prep.params) grad_params.push_back(at::empty(p.sizes(), p.options()));
  std::vector<void*> grad_ptrs;
  for (auto& g : grad_params) grad_ptrs.push_back(g.data_ptr());
  const at::Tensor gy = grad_y.contiguous();
  const auto st = make_stack(prep, x.size(1), shuffle, dropout, scale, seed);
  const auto rows = make_rows(x, prep);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    size_t bytes = 0;
    check_cuda(dk_cuda::hgt_backward_workspace_bytes<T>(st, prep.rows, &bytes), "hgt_backward",
               "planning");
    at::Tensor workspace = byte_buffer(x, bytes);
    check_cuda(dk_cuda::launch_hgt_backward<T>(st, rows, gy.data_ptr(), grad_rows.data_ptr(),
                                               grad_ptrs.data(), workspace.data_ptr(), bytes, stream),
               "hgt_backward", "kernel launch");
  });
  return {grad_rows, grad_params};
}

}  // namespace
}  // namespace define_kernels::cuda

TORCH_LIBRARY_IMPL(define_kernels_C, CUDA, m) {
  m.impl("hgt_forward", &define_kernels::cuda::hgt_forward_cuda);
  m.impl("hgt_backward", &define_kernels::cuda::hgt_backward_cuda);
}
