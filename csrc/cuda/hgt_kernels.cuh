// CUDA kernels of the fused HGT op (docs/math.md §2): plain host launchers over raw pointers.
//
// This header and the kernels (hgt_forward.cu, hgt_backward.cu, hgt_device.cuh) use only CUDA
// toolkit headers (no torch), so CI can compile-check them with `nvcc -c` on a machine without a
// GPU or a CUDA build of torch. hgt_cuda.cpp is the torch
// binding: it checks arguments, allocates every buffer (outputs and one workspace) with torch and
// calls the launchers below on the current stream. Design notes: bench/gpu_cuda_notes.md.
#pragma once

#include <cuda_runtime.h>
#include <define_kernels/codes.h>

#include <cstddef>
#include <cstdint>

namespace dk_cuda {

constexpr int kMaxLayers = 16;

// The layer codes of the op's `layers` argument (codes.h, generated from define_kernels/codes.py;
// these kernels never see kInputProj: the binding refuses an in-proj).
using namespace define_kernels::codes;

// One layer: pointers to its contiguous parameters (dtype T of the launcher) and its shape.
// weight [groups, in/groups, out/groups], bias [groups, out/groups], norm affine [out/groups].
struct HgtLayer {
  const void* weight;
  const void* bias;
  const void* norm_weight;  // nullptr when has_norm == 0
  const void* norm_bias;
  int in_features;
  int out_features;
  int groups;
  int input_kind;
  int has_norm;
  int act;
};

// The whole stack and the per-call options. POD, passed by value to the kernels.
struct HgtStack {
  HgtLayer layers[kMaxLayers];
  int num_layers;
  int in_dim;        // p
  int max_width;     // max out_features over the layers
  int shuffle;       // feature shuffle after every grouped transform
  float scale;       // stack input = rows * scale
  int dropout_on;    // seed given and dropout > 0
  uint32_t seed;
  uint32_t drop_threshold;  // int(p * 2^24): keep when the 24-bit draw >= threshold
  float keep_prob;          // 1 - p; kept values are divided by it
};

// Where the stack input comes from: rows of a table x [V, p] gathered by ids, or x [T, p] itself.
struct HgtRows {
  const void* x;       // dtype T
  int64_t x_stride0;   // elements
  int64_t x_stride1;
  const void* ids;     // nullptr: dense x; else int32 or int64 [rows]
  int ids_are_64bit;
  int64_t rows;        // T
};

// Launch geometry of the forward, decided on the host from the widths and the device limits.
struct HgtForwardPlan {
  int grid;                  // persistent CTAs, each looping over 64-token tiles
  size_t smem_bytes;         // dynamic shared memory per CTA
  size_t workspace_bytes;    // global scratch for the activation tiles (0 when they fit in smem)
  int acts_in_smem;
};

// Fills `plan` for `rows` tokens on the current device.
template <typename T>
cudaError_t plan_hgt_forward(const HgtStack& stack, int64_t rows, HgtForwardPlan* plan);

// y [rows, out_features of the last layer], contiguous, dtype T. `workspace` holds at least
// plan.workspace_bytes (256-byte aligned) or is nullptr when that is 0.
template <typename T>
cudaError_t launch_hgt_forward(const HgtStack& stack, const HgtRows& rows, void* y,
                               const HgtForwardPlan& plan, void* workspace, cudaStream_t stream);

// Bytes of the one workspace the backward carves (saved activations, fp32 accumulators, the
// partial sums of the deterministic two-stage weight-gradient reduction).
template <typename T>
cudaError_t hgt_backward_workspace_bytes(const HgtStack& stack, int64_t rows, size_t* bytes);

// grad_y [rows, m] contiguous T. Writes grad_rows [rows, p] contiguous T (gradient per gathered
// row, before any scatter into the table) and grad_params[i] (contiguous T, the flat params order:
// per layer weight, bias, then norm weight and bias when the layer has a norm). Deterministic: no
// atomics; every sum runs in a fixed order.
template <typename T>
cudaError_t launch_hgt_backward(const HgtStack& stack, const HgtRows& rows, const void* grad_y,
                                void* grad_rows, void* const* grad_params, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

}  // namespace dk_cuda
