"""Plausible bugs for tools/mutate.py: (name, file, old text, new text, pytest arguments, env).

Each is planted alone in a scratch copy of the repo; the listed tests must then fail. The first
group are the survivors of issue 13's hand audit. `old` must occur exactly once in `file`.
"""
from typing import NamedTuple, Tuple


class Mutation(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()


MODULE_TESTS = ("python_tests/test_define.py", "python_tests/test_module.py")
BOUNDARY = ("python_tests/test_reference.py", "-k", "threshold")
CACHE_TESTS = ("python_tests/test_define.py", "python_tests/test_inference_cache.py")
CPP_BLOCKS = ("python_tests/test_cpp_ext.py", "-k", "thread")
DELIGHT_TESTS = ("python_tests/test_delight.py",)

MUTATIONS = [
    # ---------------------------------------------------------------- issue 13's survivors
    Mutation("padding row not zeroed at init", "define_kernels/define.py",
             "                self.map_weight[self.padding_idx].zero_()",
             "                pass", MODULE_TESTS),
    Mutation("eval cache keyed on the map table only", "define_kernels/define.py",
             "self.cache.lookup(flat, self._parameter_list(),", "self.cache.lookup(flat, [self.map_weight],",
             CACHE_TESTS),
    # Re-targeted when map dropout became hashed and sparse=True moved onto the fused op.
    Mutation("map_dropout applied in eval", "define_kernels/define.py",
             "if not (self.training and self.map_dropout > 0):", "if not self.map_dropout > 0:",
             MODULE_TESTS),
    Mutation("sparse path missing the map scale", "define_kernels/define.py",
             "ids=ids, scale=self.scale,", "ids=ids, scale=1.0 if self.sparse else self.scale,",
             MODULE_TESTS),
    # Re-targeted after the CPU rewrite: per-block partial sums added in block order
    # (csrc/cpu/hgt_epilogue.h) replace the per-thread chunks of the old hgt_cpu.cpp.
    Mutation("C++ fixed-order sum of per-block bias/norm partials skips a block", "csrc/cpu/hgt_epilogue.h",
             "for (int64_t b = 0; b < blocks; ++b) {", "for (int64_t b = 1; b < blocks; ++b) {",
             CPP_BLOCKS),
    Mutation("C++ block count rounded down (a partial last block of rows is dropped)", "csrc/cpu/hgt_epilogue.h",
             "return (rows + kBlockRows - 1) / kBlockRows;", "return rows / kBlockRows;", CPP_BLOCKS),
    Mutation("dropout keep boundary > in the reference", "define_kernels/reference.py",
             "return (h >> 8) >= dropout_threshold(p)", "return (h >> 8) > dropout_threshold(p)", BOUNDARY),
    Mutation("dropout keep boundary > in C++ (CPU and CUDA)", "csrc/include/define_kernels/dropout_hash.h",
             ">> 8) >= threshold;", ">> 8) > threshold;", BOUNDARY),
    Mutation("dropout keep boundary > in Triton", "define_kernels/backends/triton_kernels/common.py",
             "return draw.to(tl.int32) >= threshold", "return draw.to(tl.int32) > threshold", BOUNDARY),
    Mutation("broken csrc/ hidden by a prebuilt DEFINE_KERNELS_LIB", "csrc/cpu/hgt_cpu.cpp",
             '#include "hgt_epilogue.h"', '#error broken on purpose\n#include "hgt_epilogue.h"',
             ("python_tests/test_expectations.py",), (("DEFINE_KERNELS_LIB", "{prebuilt}"),)),
    # ---------------------------------------------------------------- more plausible bugs
    Mutation("padding output not masked", "define_kernels/define.py",
             "y = y * (ids != self.padding_idx).unsqueeze(1).to(y.dtype)", "y = y", MODULE_TESTS),
    Mutation("split-and-mix order swapped in the reference", "define_kernels/reference.py",
             "torch.cat([x_chunks, h_chunks], dim=2)", "torch.cat([h_chunks, x_chunks], dim=2)",
             ("python_tests/test_reference.py",)),
    Mutation("shuffle dropped in the reference", "define_kernels/reference.py",
             "return z.transpose(1, 2).reshape(z.shape)", "return z.reshape(z.shape)",
             ("python_tests/test_reference.py",)),
    Mutation("repeated ids' table gradients overwritten, not summed", "define_kernels/ops.py",
             "torch.zeros_like(x).index_add_(0, ids, grad_rows.to(x.dtype))",
             "torch.zeros_like(x).index_copy_(0, ids, grad_rows.to(x.dtype))",
             ("python_tests/test_ops.py", "python_tests/test_fuzz.py", "-k", "torch_and or autograd")),
    Mutation("dedup gathers the wrong rows", "define_kernels/define.py",
             "y = self._embed(unique)[inverse]", "y = self._embed(unique)[inverse.flip(0)]", MODULE_TESTS),
    Mutation("cache fingerprint ignores the version counter",
             "define_kernels/inference_cache.py",
             "return tuple((p.data_ptr(), p._version) for p in params)",
             "return tuple((p.data_ptr(),) for p in params)", CACHE_TESTS),
    Mutation("C++ dropout keep scale 1/p instead of 1/(1-p)", "csrc/cpu/hgt_layers.cpp",
             "1.0 / (1.0 - d.dropout)});", "1.0 / d.dropout});",
             ("python_tests/test_fuzz.py", "-k", "torch_and")),
    # ---------------------------------------------------------------- newer code
    Mutation("cache parameter walk stops at direct children (misses the HGT layers)", "define_kernels/define.py",
             "stack.extend(m for m in module._modules.values() if m is not None)",
             "stack.extend(m for m in module._modules.values() if m is not None and module is self)",
             CACHE_TESTS),
    Mutation("eval cache serves while grad is enabled and parameters require grad", "define_kernels/define.py",
             "        return not any(p.requires_grad for p in self.parameters())", "        return True",
             CACHE_TESTS),
    Mutation("output layer skips its activation (config)", "define_kernels/config.py",
             "return self.act if index != self.reduce_index or self.reduce_act else None",
             "return self.act if index < self.reduce_index or (index == self.reduce_index and self.reduce_act) "
             "else None",
             DELIGHT_TESTS),
    Mutation("output layer skips its norm (config)", "define_kernels/config.py",
             "return self.norm is not None and (index != self.reduce_index or self.reduce_norm)",
             "return self.norm is not None and (index < self.reduce_index or "
             "(index == self.reduce_index and self.reduce_norm))",
             DELIGHT_TESTS),
    Mutation("output layer skips its activation in the reference stack", "define_kernels/reference.py",
             "z = activation(z, config.layer_act(index)).reshape(rows, layer.out_features)",
             "z = activation(z, config.layer_act(index) if index <= config.reduce_index else None)"
             ".reshape(rows, layer.out_features)", DELIGHT_TESTS),
    Mutation("C++ backward reads the input buffer saved one layer earlier", "csrc/cpu/hgt_cpu.cpp",
             "l > 0 ? saved[2 * l - 1].to(in.compute)", "l > 1 ? saved[2 * l - 3].to(in.compute)",
             ("python_tests/test_functional.py", "-k", "cpu_cpp")),
    Mutation("first-use check does not demote a failing backend", "define_kernels/backends/first_use_check.py",
             "    if failure is None:\n        _passed.add(key)", "    if True:\n        _passed.add(key)",
             ("python_tests/test_first_use_check.py",)),
]
