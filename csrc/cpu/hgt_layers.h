// Whole-batch pieces of the CPU HGT stack: the per-call plan, the gather, and each layer's
// grouped GEMMs forward and backward (ATen mm on strided views: MKL/oneDNN, multithreaded).
//
// Layer l >= 1 reads a buffer u_l [rows, a_l] laid out as its grouped input (group j's slice is
// columns [j a_l/g, (j+1) a_l/g)): the previous layer's epilogue writes its output straight into
// u_l's columns (hcol map) and the stack input's columns are copied in beside it (xcol map), so
// the split-and-mix or concat skip costs no extra pass and every group is one GEMM with the full
// depth a_l/g. Layer 0 reads the gathered input xs itself. With an in-proj (layer 0, kInputProj)
// the stack input of layers >= 1 is its output x' = u_1 (layer 1 reads it whole, identity hcol).
#pragma once

#include <define_kernels/checks.h>
#include <define_kernels/dropout_hash.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace define_kernels::cpu {

// One layer's dropout (the in-proj has its own probability).
struct LayerDropout {
  bool on = false;
  uint32_t threshold = 0;
  double keep_scale = 1.0;
};

// Everything one op call shares; built once per call by make_plan.
struct Plan {
  std::vector<LayerDesc> layers;
  std::vector<LayerDropout> drop;  // [layer]
  // [layer]: column of u_l holding column k of xs (empty: no skip) / column k of h_{l-1}.
  std::vector<std::vector<int64_t>> xcol, hcol;
  // [layer]: output position -> pre-shuffle position, and back (int32: the epilogue gathers with them)
  std::vector<std::vector<int32_t>> perm, unperm;
  std::vector<bool> shuffled;  // [layer]: perm is not the identity
  int64_t rows = 0, p = 0;  // p: width of the stack input x the layers >= 1 read
  bool in_proj = false;     // layer 0 is the in-proj: x' (its output) replaces xs for later layers
  double scale = 1.0;
  int64_t seed = -1;
  at::Tensor ids;  // int64 contiguous, or undefined (row key = row index)
};

Plan make_plan(const at::Tensor& x, const c10::optional<at::Tensor>& ids, at::TensorList params,
               c10::IntArrayRef layers, bool shuffle, double dropout, double scale, int64_t seed);

// Reusable [rows, width] buffers for one op call: slot k grows to the widest request and hands
// out contiguous views, so the layer loop does not allocate a buffer per layer; the buffers come
// from the pool of buffer_pool.h, so later calls do not page-fault them in again.
class ScratchRows {
 public:
  ScratchRows(int64_t rows, at::TensorOptions options) : rows_(rows), options_(options) {}
  at::Tensor rows_of(size_t slot, int64_t width);
  // [width, rows] with a row stride of rows rounded up to 32 elements (64 bytes of 16-bit
  // values), the padding zeroed: a GEMM reading a transposed copy then reads whole cache lines.
  at::Tensor transposed_of(size_t slot, int64_t width);

 private:
  at::Tensor flat_of(size_t slot, int64_t elements);  // slot's buffer, grown to >= elements

  int64_t rows_;
  at::TensorOptions options_;
  std::vector<at::Tensor> slots_;
};

// fp32/fp64 GEMMs leave the bias to the epilogue (a free add there, no broadcast copy before
// the GEMM); bf16/fp16 GEMMs add it themselves (beta = 1), rounding once as the reference's
// baddbmm does.
inline bool bias_in_epilogue(at::ScalarType compute) {
  return compute == at::kFloat || compute == at::kDouble;
}

// Whether this layer's GEMM runs as gemm_with_fused_bias: one group, bf16, on a host with
// AVX-512 BW/VL/DQ (where ATen's bf16 GEMMs are oneDNN's too) and a torch with oneDNN's linear
// op. It saves the broadcast copy of the bias into the output and the GEMM's read of it (beta
// = 1), a large share of a wide bf16 GEMM's time. torch.backends.mkldnn.enabled = False keeps
// the plain path.
bool fused_bias_gemm(const LayerDesc& d, const at::Tensor& u, at::ScalarType compute);

// A new [rows, w] tensor u weight[0] + bias, the bias added by oneDNN's matmul in fp32 before the
// one rounding to bf16 (as baddbmm's beta = 1 rounds once); see fused_bias_gemm.
at::Tensor gemm_with_fused_bias(const at::Tensor& u, const at::Tensor& weight, const at::Tensor& bias);

// The stack input rows: x gathered by ids (or x itself), times scale; [rows, p] contiguous.
at::Tensor gather_input(const at::Tensor& x, const Plan& plan);

// z (pre-shuffle) = u [rows, a] times the layer's block-diagonal weight, plus bias; z is
// [rows, w] (one GEMM per group into its columns) or [g, rows, w / g] (one batched GEMM).
void layer_gemm_forward(const LayerDesc& d, const at::Tensor& u, const at::Tensor& weight,
                        const at::Tensor& bias, at::Tensor& z);

// Whether the weight gradients read a transposed copy (transpose_16bit) rather than a
// transposed view: for bf16, whose GEMMs (oneDNN, AMX) run about twice as fast without a
// transposed operand. Per layer the narrower of u [rows, a] and gz [rows, w] is copied:
// gw = u^T gz from u^T, or gw^T = gz^T u from gz^T (wt103-base's reduce layer: w = 512 < a = 1152).
inline bool wgrad_from_transposed_copy(at::ScalarType compute) { return compute == at::kBFloat16; }

// dst [cols, rows] = src [rows, cols], 16-bit elements; both with unit column stride, any row
// stride (multithreaded over src's rows).
void transpose_16bit(const at::Tensor& src, at::Tensor& dst);

// From gz [rows, w] (pre-shuffle): grad_weight = u^T gz per group, read from ut = u^T when
// defined, else computed as (gzt u)^T when gzt = gz^T is defined, else through u.t();
// grad_u = gz W^T per group.
void layer_gemm_backward(const LayerDesc& d, const at::Tensor& u, const at::Tensor& ut, const at::Tensor& gzt,
                         const at::Tensor& weight, const at::Tensor& gz, at::Tensor& grad_weight,
                         at::Tensor* grad_u);

}  // namespace define_kernels::cpu
