// Reused CPU buffers for the stack's per-call tensors: the "save" policy's activations (handed to
// autograd and held until the backward) and each call's scratch rows.
//
// Why: a fresh buffer is mapped page by page on first touch, and glibc hands large freed blocks
// back to the system, so a step that allocates its activations anew can page-fault on every page
// of them: up to ~18,000 faults per fp32 step at wt103-base (70 MB saved) on a 2-core VM, about
// 5% of the step. A pooled buffer is handed out again only when no tensor holds its storage any
// more (its use count is the pool's own), so a tensor still alive (autograd's saved tensors, a
// second graph, a user's reference) is never written. A request reuses the smallest free buffer
// of its dtype with at least as many elements and at most twice as many; free buffers beyond
// the limit (default 512 MiB) are released least recently used first.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace define_kernels::cpu {

// An uninitialized contiguous [rows, width] CPU tensor in a pooled buffer (a fresh one when the
// pool's limit is 0).
at::Tensor pooled_rows(int64_t rows, int64_t width, const at::TensorOptions& options);

// Largest total of free buffers kept (bytes); 0 disables pooling and releases the free buffers.
void set_buffer_pool_limit(int64_t bytes);
// Releases every free buffer (those still in use stay until they are free).
void clear_buffer_pool();
// Bytes the pool holds (free and in use).
int64_t buffer_pool_bytes();

}  // namespace define_kernels::cpu
