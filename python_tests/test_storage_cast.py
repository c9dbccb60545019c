"""csrc/cpu/storage_cast.h: the integer-only float -> bfloat16 rounding the CPU epilogues store
with (c10::BFloat16(float) keeps their loops from vectorizing) equals torch's conversion bit for
bit, over random bit patterns and the edge cases. The header is compiled into a tiny extension
with the same vector flags as the JIT build, its loop vectorized as in the epilogues."""
import functools
from pathlib import Path

import torch

from define_kernels.backends import cpp_ext

CPU_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cpu"

SOURCE = r"""
#include "storage_cast.h"
#include <torch/extension.h>

torch::Tensor round_to_bfloat16(torch::Tensor x) {
  auto values = x.contiguous();
  auto out = torch::empty(values.sizes(), values.options().dtype(torch::kBFloat16));
  const float* src = values.data_ptr<float>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  const int64_t n = values.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = define_kernels::cpu::to_storage<c10::BFloat16>(src[i]);
  return out;
}
"""


@functools.lru_cache(maxsize=None)
def extension():
    from torch.utils.cpp_extension import load_inline
    return load_inline("define_kernels_storage_cast_test", cpp_sources=SOURCE,
                       functions=["round_to_bfloat16"], extra_include_paths=[str(CPU_SOURCES)],
                       extra_cflags=["-O3", "-fopenmp"] + cpp_ext.cpu_isa_flags())


def test_bfloat16_rounding_matches_torch_bit_for_bit():
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32), torch.tensor([
        0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, 3.4e38,
        -3.4e38, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0])])
    got = extension().round_to_bfloat16(values)
    want = values.to(torch.bfloat16)
    same = got.view(torch.int16) == want.view(torch.int16)
    nan = values.isnan()
    assert same[~nan].all(), values[~nan][~same[~nan]][:5]
    assert got[nan].isnan().all()
