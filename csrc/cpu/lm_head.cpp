// CPU implementation of the fused LM-head loss (lm_head_forward / lm_head_backward /
// lm_head_workspace_bytes; math: docs SPEC §4b, epilogues: lm_head_epilogue.h).
//
// Never holds a [T, V] matrix. The vocabulary is cut into tiles of tile_cols rows of E and split
// into one contiguous range of tiles per partition (one partition per thread, fixed at the
// call's thread count so results are bitwise reproducible). Per tile: the tile of E is cast to
// the compute dtype with the padding row zeroed (so the padding logit is the bias alone and its
// rows never reach the other gradients), z = x E_tileᵀ for all T tokens through one ATen GEMM
// (single-threaded inside the parallel region), then one epilogue over the tile. Forward: each
// partition keeps its own online-softmax statistics; they are merged in partition order.
// Backward: z is recomputed, dz formed in place, and grad_table's rows of the tile = dzᵀ x (one
// GEMM with K = T) are written by the tile's partition alone; grad_x is accumulated per partition
// (fp32) and the partials are summed in partition order at the end.
// All scratch lives in one pooled buffer laid out by Layout, whose size lm_head_workspace_bytes
// reports: it grows with T and the thread count, never with V.
// This is the ATen path. bf16 compute on a CPU with AMX takes the brgemm path instead
// (lm_head_brgemm.cpp: token chunks, fp32 logits kept in L2); torch.backends.mkldnn.enabled =
// False keeps this one.
#include "buffer_pool.h"
#include "lm_head_brgemm.h"
#include "lm_head_epilogue.h"
#include "lm_head_workspace.h"

#include <define_kernels/checks.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace define_kernels::cpu::lm_head {
namespace {

#define LM_CHECK(cond, arg, ...) TORCH_CHECK(cond, arg, " ", __VA_ARGS__)

// Vocabulary rows per tile. fp32 (MKL sgemm) is fastest at 128: its [T, 128] logits stay in
// L2. The 16-bit GEMMs (oneDNN) pay a per-call overhead and their [T, n] grad_x product must be
// added to the fp32 partial, so fewer, wider tiles win: 512 used 37% less CPU time than 128 and
// 11% less than 256 (bf16, T = 4096, V = 65,536, n = 128, fwd + bwd; fp32: 128 < 256 by 4%,
// < 512 by 10%).
int64_t tile_cols(at::ScalarType compute) { return compute == at::kFloat ? 128 : 512; }
static_assert(kMaxTileCols >= 512, "the epilogues' row buffers hold one tile");

// Byte offsets of the workspace slots. Shared: x and u (the distinct targets' rows of E, at most
// T) in the compute dtype, lse(s/τ) per distinct target (fp32). Per partition: z and s tiles
// [T, cols] (compute), the target rows y of the augmented loss [T, cols] (fp32; s itself for fp32
// compute) and their rescale factors [T], the E tile and the grad_table tile [cols, n]
// (compute), bias tile and column sums [cols] (fp32), statistics [Stats::kCount, T] (fp32), the
// grad_x partial [T, n] (fp32) and, for 16-bit compute, the GEMM's [T, n] output before it is
// added to the partial.
struct Layout : WorkspaceLayout {
  int64_t x = 0, u = 0, lse_s = 0;
  int64_t z = 0, s = 0, y = 0, scale = 0, e = 0, gt = 0, bias = 0, sums = 0, stats = 0, dx = 0, dx16 = 0;
};

Layout make_layout(int64_t tokens, int64_t width, bool augmented, at::ScalarType compute, int64_t partitions) {
  const int64_t cs = static_cast<int64_t>(c10::elementSize(compute)), fs = 4, cols = tile_cols(compute);
  Layout L;
  SlotPlan plan;
  L.x = plan.slot(tokens * width * cs);
  L.u = plan.slot(augmented ? tokens * width * cs : 0);
  L.lse_s = plan.slot(augmented ? tokens * fs : 0);
  plan.begin_partition();
  L.z = plan.slot(tokens * cols * cs);
  L.s = plan.slot(augmented ? tokens * cols * cs : 0);
  L.y = compute == at::kFloat ? L.s : plan.slot(augmented ? tokens * cols * fs : 0);
  L.scale = plan.slot(augmented ? tokens * fs : 0);
  L.e = plan.slot(cols * width * cs);
  L.gt = plan.slot(cols * width * cs);
  L.bias = plan.slot(cols * fs);
  L.sums = plan.slot(cols * fs);
  L.stats = plan.slot(Stats::kCount * tokens * fs);
  L.dx = plan.slot(tokens * width * fs);
  L.dx16 = plan.slot(compute == at::kFloat ? 0 : tokens * width * cs);
  plan.finish(L, partitions);
  return L;
}

int64_t partitions() { return std::max<int64_t>(1, at::get_num_threads()); }

// A [rows, cols] view of dtype `type` at byte offset `at` of the workspace.
at::Tensor slot_view(const at::Tensor& ws, int64_t at, int64_t rows, int64_t cols, at::ScalarType type) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(type));
  return ws.narrow(0, at, bytes).view(type).view({rows, cols});
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

Args check_args(const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& bias,
                const at::Tensor& targets, int64_t padding_idx, double label_smoothing, double z_loss,
                bool augmented, double kl_coef, double tau, at::ScalarType compute) {
  LM_CHECK(x.dim() == 2, "x", "must be 2-D [tokens, width], got ", x.dim(), " dims");
  LM_CHECK(table.dim() == 2, "table", "must be 2-D [vocab, width], got ", table.dim(), " dims");
  LM_CHECK(table.size(1) == x.size(1), "table", "has width ", table.size(1), " but x has ", x.size(1));
  LM_CHECK(table.size(0) >= 1, "table", "must have at least one row");
  LM_CHECK(is_float_type(x.scalar_type()), "x", "must be float32, bfloat16 or float16, got ", x.scalar_type());
  LM_CHECK(is_float_type(table.scalar_type()), "table", "must be float32, bfloat16 or float16, got ",
           table.scalar_type());
  LM_CHECK(is_float_type(compute), "compute_dtype", "must be float32, bfloat16 or float16, got ", compute);
  LM_CHECK(table.device() == x.device(), "table", "is on ", table.device(), " but x is on ", x.device());
  const int64_t V = table.size(0), T = x.size(0);
  if (bias.has_value()) {
    LM_CHECK(bias->dim() == 1 && bias->size(0) == V, "bias", "must have shape [", V, "], got ", bias->sizes());
    LM_CHECK(is_float_type(bias->scalar_type()), "bias", "must be float32, bfloat16 or float16, got ",
             bias->scalar_type());
    LM_CHECK(bias->device() == x.device(), "bias", "is on ", bias->device(), " but x is on ", x.device());
  }
  LM_CHECK(targets.dim() == 1 && targets.size(0) == T, "targets", "must have shape [", T, "], got ",
           targets.sizes());
  LM_CHECK(targets.scalar_type() == at::kLong, "targets", "must be int64, got ", targets.scalar_type());
  LM_CHECK(targets.device() == x.device(), "targets", "is on ", targets.device(), " but x is on ", x.device());
  if (T > 0) {
    auto [low, high] = at::aminmax(targets);
    const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
    LM_CHECK(lo >= 0 && hi < V, "targets", "contains ", lo < 0 ? lo : hi, ", outside [0, ", V, ")");
  }
  LM_CHECK(padding_idx >= -1 && padding_idx < V, "padding_idx", "must be -1 or in [0, ", V, "), got ",
           padding_idx);
  LM_CHECK(tau > 0.0, "tau", "must be > 0, got ", tau);
  LM_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing", "must be in [0, 1], got ",
           label_smoothing);
  const Coefs c{static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                augmented ? static_cast<float>(kl_coef) : 0.0f, static_cast<float>(1.0 / tau), V};
  return {T, x.size(1), V, padding_idx, augmented, compute, c};
}

// dst[i] = table[ids ? ids[i] : first + i] cast to dst's dtype, the padding row as zeros.
template <typename D, typename S>
void copy_rows(D* dst, const S* table, const int64_t* ids, int64_t first, int64_t rows, int64_t width,
               int64_t pad) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t v = ids ? ids[i] : first + i;
    D* out = dst + i * width;
    if (v == pad) {
      std::fill(out, out + width, D(0));
      continue;
    }
    const S* in = table + v * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) out[k] = to_storage<D>(static_cast<float>(in[k]));
  }
}

#define LM_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void copy_rows(const at::Tensor& dst, const at::Tensor& table, const int64_t* ids, int64_t first, int64_t rows,
               int64_t pad) {
  LM_DISPATCH(dst.scalar_type(), "lm_head_copy_rows", [&] {
    using D = scalar_t;
    LM_DISPATCH(table.scalar_type(), "lm_head_copy_rows", [&] {
      copy_rows(dst.data_ptr<D>(), table.data_ptr<scalar_t>(), ids, first, rows, table.size(1), pad);
    });
  });
}

// Inputs in the layout the tiles read, and the workspace.
struct Prepared {
  Args args;
  Layout layout;
  at::Tensor ws, x, table, bias, targets, u;  // x, u: compute dtype, in ws
  const DistinctTargets* distinct = nullptr;  // augmented only
  int64_t parts = 1, tile_cols = 0, tiles = 0;

  float* f32(int64_t offset) const { return reinterpret_cast<float*>(ws.data_ptr<uint8_t>() + offset); }
};

Prepared prepare(const Args& args, const at::Tensor& x, const at::Tensor& table,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const DistinctTargets& distinct) {
  Prepared p;
  p.args = args;
  p.distinct = &distinct;
  p.parts = partitions();
  p.tile_cols = tile_cols(args.compute);
  p.tiles = (args.vocab + p.tile_cols - 1) / p.tile_cols;
  p.layout = make_layout(args.tokens, args.width, args.augmented, args.compute, p.parts);
  p.ws = pooled_rows(1, p.layout.total, x.options().dtype(at::kByte)).view({-1});
  p.table = table.contiguous();
  p.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  p.targets = targets.contiguous();
  p.x = slot_view(p.ws, p.layout.x, args.tokens, args.width, args.compute);
  p.x.copy_(x);
  if (args.augmented) {
    p.u = slot_view(p.ws, p.layout.u, distinct.count(), args.width, args.compute);
    copy_rows(p.u, p.table, distinct.ids.data(), 0, distinct.count(), args.pad);
  }
  return p;
}

// The per-partition slots and the loop over its tiles; body(tile views) runs after z (and s)
// of the tile are computed.
struct Tile {
  int64_t v0, cols;
  at::Tensor e, z, s;     // e [cols, n] (pad row zero), z [T, cols], s [distinct targets, cols]: compute dtype
  const float* bias;      // [cols] fp32 or null
};

template <typename Body>
void for_each_tile(const Prepared& p, int64_t part, Body&& body) {
  const Args& a = p.args;
  const int64_t base = p.layout.part(part);
  const int64_t t_begin = part * p.tiles / p.parts, t_end = (part + 1) * p.tiles / p.parts;
  float* bias_buf = p.f32(base + p.layout.bias);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    Tile t;
    t.v0 = tile * p.tile_cols;
    t.cols = std::min(p.tile_cols, a.vocab - t.v0);
    t.e = slot_view(p.ws, base + p.layout.e, t.cols, a.width, a.compute);
    copy_rows(t.e, p.table, nullptr, t.v0, t.cols, a.pad);
    t.z = slot_view(p.ws, base + p.layout.z, a.tokens, t.cols, a.compute);
    at::mm_out(t.z, p.x, t.e.t());
    if (a.augmented) {
      t.s = slot_view(p.ws, base + p.layout.s, p.distinct->count(), t.cols, a.compute);
      at::mm_out(t.s, p.u, t.e.t());
    }
    t.bias = nullptr;
    if (p.bias.defined()) {
      at::Tensor view = at::from_blob(bias_buf, {t.cols}, p.ws.options().dtype(at::kFloat));
      view.copy_(p.bias.narrow(0, t.v0, t.cols));
      t.bias = bias_buf;
    }
    body(t);
  }
}

// The augmented loss's rows of a tile for its token epilogue: s's rows turned into the forward's
// or backward's y (target_forward_tile / target_backward_tile); empty without the loss.
template <typename Fill>
TargetRows target_rows(const Prepared& p, int64_t part, const Tile& t, Fill&& fill) {
  if (!p.args.augmented) return {};
  const int64_t base = p.layout.part(part);
  float *y = p.f32(base + p.layout.y), *scale = p.f32(base + p.layout.scale);
  LM_DISPATCH(p.args.compute, "lm_head_target_tile", [&] { fill(t.s.data_ptr<scalar_t>(), y, scale); });
  return {y, t.cols, p.distinct->of_token.data(), scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_head_forward_cpu(
    const at::Tensor& x, const at::Tensor& table, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t padding_idx, double label_smoothing, double z_loss, bool augmented,
    double kl_coef, double tau, at::ScalarType compute_dtype) {
  const Args a = check_args(x, table, bias, targets, padding_idx, label_smoothing, z_loss, augmented, kl_coef,
                            tau, compute_dtype);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.tokens}, f32), ce = at::empty({a.tokens}, f32);
  at::Tensor kl = at::zeros({a.tokens}, f32), stats = at::zeros({a.tokens, 3}, f32);
  if (a.tokens == 0) return {loss, ce, kl, stats};
  const at::Tensor y_all = targets.contiguous();
  const DistinctTargets distinct(y_all.data_ptr<int64_t>(), a.augmented ? a.tokens : 0);
  at::Tensor merged;  // [Stats::kCount, T]: every partition's statistics merged
  if (brgemm_path::usable(a.compute)) {
    merged = brgemm_path::forward(a, x, table, bias.has_value() ? *bias : at::Tensor(), y_all, distinct,
                                  partitions());
  } else {
    const Prepared p = prepare(a, x, table, bias, y_all, distinct);
    const int64_t* y = p.targets.data_ptr<int64_t>();
    const auto stats_of = [&](int64_t part) {
      return Stats::at(p.f32(p.layout.part(part) + p.layout.stats), a.tokens);
    };
    at::parallel_for(0, p.parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        const Stats st = stats_of(part);
        st.reset(a.tokens);
        for_each_tile(p, part, [&](const Tile& t) {
          const TargetRows tr = target_rows(p, part, t, [&](const auto* s, float* out, float* scale) {
            target_forward_tile(s, t.cols, distinct.count(), t.cols, 0, a.coefs.inv_tau, st, scale, out);
          });
          LM_DISPATCH(a.compute, "lm_head_forward_tile", [&] {
            forward_tile(t.z.data_ptr<scalar_t>(), t.cols, t.bias, a.tokens, t.cols, t.v0, y, 0, a.coefs.inv_tau,
                         tr, st);
          });
        });
      }
    });
    for (int64_t part = 1; part < p.parts; ++part)
      merge_stats(stats_of(0), stats_of(part), a.tokens, distinct.count(), distinct.of_token.data(),
                  a.coefs.inv_tau, a.augmented);
    merged = p.ws.narrow(0, p.layout.part(0) + p.layout.stats, Stats::kCount * a.tokens * 4).view(at::kFloat);
  }
  const Stats total = Stats::at(merged.data_ptr<float>(), a.tokens);
  const Coefs& c = a.coefs;
  float *lo = loss.data_ptr<float>(), *ce_out = ce.data_ptr<float>(), *kl_out = kl.data_ptr<float>();
  float* st_out = stats.data_ptr<float>();
  for (int64_t t = 0; t < a.tokens; ++t) {
    const float lse = total.m[t] + std::log(total.l[t]);
    ce_out[t] = (1.0f - c.smoothing) * (lse - total.zy[t]) +
                c.smoothing * (lse - total.sz[t] / static_cast<float>(a.vocab));
    float kl_t = 0.0f;
    st_out[3 * t] = lse;
    if (a.augmented) {
      const KlParts parts = kl_parts(total, t, distinct.of_token[t], c.inv_tau);
      kl_t = parts.kl;
      st_out[3 * t + 1] = parts.lse_q;
      st_out[3 * t + 2] = parts.lse_s;
      kl_out[t] = kl_t;
    }
    lo[t] = ce_out[t] + c.z_loss * lse * lse + c.kl_coef * kl_t;
  }
  return {loss, ce, kl, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& table,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& stats,
    int64_t padding_idx, double label_smoothing, double z_loss, bool augmented, double kl_coef, double tau,
    at::ScalarType compute_dtype) {
  const Args a = check_args(x, table, bias, targets, padding_idx, label_smoothing, z_loss, augmented, kl_coef,
                            tau, compute_dtype);
  LM_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == a.tokens, "grad_loss", "must have shape [", a.tokens,
           "], got ", grad_loss.sizes());
  LM_CHECK(grad_loss.scalar_type() == at::kFloat, "grad_loss", "must be float32, got ", grad_loss.scalar_type());
  LM_CHECK(stats.dim() == 2 && stats.size(0) == a.tokens && stats.size(1) == 3, "stats", "must have shape [",
           a.tokens, ", 3], got ", stats.sizes());
  LM_CHECK(stats.scalar_type() == at::kFloat, "stats", "must be float32, got ", stats.scalar_type());
  at::Tensor grad_table = at::empty(table.sizes(), table.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_bias = bias.has_value() ? at::empty({a.vocab}, bias->options()) : at::empty({0}, x.options().dtype(at::kFloat));
  if (a.tokens == 0) {
    grad_table.zero_();
    grad_bias.zero_();
    return {at::zeros(x.sizes(), x.options()), grad_table, grad_bias};
  }
  const at::Tensor g = grad_loss.contiguous(), st = stats.contiguous(), y_all = targets.contiguous();
  const DistinctTargets distinct(y_all.data_ptr<int64_t>(), a.augmented ? a.tokens : 0);
  if (brgemm_path::usable(a.compute)) {
    const at::Tensor dx = brgemm_path::backward(a, x, table, bias.has_value() ? *bias : at::Tensor(), y_all,
                                                distinct, g, st, grad_table, grad_bias, partitions());
    if (a.pad >= 0) grad_table.select(0, a.pad).zero_();
    return {dx.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true), grad_table, grad_bias};
  }
  const Prepared p = prepare(a, x, table, bias, y_all, distinct);
  const int64_t* y = p.targets.data_ptr<int64_t>();
  float* lse_s = p.f32(p.layout.lse_s);
  if (a.augmented) distinct.per_target(st.data_ptr<float>() + 2, 3, lse_s);
  const bool table_in_compute = table.scalar_type() == a.compute;
  at::parallel_for(0, p.parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t base = p.layout.part(part);
      at::Tensor dx = slot_view(p.ws, base + p.layout.dx, a.tokens, a.width, at::kFloat);
      dx.zero_();
      float* sums = p.f32(base + p.layout.sums);
      for_each_tile(p, part, [&](const Tile& t) {
        std::fill(sums, sums + t.cols, 0.0f);
        const TargetRows tr = target_rows(p, part, t, [&](const auto* s, float* out, float*) {
          target_backward_tile(s, t.cols, distinct.count(), t.cols, 0, a.coefs.inv_tau, lse_s, out);
        });
        LM_DISPATCH(a.compute, "lm_head_backward_tile", [&] {
          backward_tile(t.z.data_ptr<scalar_t>(), t.cols, t.bias, a.tokens, t.cols, t.v0, y, g.data_ptr<float>(),
                        st.data_ptr<float>(), 0, a.coefs, tr, grad_bias.numel() ? sums : nullptr,
                        t.z.data_ptr<scalar_t>(), t.cols);
        });
        if (grad_bias.numel())
          grad_bias.narrow(0, t.v0, t.cols).copy_(at::from_blob(sums, {t.cols}, p.ws.options().dtype(at::kFloat)));
        if (a.compute == at::kFloat) {
          dx.addmm_(t.z, t.e);
        } else {
          at::Tensor prod = slot_view(p.ws, base + p.layout.dx16, a.tokens, a.width, a.compute);
          at::mm_out(prod, t.z, t.e);
          dx.add_(prod);
        }
        at::Tensor rows = grad_table.narrow(0, t.v0, t.cols);
        if (table_in_compute) {
          at::mm_out(rows, t.z.t(), p.x);
        } else {
          at::Tensor tmp = slot_view(p.ws, base + p.layout.gt, t.cols, a.width, a.compute);
          at::mm_out(tmp, t.z.t(), p.x);
          rows.copy_(tmp);
        }
      });
    }
  });
  if (a.pad >= 0) grad_table.select(0, a.pad).zero_();
  at::Tensor dx0 = slot_view(p.ws, p.layout.part(0) + p.layout.dx, a.tokens, a.width, at::kFloat);
  for (int64_t part = 1; part < p.parts; ++part)
    dx0.add_(slot_view(p.ws, p.layout.part(part) + p.layout.dx, a.tokens, a.width, at::kFloat));
  return {dx0.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true), grad_table, grad_bias};
}

int64_t lm_head_workspace_bytes(int64_t tokens, int64_t width, int64_t vocab, bool augmented,
                                at::ScalarType compute_dtype) {
  LM_CHECK(tokens >= 0 && width >= 0 && vocab >= 0, "tokens", "width and vocab must be >= 0");
  LM_CHECK(is_float_type(compute_dtype), "compute_dtype", "must be float32, bfloat16 or float16, got ",
           compute_dtype);
  if (tokens == 0) return 0;
  if (brgemm_path::usable(compute_dtype)) return brgemm_path::workspace_bytes(tokens, width, augmented, partitions());
  return make_layout(tokens, width, augmented, compute_dtype, partitions()).total;
}

}  // namespace
}  // namespace define_kernels::cpu::lm_head

TORCH_LIBRARY_IMPL(define_kernels_C, CPU, m) {
  m.impl("lm_head_forward", &define_kernels::cpu::lm_head::lm_head_forward_cpu);
  m.impl("lm_head_backward", &define_kernels::cpu::lm_head::lm_head_backward_cpu);
}

TORCH_LIBRARY_FRAGMENT(define_kernels_C, m) {
  m.def("lm_head_workspace_bytes(int tokens, int width, int vocab, bool augmented, ScalarType compute_dtype) -> int",
        &define_kernels::cpu::lm_head::lm_head_workspace_bytes);
}
