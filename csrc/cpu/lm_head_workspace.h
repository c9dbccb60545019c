// The workspace layout of one fused LM-head call (lm_head.cpp, lm_head_brgemm.cpp): one pooled
// byte buffer with the slots every partition reads, then one block of slots per partition, each
// slot on its own cache lines. A path's Layout derives from WorkspaceLayout and names its slots.
#pragma once

#include <cstdint>

namespace define_kernels::cpu::lm_head {

struct WorkspaceLayout {
  int64_t part0 = 0, per_part = 0, total = 0;
  int64_t part(int64_t p) const { return part0 + p * per_part; }
};

// Hands out slot offsets in order: the shared slots, then (after begin_partition) the offsets
// within one partition's block.
class SlotPlan {
 public:
  static constexpr int64_t kAlign = 64;  // bytes: a cache line

  // The offset of a slot of `bytes` (0 for a slot the call does not use).
  int64_t slot(int64_t bytes) {
    const int64_t at = off_;
    off_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return at;
  }
  void begin_partition() {
    shared_ = off_;
    off_ = 0;
  }
  // The block sizes, for `partitions` partitions.
  void finish(WorkspaceLayout& layout, int64_t partitions) const {
    layout.part0 = shared_;
    layout.per_part = off_;
    layout.total = shared_ + partitions * off_;
  }

 private:
  int64_t off_ = 0, shared_ = 0;
};

}  // namespace define_kernels::cpu::lm_head
