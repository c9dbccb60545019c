// Schemas of the define_kernels_C ops; implementations live per device (cpu/, cuda/).
//
// layers: 7 ints per layer (in_features, out_features, groups, input_kind 0 x | 1 mix | 2 concat |
// 3 prev | 4 proj, has_norm 0/1, act 0 none | 1 gelu | 2 relu | 3 silu, dropout probability as the
// bits of a float64); seed -1 means no dropout. `dropout` is the expand/reduce/output layers' p
// (the CUDA kernels read it; the CPU ones read each layer's). input_kind 4 (layer 0 only, CPU only):
// the in-proj, whose output replaces x for every later layer (docs/math.md §1).
// Semantics are those of define_kernels/reference.py (hgt_forward, hgt_backward).
// The *_saving / *_saved pair is the "save" activation policy (CPU only): the forward also
// returns `saved` = [pre_0, u_1, pre_1, ..., u_{L-1}, pre_{L-1}]: per layer l the pre-norm rows
// pre_l [rows, w_l] (bias added, shuffled) and, for l >= 1, its input u_l [rows, a_l] (the
// split-and-mix / concat of the stack input and the previous output, in grouped layout).
// table_grad (CPU) is the autograd rules' scatter of per-row gradients into the table's dense
// gradient (zeros [num_rows, width] + grad_rows at ids) without a table-sized zero fill;
// table_grad_into adds grad_rows at ids into a given table.
// lm_head_forward / lm_head_backward (CPU): the fused LM-head loss of SPEC §4b over vocabulary
// tiles (cpu/lm_head.cpp): per-token loss, ce, kl and stats [T, 3] = (lse, lse(z/τ), lse(s));
// the backward takes the per-token upstream gradient and those stats.
// The CPU buffer pool's tensor-less ops (buffer_pool_*) are defined in cpu/buffer_pool.cpp, and
// lm_head_workspace_bytes in cpu/lm_head.cpp.
#include <torch/library.h>

#ifdef DEFINE_KERNELS_PYTHON_MODULE
#include <Python.h>
// Empty module so `import define_kernels._C` loads the library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(define_kernels_C, m) {
  m.def("hgt_forward(Tensor x, Tensor? ids, Tensor[] params, int[] layers, bool shuffle, "
        "float dropout, float scale, int seed) -> Tensor");
  m.def("hgt_backward(Tensor grad_y, Tensor x, Tensor? ids, Tensor[] params, int[] layers, "
        "bool shuffle, float dropout, float scale, int seed) -> (Tensor, Tensor[])");
  m.def("hgt_forward_saving(Tensor x, Tensor? ids, Tensor[] params, int[] layers, bool shuffle, "
        "float dropout, float scale, int seed) -> (Tensor, Tensor[])");
  m.def("hgt_backward_saved(Tensor grad_y, Tensor x, Tensor? ids, Tensor[] params, Tensor[] saved, "
        "int[] layers, bool shuffle, float dropout, float scale, int seed) -> (Tensor, Tensor[])");
  m.def("table_grad(Tensor grad_rows, Tensor ids, int num_rows) -> Tensor");
  m.def("table_grad_into(Tensor(a!) table, Tensor grad_rows, Tensor ids) -> ()");
  m.def("lm_head_forward(Tensor x, Tensor table, Tensor? bias, Tensor targets, int padding_idx, "
        "float label_smoothing, float z_loss, bool augmented, float kl_coef, float tau, "
        "ScalarType compute_dtype) -> (Tensor loss, Tensor ce, Tensor kl, Tensor stats)");
  m.def("lm_head_backward(Tensor grad_loss, Tensor x, Tensor table, Tensor? bias, Tensor targets, "
        "Tensor stats, int padding_idx, float label_smoothing, float z_loss, bool augmented, "
        "float kl_coef, float tau, ScalarType compute_dtype) -> (Tensor grad_x, Tensor grad_table, "
        "Tensor grad_bias)");
}
