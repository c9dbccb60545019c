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


MODULE_TESTS = ("python_tests/test_survivors.py", "python_tests/test_module.py")
BOUNDARY = ("python_tests/test_survivors.py", "-k", "threshold")

MUTATIONS = [
    # ---------------------------------------------------------------- issue 13's survivors
    Mutation("padding row not zeroed at init", "define_kernels/define.py",
             "                self.map_weight[self.padding_idx].zero_()",
             "                pass", MODULE_TESTS),
    Mutation("eval cache keyed on the map table only", "define_kernels/define.py",
             "self.cache.get(list(self.parameters()),", "self.cache.get([self.map_weight],", MODULE_TESTS),
    Mutation("map_dropout applied in eval", "define_kernels/define.py",
             "F.dropout(x, self.map_dropout, self.training)", "F.dropout(x, self.map_dropout, True)",
             MODULE_TESTS),
    Mutation("sparse path missing the map scale", "define_kernels/define.py",
             "sparse=self.sparse) * self.scale", "sparse=self.sparse) * (1.0 if self.sparse else self.scale)",
             MODULE_TESTS),
    Mutation("C++ per-chunk gradient sum skips a chunk (invisible with one thread)", "csrc/cpu/hgt_cpu.cpp",
             "for (int64_t chunk = 1; chunk < chunks; ++chunk)", "for (int64_t chunk = 2; chunk < chunks; ++chunk)",
             ("python_tests/test_survivors.py", "-k", "thread")),
    Mutation("C++ chunk bounds rounded per chunk (odd chunking drops tiles)", "csrc/cpu/hgt_cpu.cpp",
             "i < (chunk + 1) * tiles / chunks;", "i < (chunk + 1) * (tiles / chunks);",
             ("python_tests/test_survivors.py", "-k", "thread")),
    Mutation("dropout keep boundary > in the reference", "define_kernels/reference.py",
             "return (h >> 8) >= dropout_threshold(p)", "return (h >> 8) > dropout_threshold(p)", BOUNDARY),
    Mutation("dropout keep boundary > in C++ (CPU and CUDA)", "csrc/include/define_kernels/dropout_hash.h",
             ">> 8) >= threshold;", ">> 8) > threshold;", BOUNDARY),
    Mutation("dropout keep boundary > in Triton", "define_kernels/backends/triton_kernels/common.py",
             "return draw.to(tl.int32) >= threshold", "return draw.to(tl.int32) > threshold", BOUNDARY),
    Mutation("broken csrc/ hidden by a prebuilt DEFINE_KERNELS_LIB", "csrc/cpu/hgt_cpu.cpp",
             "// Rows are cut into tiles", "#error broken on purpose\n// Rows are cut into tiles",
             ("python_tests/test_reliability_guards.py",), (("DEFINE_KERNELS_LIB", "{prebuilt}"),)),
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
             ("python_tests/test_opcheck.py", "python_tests/test_fuzz.py", "-k", "torch_and or autograd")),
    Mutation("dedup gathers the wrong rows", "define_kernels/define.py",
             "y = self._embed(unique)[inverse]", "y = self._embed(unique)[inverse.flip(0)]", MODULE_TESTS),
    Mutation("cache fingerprint ignores the version counter", "define_kernels/inference_cache.py",
             "(p.data_ptr(), p._version, p.dtype, p.device)", "(p.data_ptr(), p.dtype, p.device)", MODULE_TESTS),
    Mutation("C++ dropout keep scale 1/p instead of 1/(1-p)", "csrc/cpu/hgt_cpu.cpp",
             "args.keep_scale = static_cast<T>(1.0 / (1.0 - dropout));",
             "args.keep_scale = static_cast<T>(1.0 / dropout);",
             ("python_tests/test_fuzz.py", "-k", "torch_and")),
]
