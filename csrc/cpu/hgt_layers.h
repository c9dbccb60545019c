// Whole-batch pieces of the CPU HGT stack: the per-call plan, the gather, and each layer's
// grouped GEMMs forward and backward (ATen mm on strided views: MKL/oneDNN, multithreaded).
//
// A layer's input u is never built: for the split-and-mix and concat skips every group's slice
// of u is a list of segments, each a column range of either the stack input xs or the previous
// output h, matched with a row range of the group's weight. Forward is z_j = sum_s src_s @ W_j[s];
// backward writes dW_j[s] = src_s^T gz_j and the source gradient src_s += gz_j W_j[s]^T.
#pragma once

#include <define_kernels/checks.h>
#include <define_kernels/dropout_hash.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace define_kernels::cpu {

enum Source : int { kFromX = 0, kFromPrev = 1 };

struct Segment {
  Source source;
  int64_t src_col;     // first column in xs or h
  int64_t weight_row;  // first row in W[j]
  int64_t len;
};

// Everything one op call shares; built once per call by make_plan.
struct Plan {
  std::vector<LayerDesc> layers;
  std::vector<std::vector<std::vector<Segment>>> segments;  // [layer][group]
  std::vector<std::vector<int64_t>> perm;  // [layer]: output position -> pre-shuffle position
  int64_t rows = 0, p = 0;
  double scale = 1.0;
  bool dropout_on = false;
  uint32_t threshold = 0;
  double keep_scale = 1.0;
  int64_t seed = -1;
  at::Tensor ids;  // int64 contiguous, or undefined (row key = row index)
};

Plan make_plan(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
               c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed);

// The stack input rows: x gathered by ids (or x itself), times scale; [rows, p] contiguous.
at::Tensor gather_input(const at::Tensor& x, const Plan& plan);

// out [rows, w] (pre-bias, pre-shuffle) = the layer's grouped product of (xs, h_prev).
void layer_gemm_forward(const Plan& plan, int64_t l, const at::Tensor& xs, const at::Tensor& h_prev,
                        const at::Tensor& weight, at::Tensor& out);

// From gz [rows, w] (pre-shuffle): grad_weight (written), grad_xs (accumulated) and
// grad_prev (written; undefined for the first layer).
void layer_gemm_backward(const Plan& plan, int64_t l, const at::Tensor& xs, const at::Tensor& h_prev,
                         const at::Tensor& weight, const at::Tensor& gz, at::Tensor& grad_weight,
                         at::Tensor& grad_xs, at::Tensor& grad_prev);

}  // namespace define_kernels::cpu
