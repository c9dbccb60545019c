// CPU implementation of define_kernels_C::hgt_forward / hgt_backward (fp32, fp64).
//
// Rows are cut into tiles (hgt_tile.h) and the tiles into one contiguous chunk per thread.
// Forward writes disjoint output rows. Backward gives every chunk its own parameter-gradient
// buffers and sums them in chunk order afterwards, so a run is deterministic for a given thread
// count (no atomics, no order-dependent accumulation).
#include "hgt_tile.h"

#include <define_kernels/checks.h>
#include <define_kernels/dropout_hash.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace define_kernels::cpu {
namespace {


struct Prepared {
  at::Tensor x, ids;  // contiguous; ids int64 or undefined
  std::vector<at::Tensor> params;
  std::vector<LayerDesc> layers;
  int64_t rows;
};

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
                 c10::IntArrayRef layers, double dropout, int64_t seed) {
  auto descs = check_hgt_args(x, ids, params, layers, dropout, seed);
  DK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x",
           "must be float32 or float64 for the CPU implementation, got ", x.scalar_type());
  // Detached: the per-tile matmuls write into views (mm out=), which autograd refuses for
  // inputs that require grad; this op is differentiated by its Python autograd rule instead.
  Prepared out;
  out.x = x.detach().contiguous();
  if (ids.has_value()) {
    check_ids_in_range(*ids, x.size(0));
    out.ids = ids->to(at::kLong).contiguous();
    out.rows = ids->size(0);
  } else {
    out.rows = x.size(0);
  }
  for (const auto& p : params) out.params.push_back(p.detach().contiguous());
  out.layers = std::move(descs);
  return out;
}

// Rows per tile: every tile streams all weights once, so the tile grows with the weight bytes
// (one row per 64 KiB of weights: 128 rows for wt2-small, 512 for wt103-deep), from 128 to 512.
// Measured on a 2-core EPYC (Zen 4), 16..1024 rows: below 128 the per-group matmuls starve (and
// backward re-reads dW per tile); wide stacks gain a little from more rows.
int64_t tile_rows(const Prepared& prep) {
  int64_t weight_bytes = 0;
  for (const auto& p : prep.params) weight_bytes += p.numel() * p.element_size();
  int64_t rows = 128;
  while (rows < 512 && rows * 65536 < weight_bytes) rows *= 2;
  return rows;
}

// Output position -> pre-shuffle position of layer l ([g, c] -> transpose -> flatten).
std::vector<int64_t> output_permutation(const LayerDesc& d, bool shuffle) {
  std::vector<int64_t> perm(d.out_features);
  const int64_t g = d.groups, c = d.out_per_group();
  for (int64_t f = 0; f < d.out_features; ++f) perm[f] = shuffle ? (f % g) * c + f / g : f;
  return perm;
}

template <typename T>
StackArgs<T> stack_args(const Prepared& prep, bool shuffle, double dropout, double scale, int64_t seed) {
  StackArgs<T> args;
  args.x = prep.x.data_ptr<T>();
  args.ids = prep.ids.defined() ? prep.ids.data_ptr<int64_t>() : nullptr;
  for (const auto& p : prep.params) args.params.push_back(p.data_ptr<T>());
  args.layers = prep.layers;
  for (const auto& d : prep.layers) {
    args.weights.push_back(prep.params[d.param_offset]);
    args.perm.push_back(output_permutation(d, shuffle));
  }
  args.p = prep.x.size(1);
  args.scale = static_cast<T>(scale);
  args.dropout_on = seed >= 0 && dropout > 0.0;
  args.threshold = dropout_threshold(dropout);
  args.keep_scale = static_cast<T>(1.0 / (1.0 - dropout));
  args.seed = seed;
  return args;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor hgt_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& ids,
                           at::TensorList params, c10::IntArrayRef layers, bool shuffle,
                           double dropout, double scale, int64_t seed) {
  const Prepared prep = prepare(x, ids, params, layers, dropout, seed);
  const int64_t m = prep.layers.back().out_features;
  at::Tensor y = at::empty({prep.rows, m}, x.options());
  const int64_t tile = tile_rows(prep);
  const int64_t tiles = ceil_div(prep.rows, tile);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hgt_forward_cpu", [&] {
    const auto args = stack_args<scalar_t>(prep, shuffle, dropout, scale, seed);
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      HgtTile<scalar_t> runner(args, tile, /*record=*/false);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r0 = i * tile, n = std::min(tile, prep.rows - r0);
        runner.forward(r0, n, out + r0 * m);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> hgt_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& ids,
    at::TensorList params, c10::IntArrayRef layers, bool shuffle, double dropout, double scale,
    int64_t seed) {
  const Prepared prep = prepare(x, ids, params, layers, dropout, seed);
  check_grad_y(grad_y, x, prep.rows, prep.layers.back().out_features);
  const at::Tensor gy = grad_y.detach().contiguous();
  at::Tensor grad_rows = at::empty({prep.rows, x.size(1)}, x.options());
  const int64_t tile = tile_rows(prep);
  const int64_t tiles = ceil_div(prep.rows, tile);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  std::vector<std::vector<at::Tensor>> partial(chunks);
  for (auto& grads : partial)
    for (const auto& p : prep.params) grads.push_back(at::zeros_like(p));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hgt_backward_cpu", [&] {
    const auto args = stack_args<scalar_t>(prep, shuffle, dropout, scale, seed);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      HgtTile<scalar_t> runner(args, tile, /*record=*/true);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        GradBuffers<scalar_t> grads{partial[chunk], {}};
        for (auto& g : grads.grads) grads.ptrs.push_back(g.data_ptr<scalar_t>());
        for (int64_t i = chunk * tiles / chunks; i < (chunk + 1) * tiles / chunks; ++i) {
          const int64_t r0 = i * tile, n = std::min(tile, prep.rows - r0);
          runner.backward(r0, n, gy.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(), grads);
        }
      }
    });
  });
  std::vector<at::Tensor> grad_params = partial[0];
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (size_t i = 0; i < grad_params.size(); ++i) grad_params[i].add_(partial[chunk][i]);
  return {grad_rows, grad_params};
}

}  // namespace
}  // namespace define_kernels::cpu

TORCH_LIBRARY_IMPL(define_kernels_C, CPU, m) {
  m.impl("hgt_forward", &define_kernels::cpu::hgt_forward_cpu);
  m.impl("hgt_backward", &define_kernels::cpu::hgt_backward_cpu);
}
