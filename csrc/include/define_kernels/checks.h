// Argument checks of the define_kernels_C ops, shared by the CPU and CUDA implementations.
//
// Every failure names the argument. DK_CHECK raises c10::ValueError (Python ValueError),
// DK_CHECK_INDEX raises c10::IndexError; both happen before any kernel runs. The Python side of
// the same contract (the public op and every fake) is define_kernels/contract.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <define_kernels/codes.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#define DK_CHECK(cond, arg, ...) TORCH_CHECK_VALUE(cond, arg, " ", __VA_ARGS__)
#define DK_CHECK_INDEX(cond, arg, ...) TORCH_CHECK_INDEX(cond, arg, " ", __VA_ARGS__)

namespace define_kernels {

// The 7 ints per layer of the `layers` argument and their codes (codes.h, generated from
// define_kernels/codes.py). kInputProj: the in-proj, layer 0 only, reading x (width n); its
// output is the stack input p of every later layer.
using namespace codes;

// The 7th int of a layer: its dropout probability, the bits of a float64 (exact).
inline double layer_dropout_from_bits(int64_t bits) {
  double p;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

struct LayerDesc {
  int64_t in_features, out_features, groups, input_kind, act;
  bool has_norm;
  int64_t param_offset;  // index of this layer's weight in `params`
  double dropout;        // this layer's dropout probability (training, seed >= 0)
  int64_t in_per_group() const { return in_features / groups; }
  int64_t out_per_group() const { return out_features / groups; }
};

// Decodes and validates `layers` against the input width p of x (n when layer 0 is an in-proj,
// whose out_features is then the p of the later layers); returns one LayerDesc per layer.
inline std::vector<LayerDesc> decode_layers(c10::IntArrayRef layers, int64_t p, bool allow_in_proj) {
  DK_CHECK(!layers.empty() && layers.size() % kIntsPerLayer == 0, "layers",
           "must hold 7 ints per layer, got ", layers.size());
  std::vector<LayerDesc> out;
  int64_t offset = 0, prev_width = 0;
  for (size_t i = 0; i < layers.size(); i += kIntsPerLayer) {
    const int64_t index = static_cast<int64_t>(i / kIntsPerLayer);
    LayerDesc d{layers[i], layers[i + 1], layers[i + 2], layers[i + 3], layers[i + 5],
                layers[i + 4] != 0, offset, layer_dropout_from_bits(layers[i + 6])};
    DK_CHECK(d.dropout >= 0.0 && d.dropout < 1.0, "layers", "layer ", index,
             ": dropout must be in [0, 1), got ", d.dropout);
    DK_CHECK(d.in_features > 0 && d.out_features > 0 && d.groups > 0, "layers",
             "layer ", index, ": in_features, out_features and groups must be positive");
    DK_CHECK(d.in_features % d.groups == 0 && d.out_features % d.groups == 0, "layers",
             "layer ", index, ": widths ", d.in_features, " -> ", d.out_features,
             " are not divisible by groups ", d.groups);
    DK_CHECK(layers[i + 4] == 0 || layers[i + 4] == 1, "layers", "layer ", index,
             ": has_norm must be 0 or 1, got ", layers[i + 4]);
    DK_CHECK(d.act >= kActNone && d.act <= kActSilu, "layers", "layer ", index,
             ": act must be 0..3, got ", d.act);
    DK_CHECK(d.input_kind >= kInputX && d.input_kind <= kInputProj, "layers", "layer ", index,
             ": input_kind must be 0..4, got ", d.input_kind);
    DK_CHECK(index > 0 || d.input_kind == kInputX || d.input_kind == kInputProj, "layers",
             "layer 0 must take the stack input (input_kind 0 or 4), got ", d.input_kind);
    DK_CHECK(index == 0 || d.input_kind != kInputProj, "layers", "layer ", index,
             ": only layer 0 can be an in-proj (input_kind 4)");
    DK_CHECK(d.input_kind != kInputProj || allow_in_proj, "layers",
             "layer 0 is an in-proj (input_kind 4), which this implementation does not run");
    DK_CHECK(d.input_kind != kInputProj || d.groups == 1, "layers", "the in-proj must have 1 group, got ",
             d.groups);
    DK_CHECK(index != 1 || out[0].input_kind != kInputProj || d.input_kind == kInputX, "layers",
             "layer 1 must read x (input_kind 0) after an in-proj, got ", d.input_kind);
    int64_t expected_in = p;
    if (d.input_kind == kInputMix || d.input_kind == kInputConcat) expected_in = p + prev_width;
    if (d.input_kind == kInputPrev) expected_in = prev_width;
    DK_CHECK(d.in_features == expected_in, "layers", "layer ", index, ": in_features ",
             d.in_features, " does not match its input (", expected_in, ")");
    DK_CHECK(d.input_kind != kInputMix || (p % d.groups == 0 && prev_width % d.groups == 0),
             "layers", "layer ", index, ": mix needs x width ", p, " and previous width ",
             prev_width, " divisible by groups ", d.groups);
    out.push_back(d);
    offset += d.has_norm ? 4 : 2;
    prev_width = d.out_features;
    if (d.input_kind == kInputProj) p = d.out_features;  // later layers read its output as x
  }
  return out;
}

// Width of the x every layer after an in-proj reads (the x width itself without one).
inline int64_t stack_width(const std::vector<LayerDesc>& descs, int64_t x_width) {
  return descs.front().input_kind == kInputProj ? descs.front().out_features : x_width;
}

inline int64_t expected_param_count(const std::vector<LayerDesc>& descs) {
  return descs.back().param_offset + (descs.back().has_norm ? 4 : 2);
}

inline std::string indexed(const char* arg, int64_t index) {
  return std::string(arg) + "[" + std::to_string(index) + "]";
}

inline void check_same_place(const at::Tensor& t, const at::Tensor& x, const std::string& arg) {
  DK_CHECK(t.scalar_type() == x.scalar_type(), arg, "has dtype ", t.scalar_type(), " but x has ",
           x.scalar_type());
  DK_CHECK(t.device() == x.device(), arg, "is on ", t.device(), " but x is on ", x.device());
}

// Checks every argument of hgt_forward / hgt_backward that metadata can decide.
inline std::vector<LayerDesc> check_hgt_args(const at::Tensor& x, const c10::optional<at::Tensor>& ids,
                                             at::TensorList params, c10::IntArrayRef layers,
                                             double dropout, int64_t seed, bool allow_in_proj = false) {
  DK_CHECK(x.defined() && x.dim() == 2, "x", "must be a 2-D tensor [rows, in_dim], got ",
           x.defined() ? x.dim() : -1, " dims");
  DK_CHECK(at::isFloatingType(x.scalar_type()), "x", "must be floating point, got ", x.scalar_type());
  if (ids.has_value()) {
    const at::Tensor& i = *ids;
    DK_CHECK(i.dim() == 1, "ids", "must be 1-D, got ", i.dim(), " dims");
    DK_CHECK(i.scalar_type() == at::kInt || i.scalar_type() == at::kLong, "ids",
             "must be int32 or int64, got ", i.scalar_type());
    DK_CHECK(i.device() == x.device(), "ids", "is on ", i.device(), " but x is on ", x.device());
  }
  DK_CHECK(dropout >= 0.0 && dropout < 1.0, "dropout", "must be in [0, 1), got ", dropout);
  DK_CHECK(seed >= -1 && seed < (int64_t(1) << 31), "seed", "must be -1 (no dropout) or in [0, 2^31), got ", seed);
  auto descs = decode_layers(layers, x.size(1), allow_in_proj);
  const int64_t count = expected_param_count(descs);
  DK_CHECK(static_cast<int64_t>(params.size()) == count, "params", "must hold ", count,
           " tensors for these layers, got ", params.size());
  for (const auto& d : descs) {
    const int64_t g = d.groups, a = d.in_per_group(), c = d.out_per_group();
    std::vector<std::vector<int64_t>> shapes = {{g, a, c}, {g, c}};
    if (d.has_norm) shapes.insert(shapes.end(), {{c}, {c}});
    for (size_t k = 0; k < shapes.size(); ++k) {
      const int64_t index = d.param_offset + static_cast<int64_t>(k);
      const at::Tensor& t = params[index];
      DK_CHECK(t.defined() && t.sizes().vec() == shapes[k], indexed("params", index),
               "must have shape ", c10::IntArrayRef(shapes[k]), ", got ",
               t.defined() ? t.sizes() : c10::IntArrayRef{});
      check_same_place(t, x, indexed("params", index));
    }
  }
  return descs;
}

inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, int64_t rows, int64_t out_dim) {
  DK_CHECK(grad_y.dim() == 2 && grad_y.size(0) == rows && grad_y.size(1) == out_dim, "grad_y",
           "must have shape [", rows, ", ", out_dim, "], got ", grad_y.sizes());
  DK_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y", "has dtype ", grad_y.scalar_type(),
           " but x has ", x.scalar_type());
  DK_CHECK(grad_y.device() == x.device(), "grad_y", "is on ", grad_y.device(), " but x is on ", x.device());
}

// IndexError naming the first bad value (reads the ids: one device sync on CUDA).
inline void check_ids_in_range(const at::Tensor& ids, int64_t num_rows) {
  if (ids.numel() == 0) return;
  auto [low_t, high_t] = at::aminmax(ids);
  const int64_t low = low_t.item<int64_t>(), high = high_t.item<int64_t>();
  DK_CHECK_INDEX(low >= 0 && high < num_rows, "ids", "contains ", low < 0 ? low : high,
                 ", outside [0, ", num_rows, ")");
}

}  // namespace define_kernels
