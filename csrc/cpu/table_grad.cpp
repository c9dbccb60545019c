// table_grad: the map table's gradient from the gradient of its gathered rows, dense like
// nn.Embedding's default gradient, without a table-sized zero fill.
//
// torch.zeros writes every byte of the table on every backward (at V = 267,735, n = 128: 137 MB,
// most of it page faults on a fresh buffer) although a batch touches a few thousand rows. Here the
// zeros come from calloc: a table-sized request is a fresh mapping the kernel zero-fills page by
// page on first touch, so only the pages holding the batch's rows are ever written (a small
// request is an ordinary zeroed heap block). The result
// is an ordinary CPU tensor (freed with std::free), usable in place by optimizers and later
// accumulation. table_grad_into adds into a given table instead (a reused buffer).
#include "storage_cast.h"

#include <define_kernels/checks.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <new>

namespace define_kernels::cpu {
namespace {

// table[ids[t]] += rows[t] for every t, in t order (16-bit tables: see table_grad_cpu). Threads
// split the columns, not the rows, so repeated ids never race and the sums are the same for any
// thread count; each thread walks every row's slice of its columns (contiguous, vectorized).
template <typename D, typename S>
void add_rows(D* table, const int64_t* ids, const S* rows, int64_t n, int64_t width) {
  using Acc = at::opmath_type<D>;
  constexpr int64_t kColumnGrain = 64;
  at::parallel_for(0, width, kColumnGrain, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < n; ++t) {
      D* dst = table + ids[t] * width;
      const S* src = rows + t * width;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] = to_storage<D>(Acc(dst[c]) + Acc(src[c]));
    }
  });
}

void check_rows_and_ids(const at::Tensor& grad_rows, const at::Tensor& ids, int64_t num_rows) {
  DK_CHECK(grad_rows.dim() == 2, "grad_rows", "must be 2-D [rows, width], got ", grad_rows.dim(), " dims");
  DK_CHECK(grad_rows.is_floating_point(), "grad_rows", "must be floating point, got ", grad_rows.scalar_type());
  DK_CHECK(ids.dim() == 1 && ids.size(0) == grad_rows.size(0), "ids", "must be 1-D with one id per row of grad_rows (",
           grad_rows.size(0), "), got shape ", ids.sizes());
  DK_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "ids", "must be int32 or int64, got ",
           ids.scalar_type());
  DK_CHECK(num_rows >= 0, "num_rows", "must be >= 0, got ", num_rows);
  DK_CHECK(ids.device() == grad_rows.device(), "ids", "is on ", ids.device(), " but grad_rows is on ",
           grad_rows.device());
  check_ids_in_range(ids, num_rows);
}

// dst[i] = src[i] rounded as the epilogues round (storage_cast.h), vectorized and in parallel.
template <typename T>
void store_rounded(T* dst, const float* src, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) dst[i] = to_storage<T>(src[i]);
  });
}

// table [num_rows, width] (contiguous, grad_rows' dtype) += grad_rows at ids, summed per id;
// table_is_zero: a fresh table, whose old values need not be read.
void add_into_table(at::Tensor& table, const at::Tensor& grad_rows, const at::Tensor& ids,
                    bool table_is_zero) {
  const int64_t num_rows = table.size(0), width = table.size(1);
  const at::Tensor rows = grad_rows.contiguous();
  const at::Tensor index = ids.to(at::kLong).contiguous();
  const bool half_precision = rows.scalar_type() == at::kBFloat16 || rows.scalar_type() == at::kHalf;
  if (half_precision && num_rows <= 4 * rows.size(0)) {
    // Sums per id in fp32, rounded once; a small table (the dedup gather's) is summed whole.
    at::Tensor sums = table_is_zero ? at::zeros({num_rows, width}, rows.options().dtype(at::kFloat))
                                    : table.to(at::kFloat);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(rows.scalar_type(), "table_grad", [&] {
      add_rows(sums.data_ptr<float>(), index.data_ptr<int64_t>(), rows.data_ptr<scalar_t>(),
               rows.size(0), width);
      store_rounded(table.data_ptr<scalar_t>(), sums.data_ptr<float>(), sums.numel());
    });
    return;
  }
  if (half_precision) {
    // Sums per id in fp32, rounded once: compact per distinct id, then added to the table.
    auto [distinct, inverse, counts] = at::_unique2(index, /*sorted=*/true, /*return_inverse=*/true,
                                                    /*return_counts=*/false);
    at::Tensor sums = at::zeros({distinct.size(0), width}, rows.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(rows.scalar_type(), "table_grad", [&] {
      add_rows(sums.data_ptr<float>(), inverse.data_ptr<int64_t>(), rows.data_ptr<scalar_t>(),
               rows.size(0), width);
      add_rows(table.data_ptr<scalar_t>(), distinct.data_ptr<int64_t>(), sums.data_ptr<float>(),
               distinct.size(0), width);  // distinct ids: each row rounded once (table + sum)
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "table_grad", [&] {
    add_rows(table.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), rows.data_ptr<scalar_t>(),
             rows.size(0), width);
  });
}

at::Tensor table_grad_cpu(const at::Tensor& grad_rows, const at::Tensor& ids, int64_t num_rows) {
  check_rows_and_ids(grad_rows, ids, num_rows);
  const int64_t width = grad_rows.size(1);
  const size_t bytes = static_cast<size_t>(num_rows) * width * grad_rows.element_size();
  void* data = std::calloc(bytes > 0 ? bytes : 1, 1);
  if (data == nullptr) throw std::bad_alloc();
  at::Tensor table = at::from_blob(data, {num_rows, width}, [](void* p) { std::free(p); },
                                   grad_rows.options());
  add_into_table(table, grad_rows, ids, /*table_is_zero=*/true);
  return table;
}

// The same sum into an existing table (define_kernels/table_grad_cache.py hands back the
// previous step's buffer, its rows zeroed, so no page is faulted in again).
void table_grad_into_cpu(at::Tensor& table, const at::Tensor& grad_rows, const at::Tensor& ids) {
  DK_CHECK(table.dim() == 2 && table.is_contiguous(), "table", "must be a contiguous 2-D tensor, got shape ",
           table.sizes(), " with strides ", table.strides());
  DK_CHECK(table.scalar_type() == grad_rows.scalar_type(), "table", "has dtype ", table.scalar_type(),
           " but grad_rows has ", grad_rows.scalar_type());
  DK_CHECK(table.device() == grad_rows.device(), "table", "is on ", table.device(), " but grad_rows is on ",
           grad_rows.device());
  check_rows_and_ids(grad_rows, ids, table.size(0));
  DK_CHECK(table.size(1) == grad_rows.size(1), "grad_rows", "must have the table's width ", table.size(1),
           ", got ", grad_rows.size(1));
  add_into_table(table, grad_rows, ids, /*table_is_zero=*/false);
}

}  // namespace
}  // namespace define_kernels::cpu

TORCH_LIBRARY_IMPL(define_kernels_C, CPU, m) {
  m.impl("table_grad", &define_kernels::cpu::table_grad_cpu);
  m.impl("table_grad_into", &define_kernels::cpu::table_grad_into_cpu);
}
