"""csrc/cpu/storage_cast.h: the integer-only float -> bfloat16 rounding the CPU epilogues store
with (c10::BFloat16(float) keeps their loops from vectorizing) equals torch's conversion bit for
bit, over random bit patterns and the edge cases. The header is compiled into a small program
with the JIT build's vector flags, its loop vectorized as in the epilogues (no torch headers
beyond c10's BFloat16, so it builds in seconds)."""
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from define_kernels.backends import cpp_build

CPU_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cpu"

SOURCE = r"""
#include "storage_cast.h"
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  std::FILE* in = std::fopen(argv[1], "rb");
  std::vector<float> values;
  float v;
  while (std::fread(&v, sizeof(v), 1, in) == 1) values.push_back(v);
  std::fclose(in);
  std::vector<c10::BFloat16> out(values.size());
  const float* src = values.data();
  c10::BFloat16* dst = out.data();
  const long n = static_cast<long>(values.size());
#pragma omp simd
  for (long i = 0; i < n; ++i) dst[i] = define_kernels::cpu::to_storage<c10::BFloat16>(src[i]);
  std::FILE* result = std::fopen(argv[2], "wb");
  std::fwrite(out.data(), sizeof(c10::BFloat16), out.size(), result);
  std::fclose(result);
  return 0;
}
"""


@pytest.fixture(scope="module")
def rounding_program(tmp_path_factory):
    folder = tmp_path_factory.mktemp("storage_cast")
    source, program = folder / "round.cpp", folder / "round"
    source.write_text(SOURCE)
    include = Path(cpp_extension.include_paths()[0])
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O3", "-fopenmp-simd", *cpp_build.cpu_isa_flags(), f"-I{CPU_SOURCES}",
                    "-isystem", str(include), str(source), "-o", str(program)], check=True)
    return program


def test_bfloat16_rounding_matches_torch_bit_for_bit(rounding_program, tmp_path):
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32), torch.tensor([
        0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, 3.4e38,
        -3.4e38, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0])])
    (tmp_path / "in.bin").write_bytes(bytes(values.view(torch.uint8).tolist()))
    subprocess.run([str(rounding_program), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int16)
    want = values.to(torch.bfloat16).view(torch.int16)
    nan = values.isnan()
    assert got.numel() == values.numel()
    assert torch.equal(got[~nan], want[~nan]), values[~nan][got[~nan] != want[~nan]][:5]
    assert got[nan].view(torch.bfloat16).isnan().all()
