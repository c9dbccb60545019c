// The fused LM-head loss with bf16 compute on brgemm micro-kernels (lm_head_brgemm.h).
//
// Same partitioning as the ATen path of lm_head.cpp (a contiguous range of vocabulary tiles per
// thread, fixed at the call's thread count, so results are reproducible), but inside a tile the
// tokens go in chunks of kRows: each chunk's logits come out of the micro-kernel in fp32 and are
// consumed by the epilogue while they are in L2, where a whole-tile GEMM leaves a [T, cols]
// matrix that the epilogue has to fetch from L3 or memory. The micro-kernels take B in the VNNI
// layout (pairs of K rows interleaved, [K/2][N][2]); K must be even, so widths and token counts
// are padded with zeros to even sizes. Per tile and chunk, backward:
//   z   = x Eᵀ                      (fp32, recomputed)   → dz (bf16, epilogue)
//   dx += dz E                       accumulated in fp32 in the partition's partial
//   gEᵀ += xᵀ dz                     accumulated in fp32 over the chunks, written once per tile.
#include "lm_head_brgemm.h"

#include "buffer_pool.h"
#include "lm_head_workspace.h"
#include "storage_cast.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace define_kernels::cpu::lm_head::brgemm_path {
namespace {

namespace cpublas = at::native::cpublas;

// A chunk's fp32 logits [kRows, kCols] are 128 KiB, its dz and packed dz 64 KiB each: with the
// packed tile of E they fit a 2 MiB L2 next to the grad_x rows the chunk updates.
constexpr int64_t kCols = 256;
constexpr int64_t kRows = 128;  // even, so every chunk starts on a VNNI row pair
static_assert(kCols <= kMaxTileCols, "the epilogues' row buffers hold one tile");
static_assert(kRows % 2 == 0, "chunks start on a VNNI row pair");

int64_t even(int64_t v) { return (v + 1) / 2 * 2; }

// Byte offsets in the workspace. Shared: x [Tp, np], xᵀ [np, Tp] and u [T, np] (the distinct
// targets' rows of E, at most T) in the compute dtype, zero-padded (Tp, np: T and the width
// rounded up to even), lse(s/τ) per distinct target (fp32). Per partition: packed Eᵀ and E tiles,
// a chunk's z (fp32), the augmented loss's target rows of the tile [T, kCols] and their rescale
// factors [T] (fp32), dz and its packed copy (bf16), gEᵀ [np, kCols] (fp32), bias and column sums
// [kCols], statistics [Stats::kCount, T] and the grad_x partial [T, np] (fp32).
struct Layout : WorkspaceLayout {
  int64_t x = 0, xt = 0, u = 0, lse_s = 0;
  int64_t b1 = 0, b2 = 0, z = 0, y = 0, scale = 0, dz = 0, dzp = 0, gt = 0, bias = 0, sums = 0, stats = 0, dx = 0;
};

Layout make_layout(int64_t tokens, int64_t width, bool augmented, int64_t partitions) {
  const int64_t np = even(width), tp = even(tokens), h = 2, f = 4;
  Layout L;
  SlotPlan plan;
  L.x = plan.slot(tp * np * h);
  L.xt = plan.slot(np * tp * h);
  L.u = plan.slot(augmented ? tokens * np * h : 0);
  L.lse_s = plan.slot(augmented ? tokens * f : 0);
  plan.begin_partition();
  L.b1 = plan.slot(np * kCols * h);
  L.b2 = plan.slot(kCols * np * h);
  L.z = plan.slot(kRows * kCols * f);
  L.y = plan.slot(augmented ? tokens * kCols * f : 0);
  L.scale = plan.slot(augmented ? tokens * f : 0);
  L.dz = plan.slot(kRows * kCols * h);
  L.dzp = plan.slot(kRows * kCols * h);
  L.gt = plan.slot(np * kCols * f);
  L.bias = plan.slot(kCols * f);
  L.sums = plan.slot(kCols * f);
  L.stats = plan.slot(Stats::kCount * tokens * f);
  L.dx = plan.slot(tokens * np * f);
  plan.finish(L, partitions);
  return L;
}

template <typename T>
T* at_offset(uint8_t* base, int64_t offset) { return reinterpret_cast<T*>(base + offset); }

#define LM_DISPATCH_SOURCE(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, "lm_head_brgemm", __VA_ARGS__)

// out [out_rows, np] = rows of `in` (ids[i], or i when ids is null; the padding row and every
// position past `rows` or `width` as zeros), cast to H.
template <typename H>
void copy_padded(H* out, const at::Tensor& in, const int64_t* ids, int64_t rows, int64_t out_rows, int64_t width,
                 int64_t np, int64_t pad) {
  LM_DISPATCH_SOURCE(in.scalar_type(), [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    for (int64_t i = 0; i < out_rows; ++i) {
      H* dst = out + i * np;
      const int64_t v = i < rows ? (ids ? ids[i] : i) : -1;
      if (v < 0 || (ids && v == pad)) {
        std::fill(dst, dst + np, H(0));
        continue;
      }
      const scalar_t* row = src + v * width;
      for (int64_t k = 0; k < width; ++k) dst[k] = to_storage<H>(static_cast<float>(row[k]));
      std::fill(dst + width, dst + np, H(0));
    }
  });
}

// out = VNNI of dz [rows_even, cols] (row stride ld): out[i/2][j][i%2] = dz[i][j], one 32-bit
// word per row pair and column (the 16-bit values as raw bits, so the loop vectorizes).
template <typename H>
void pack_rows(H* out, const H* dz, int64_t rows_even, int64_t cols, int64_t ld) {
  static_assert(sizeof(H) == 2, "16-bit compute only");
  const uint16_t* src = reinterpret_cast<const uint16_t*>(dz);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < rows_even; i += 2) {
    const uint16_t* r0 = src + i * ld;
    const uint16_t* r1 = r0 + ld;
    uint32_t* d = dst + (i >> 1) * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<uint32_t>(r0[j]) | (static_cast<uint32_t>(r1[j]) << 16);
  }
}

// row [np] = E[v] cast to H (zeros where `zero`, and past width), as 32-bit words of two
// adjacent columns: the unit both VNNI layouts below move.
template <typename H, typename S>
const uint32_t* cast_row(uint32_t* row, const S* table, int64_t v, bool zero, int64_t width, int64_t np) {
  H* out = reinterpret_cast<H*>(row);
  if (zero) {
    std::fill(out, out + np, H(0));
  } else {
    const S* in = table + v * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) out[k] = to_storage<H>(static_cast<float>(in[k]));
    std::fill(out + width, out + np, H(0));
  }
  return row;
}

// b1 = VNNI of the tile's Eᵀ [np, cols]: b1[k/2][j][k%2] = E[v0 + j][k] (the padding row zero).
template <typename H>
void pack_table_t(H* out, const at::Tensor& table, int64_t v0, int64_t cols, int64_t width, int64_t np, int64_t pad) {
  std::vector<uint32_t> buf(np / 2);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  LM_DISPATCH_SOURCE(table.scalar_type(), [&] {
    const scalar_t* src = table.data_ptr<scalar_t>();
    for (int64_t j = 0; j < cols; ++j) {
      const uint32_t* row = cast_row<H>(buf.data(), src, v0 + j, v0 + j == pad, width, np);
      for (int64_t k = 0; k < np / 2; ++k) dst[k * cols + j] = row[k];
    }
  });
}

// b2 = VNNI of the tile's E [even(cols), np]: b2[j/2][k][j%2] = E[v0 + j][k] (the padding row
// and the row past an odd tile zero).
template <typename H>
void pack_table(H* out, const at::Tensor& table, int64_t v0, int64_t cols, int64_t width, int64_t np, int64_t pad) {
  static_assert(sizeof(H) == 2, "16-bit compute only");
  std::vector<uint32_t> buf(np);  // two rows
  LM_DISPATCH_SOURCE(table.scalar_type(), [&] {
    const scalar_t* src = table.data_ptr<scalar_t>();
    for (int64_t j = 0; j < cols; j += 2) {
      cast_row<H>(buf.data(), src, v0 + j, v0 + j == pad, width, np);
      cast_row<H>(buf.data() + np / 2, src, v0 + j + 1, j + 1 >= cols || v0 + j + 1 == pad, width, np);
      pack_rows(out + (j >> 1) * np * 2, reinterpret_cast<const H*>(buf.data()), 2, np, np);
    }
  });
}

// The tile's bias as fp32 in buf (null without a bias).
const float* bias_tile(const at::Tensor& bias, int64_t v0, int64_t cols, float* buf) {
  if (!bias.defined()) return nullptr;
  LM_DISPATCH_SOURCE(bias.scalar_type(), [&] {
    const scalar_t* b = bias.data_ptr<scalar_t>() + v0;
    for (int64_t j = 0; j < cols; ++j) buf[j] = static_cast<float>(b[j]);
  });
  return buf;
}

// C [rows, cols] (row stride ldc) = (or +=) A [rows, k] (row stride lda) · packed B [k, cols].
template <typename H>
void gemm(int64_t rows, int64_t cols, int64_t k, int64_t lda, int64_t ldc, bool accumulate, const H* a, const H* b,
          float* c) {
  cpublas::brgemm(rows, cols, k, lda, cols, ldc, accumulate, a, b, c);
}

// The inputs every tile reads, in the workspace.
template <typename H>
struct Inputs {
  Layout L;
  at::Tensor ws, table, bias, targets;
  H *x = nullptr, *xt = nullptr, *u = nullptr;
  int64_t np = 0, tp = 0, tiles = 0;

  Inputs(const Args& a, const at::Tensor& x_in, const at::Tensor& table_in, const at::Tensor& bias_in,
         const at::Tensor& targets_in, const DistinctTargets& distinct, int64_t parts, bool transposed) {
    L = make_layout(a.tokens, a.width, a.augmented, parts);
    ws = pooled_rows(1, L.total, x_in.options().dtype(at::kByte)).view({-1});
    table = table_in.contiguous();
    bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
    targets = targets_in.contiguous();
    np = even(a.width);
    tp = even(a.tokens);
    tiles = (a.vocab + kCols - 1) / kCols;
    uint8_t* base = ws.data_ptr<uint8_t>();
    x = at_offset<H>(base, L.x);
    copy_padded(x, x_in.contiguous(), nullptr, a.tokens, tp, a.width, np, a.pad);
    if (transposed) {
      xt = at_offset<H>(base, L.xt);
      for (int64_t k = 0; k < np; ++k)
        for (int64_t t = 0; t < tp; ++t) xt[k * tp + t] = x[t * np + k];
    }
    if (a.augmented) {
      u = at_offset<H>(base, L.u);
      copy_padded(u, table, distinct.ids.data(), distinct.count(), distinct.count(), a.width, np, a.pad);
    }
  }
  uint8_t* part(int64_t p) const { return ws.data_ptr<uint8_t>() + L.part(p); }
};

// The augmented loss's rows of one tile (fp32, row stride cols) for every distinct target:
// s = u E_tileᵀ in chunks of kRows targets, each turned into y in place by fill(rows, first).
template <typename H, typename Fill>
TargetRows target_rows(const Inputs<H>& in, const DistinctTargets& distinct, uint8_t* pb, const H* b1, int64_t cols,
                       Fill&& fill) {
  if (!in.u) return {};
  float* y = at_offset<float>(pb, in.L.y);
  for (int64_t d0 = 0; d0 < distinct.count(); d0 += kRows) {
    const int64_t rows = std::min(kRows, distinct.count() - d0);
    gemm(rows, cols, in.np, in.np, cols, false, in.u + d0 * in.np, b1, y + d0 * cols);
    fill(y + d0 * cols, rows, d0);
  }
  return {y, cols, distinct.of_token.data(), at_offset<float>(pb, in.L.scale)};
}

template <typename H>
at::Tensor forward_impl(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                        const at::Tensor& targets, const DistinctTargets& distinct, int64_t parts) {
  const Inputs<H> in(a, x, table, bias, targets, distinct, parts, /*transposed=*/false);
  const Layout& L = in.L;
  const int64_t T = a.tokens, np = in.np;
  const int64_t* y = in.targets.template data_ptr<int64_t>();
  const auto stats_of = [&](int64_t part) { return Stats::at(at_offset<float>(in.part(part), L.stats), T); };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      uint8_t* pb = in.part(part);
      const Stats st = stats_of(part);
      st.reset(T);
      H* b1 = at_offset<H>(pb, L.b1);
      float* z = at_offset<float>(pb, L.z);
      float* scale = at_offset<float>(pb, L.scale);
      for (int64_t tile = part * in.tiles / parts; tile < (part + 1) * in.tiles / parts; ++tile) {
        const int64_t v0 = tile * kCols, cols = std::min(kCols, a.vocab - v0);
        pack_table_t(b1, in.table, v0, cols, a.width, np, a.pad);
        const float* bt = bias_tile(in.bias, v0, cols, at_offset<float>(pb, L.bias));
        const TargetRows tr = target_rows(in, distinct, pb, b1, cols, [&](float* s, int64_t rows, int64_t d0) {
          target_forward_tile(s, cols, rows, cols, d0, a.coefs.inv_tau, st, scale, s);
        });
        for (int64_t t0 = 0; t0 < T; t0 += kRows) {
          const int64_t rows = std::min(kRows, T - t0);
          gemm(rows, cols, np, np, cols, false, in.x + t0 * np, b1, z);
          forward_tile(z, cols, bt, rows, cols, v0, y, t0, a.coefs.inv_tau, tr, st);
        }
      }
      cpublas::brgemm_release();
    }
  });
  const Stats total = stats_of(0);
  for (int64_t part = 1; part < parts; ++part)
    merge_stats(total, stats_of(part), T, distinct.count(), distinct.of_token.data(), a.coefs.inv_tau, a.augmented);
  // a view into the workspace: it holds the pooled buffer until the caller is done with it
  return in.ws.narrow(0, L.part(0) + L.stats, Stats::kCount * T * 4).view(at::kFloat);
}

template <typename H>
at::Tensor backward_impl(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                         const at::Tensor& targets, const DistinctTargets& distinct, const at::Tensor& grad,
                         const at::Tensor& stats, at::Tensor& grad_table, at::Tensor& grad_bias, int64_t parts) {
  const Inputs<H> in(a, x, table, bias, targets, distinct, parts, /*transposed=*/true);
  const Layout& L = in.L;
  const int64_t T = a.tokens, n = a.width, np = in.np, tp = in.tp;
  const int64_t* y = in.targets.template data_ptr<int64_t>();
  const float *g = grad.data_ptr<float>(), *st = stats.data_ptr<float>();
  float* lse_s = at_offset<float>(in.ws.template data_ptr<uint8_t>(), L.lse_s);
  if (a.augmented) distinct.per_target(st + 2, 3, lse_s);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      uint8_t* pb = in.part(part);
      H *b1 = at_offset<H>(pb, L.b1), *b2 = at_offset<H>(pb, L.b2);
      H *dz = at_offset<H>(pb, L.dz), *dzp = at_offset<H>(pb, L.dzp);
      float* z = at_offset<float>(pb, L.z);
      float *gt = at_offset<float>(pb, L.gt), *sums = at_offset<float>(pb, L.sums), *dx = at_offset<float>(pb, L.dx);
      std::fill(dx, dx + T * np, 0.0f);
      for (int64_t tile = part * in.tiles / parts; tile < (part + 1) * in.tiles / parts; ++tile) {
        const int64_t v0 = tile * kCols, cols = std::min(kCols, a.vocab - v0), cp = even(cols);
        pack_table_t(b1, in.table, v0, cols, n, np, a.pad);
        pack_table(b2, in.table, v0, cols, n, np, a.pad);
        const float* bt = bias_tile(in.bias, v0, cols, at_offset<float>(pb, L.bias));
        std::fill(sums, sums + cols, 0.0f);
        const TargetRows tr = target_rows(in, distinct, pb, b1, cols, [&](float* s, int64_t rows, int64_t d0) {
          target_backward_tile(s, cols, rows, cols, d0, a.coefs.inv_tau, lse_s, s);
        });
        for (int64_t t0 = 0; t0 < T; t0 += kRows) {
          const int64_t rows = std::min(kRows, T - t0), rp = even(rows);
          gemm(rows, cols, np, np, cols, false, in.x + t0 * np, b1, z);
          backward_tile(z, cols, bt, rows, cols, v0, y, g, st, t0, a.coefs, tr, grad_bias.numel() ? sums : nullptr,
                        dz, cp);
          // the zero padding the even sizes read: dz's column past an odd tile, its row past an odd chunk
          if (cp != cols)
            for (int64_t i = 0; i < rows; ++i) dz[i * cp + cols] = H(0);
          if (rp != rows) std::fill(dz + rows * cp, dz + rp * cp, H(0));
          gemm(rows, np, cp, cp, np, true, dz, b2, dx + t0 * np);
          pack_rows(dzp, dz, rp, cols, cp);
          gemm(np, cols, rp, tp, cols, t0 > 0, in.xt + t0, dzp, gt);
        }
        LM_DISPATCH_SOURCE(grad_table.scalar_type(), [&] {
          scalar_t* out = grad_table.data_ptr<scalar_t>() + v0 * n;
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t k = 0; k < n; ++k) out[j * n + k] = to_storage<scalar_t>(gt[k * cols + j]);
        });
        if (grad_bias.numel()) {
          LM_DISPATCH_SOURCE(grad_bias.scalar_type(), [&] {
            scalar_t* out = grad_bias.data_ptr<scalar_t>() + v0;
            for (int64_t j = 0; j < cols; ++j) out[j] = to_storage<scalar_t>(sums[j]);
          });
        }
      }
      cpublas::brgemm_release();
    }
  });
  float* dx0 = at_offset<float>(in.part(0), L.dx);
  for (int64_t part = 1; part < parts; ++part) {
    const float* other = at_offset<float>(in.part(part), L.dx);
#pragma omp simd
    for (int64_t i = 0; i < T * np; ++i) dx0[i] += other[i];
  }
  return in.ws.narrow(0, L.part(0) + L.dx, T * np * 4).view(at::kFloat).view({T, np}).narrow(1, 0, n);
}

}  // namespace

bool usable(at::ScalarType compute) {
  // bf16 only: fp16 brgemm needs AMX-FP16, which no machine this was tested on has
  if (compute != at::kBFloat16) return false;
  return at::globalContext().userEnabledMkldnn() && cpublas::could_pack(compute);
}

int64_t workspace_bytes(int64_t tokens, int64_t width, bool augmented, int64_t partitions) {
  return make_layout(tokens, width, augmented, partitions).total;
}

at::Tensor forward(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                   const at::Tensor& targets, const DistinctTargets& distinct, int64_t partitions) {
  TORCH_CHECK(usable(a.compute), "lm_head brgemm path: compute dtype ", a.compute, " is not supported here");
  return forward_impl<at::BFloat16>(a, x, table, bias, targets, distinct, partitions);
}

at::Tensor backward(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                    const at::Tensor& targets, const DistinctTargets& distinct, const at::Tensor& grad,
                    const at::Tensor& stats, at::Tensor& grad_table, at::Tensor& grad_bias, int64_t partitions) {
  TORCH_CHECK(usable(a.compute), "lm_head brgemm path: compute dtype ", a.compute, " is not supported here");
  return backward_impl<at::BFloat16>(a, x, table, bias, targets, distinct, grad, stats, grad_table, grad_bias,
                                     partitions);
}

}  // namespace define_kernels::cpu::lm_head::brgemm_path
