// The bf16 compute path of the fused LM-head loss (lm_head.cpp) on oneDNN's brgemm
// micro-kernels (AMX on CPUs that have it): the GEMMs run on token chunks of a vocabulary tile so
// that their fp32 output is still in L2 when the epilogue reads it, and gradients accumulate in
// fp32 without a 16-bit product in between.
#pragma once

#include "lm_head_epilogue.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace define_kernels::cpu::lm_head {

// One call's sizes and loss constants, checked by lm_head.cpp.
struct Args {
  int64_t tokens, width, vocab, pad;
  bool augmented;
  at::ScalarType compute;
  Coefs coefs;
};

namespace brgemm_path {

// Whether this path runs for `compute`: bf16 compute on a CPU whose brgemm packs bf16 (AMX),
// unless torch.backends.mkldnn.enabled is False (read per call).
bool usable(at::ScalarType compute);

// Scratch bytes of one call (never grows with the vocabulary).
int64_t workspace_bytes(int64_t tokens, int64_t width, bool augmented, int64_t partitions);

// The merged per-token statistics, a [Stats::kCount, T] fp32 tensor laid out as Stats::at reads.
at::Tensor forward(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                   const at::Tensor& targets, const DistinctTargets& distinct, int64_t partitions);

// Writes grad_table (and grad_bias when it has elements); returns grad_x as a [T, width] fp32 tensor.
at::Tensor backward(const Args& a, const at::Tensor& x, const at::Tensor& table, const at::Tensor& bias,
                    const at::Tensor& targets, const DistinctTargets& distinct, const at::Tensor& grad,
                    const at::Tensor& stats, at::Tensor& grad_table, at::Tensor& grad_bias, int64_t partitions);

}  // namespace brgemm_path
}  // namespace define_kernels::cpu::lm_head
