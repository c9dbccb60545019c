// table_grad: the map table's gradient from the gradient of its gathered rows, dense like
// nn.Embedding's default gradient, without a table-sized zero fill.
//
// torch.zeros writes every byte of the table on every backward (at V = 267,735, n = 128: 137 MB,
// most of it page faults on a fresh buffer) although a batch touches a few thousand rows. Here the
// zeros come from calloc: a request this large is a fresh mapping the kernel zero-fills page by
// page on first touch, so only the pages holding the batch's rows are ever written. The result
// is an ordinary CPU tensor (freed with std::free), usable in place by optimizers and later
// accumulation.
#include <define_kernels/checks.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_add.h>
#include <torch/library.h>

#include <cstdlib>
#include <new>

namespace define_kernels::cpu {
namespace {

at::Tensor table_grad_cpu(const at::Tensor& grad_rows, const at::Tensor& ids, int64_t num_rows) {
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
  const int64_t width = grad_rows.size(1);
  const size_t bytes = static_cast<size_t>(num_rows) * width * grad_rows.element_size();
  void* data = std::calloc(bytes > 0 ? bytes : 1, 1);
  if (data == nullptr) throw std::bad_alloc();
  at::Tensor table = at::from_blob(data, {num_rows, width}, [](void* p) { std::free(p); },
                                   grad_rows.options());
  table.index_add_(0, ids, grad_rows);
  return table;
}

}  // namespace
}  // namespace define_kernels::cpu

TORCH_LIBRARY_IMPL(define_kernels_C, CPU, m) {
  m.impl("table_grad", &define_kernels::cpu::table_grad_cpu);
}
