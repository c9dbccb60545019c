// See buffer_pool.h.
#include "buffer_pool.h"

#include <define_kernels/checks.h>

#include <ATen/ops/empty.h>
#include <c10/core/StorageImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace define_kernels::cpu {
namespace {

// Whether a storage's Python wrapper is referenced by nothing but the storage itself. Newer c10
// (PyObjectSlot::has_unique_reference) keeps the wrapper holding a reference to the storage as
// long as any C++ one exists; older c10 drops that reference when Python lets the wrapper go (its
// use count is then the pool's alone), so there the answer never matters and is false.
template <typename Slot>
auto wrapper_unreferenced(const Slot* slot, int) -> decltype(slot->has_unique_reference()) {
  return slot->has_unique_reference();
}
template <typename Slot>
bool wrapper_unreferenced(const Slot*, long) {
  return false;
}

struct Pooled {
  at::Tensor flat;  // 1-D; the pool's reference is its storage's only one while it is free
  uint64_t last_use = 0;
  int64_t bytes() const { return flat.numel() * static_cast<int64_t>(flat.element_size()); }
  // Free: the pool's reference is the only one. A storage Python has seen (`untyped_storage()`)
  // keeps its Python wrapper, which (in newer c10) holds one more reference as long as any C++
  // one exists; the storage is free when that wrapper is referenced by nothing else.
  bool is_free() const {
    const c10::StorageImpl* impl = flat.storage().unsafeGetStorageImpl();
    const size_t uses = flat.storage().use_count();
    return uses == 1 || (uses == 2 && wrapper_unreferenced(impl->pyobj_slot(), 0));
  }
};

class Pool {
 public:
  at::Tensor take(int64_t rows, int64_t width, const at::TensorOptions& options) {
    const int64_t n = rows * width;
    std::lock_guard<std::mutex> lock(mutex_);
    if (limit_ == 0 || n == 0) return at::empty({rows, width}, options);
    const auto dtype = options.dtype().toScalarType();
    Pooled* best = nullptr;
    for (auto& p : buffers_)
      if (p.flat.scalar_type() == dtype && p.flat.numel() >= n && p.flat.numel() <= 2 * n && p.is_free() &&
          (!best || p.flat.numel() < best->flat.numel()))
        best = &p;
    at::Tensor flat;
    if (best) {
      best->last_use = ++clock_;
      flat = best->flat;
    } else {  // room for a few more rows next time: the batch's distinct ids vary
      flat = at::empty({n + n / 8}, options.device(at::kCPU));
      buffers_.push_back({flat, ++clock_});
    }
    trim(limit_);
    return flat.narrow(0, 0, n).view({rows, width});
  }

  void set_limit(int64_t bytes) {
    DK_CHECK(bytes >= 0, "bytes", "must be >= 0, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim(limit_);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim(0);
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t total = 0;
    for (const auto& p : buffers_) total += p.bytes();
    return total;
  }

 private:
  // Releases free buffers, least recently used first, until the free ones total <= limit.
  void trim(int64_t limit) {
    int64_t free_bytes = 0;
    for (const auto& p : buffers_)
      if (p.is_free()) free_bytes += p.bytes();
    while (free_bytes > limit) {
      auto oldest = buffers_.end();
      for (auto it = buffers_.begin(); it != buffers_.end(); ++it)
        if (it->is_free() && (oldest == buffers_.end() || it->last_use < oldest->last_use)) oldest = it;
      free_bytes -= oldest->bytes();
      buffers_.erase(oldest);
    }
  }

  std::mutex mutex_;
  std::vector<Pooled> buffers_;
  uint64_t clock_ = 0;
  int64_t limit_ = int64_t(512) << 20;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: tensors may outlive static destruction
  return *instance;
}

}  // namespace

at::Tensor pooled_rows(int64_t rows, int64_t width, const at::TensorOptions& options) {
  return pool().take(rows, width, options);
}

void set_buffer_pool_limit(int64_t bytes) { pool().set_limit(bytes); }
void clear_buffer_pool() { pool().clear(); }
int64_t buffer_pool_bytes() { return pool().bytes(); }

}  // namespace define_kernels::cpu

TORCH_LIBRARY_FRAGMENT(define_kernels_C, m) {
  m.def("buffer_pool_set_limit(int bytes) -> ()", &define_kernels::cpu::set_buffer_pool_limit);
  m.def("buffer_pool_clear() -> ()", &define_kernels::cpu::clear_buffer_pool);
  m.def("buffer_pool_bytes() -> int", &define_kernels::cpu::buffer_pool_bytes);
}
