"""csrc/cpu/transpose16.h (the bf16 weight gradients' u^T): equal to the transpose for every
element, with the AVX-512 tiles (when the host has them) and with the one-element path alone,
over sizes that are and are not multiples of the tile, strided source and destination rows, and
row ranges that start inside the matrix (as the threads split it). The header is compiled into a
small program (no torch headers), with the JIT build's vector flags and without any."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from define_kernels.backends import cpp_build

CPU_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cpu"

SOURCE = r"""
#include "transpose16.h"
#include <cstdio>
#include <cstdlib>
#include <vector>

// argv: rows cols lds ldd r0 r1 in out; reads rows * lds uint16, writes cols * ldd uint16
// (dst starts as 0xFFFF: rows outside [r0, r1) and padding must stay so).
int main(int argc, char** argv) {
  long rows = std::atol(argv[1]), cols = std::atol(argv[2]), lds = std::atol(argv[3]);
  long ldd = std::atol(argv[4]), r0 = std::atol(argv[5]), r1 = std::atol(argv[6]);
  std::vector<uint16_t> src(rows * lds), dst(cols * ldd, 0xFFFF);
  std::FILE* in = std::fopen(argv[7], "rb");
  if (std::fread(src.data(), 2, src.size(), in) != src.size()) return 1;
  std::fclose(in);
  define_kernels::cpu::transpose16_rows(src.data(), lds, dst.data(), ldd, r0, r1, cols);
  std::FILE* out = std::fopen(argv[8], "wb");
  std::fwrite(dst.data(), 2, dst.size(), out);
  std::fclose(out);
  return 0;
}
"""


@pytest.fixture(scope="module", params=["host-isa", "no-simd"])
def transpose_program(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"transpose16-{request.param}")
    source, program = folder / "transpose.cpp", folder / "transpose"
    source.write_text(SOURCE)
    flags = cpp_build.cpu_isa_flags() if request.param == "host-isa" else []
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O2", *flags, f"-I{CPU_SOURCES}",
                    str(source), "-o", str(program)], check=True)
    return program


@pytest.mark.parametrize("rows, cols, r0, r1", [
    (1, 1, 0, 1), (16, 16, 0, 16), (17, 33, 0, 17), (64, 48, 16, 48), (100, 130, 3, 97),
    (45, 16, 0, 45), (32, 7, 0, 32),
])
def test_transpose_matches(transpose_program, tmp_path, rows, cols, r0, r1):
    lds, ldd = cols + 5, rows + 3  # strided rows on both sides
    src = torch.randint(0, 1 << 16, (rows, lds), dtype=torch.int32)
    (tmp_path / "in.bin").write_bytes(bytes(src.to(torch.int16).view(torch.uint8).flatten().tolist()))
    subprocess.run([str(transpose_program), *map(str, (rows, cols, lds, ldd, r0, r1)),
                    str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    raw = torch.tensor(list((tmp_path / "out.bin").read_bytes()), dtype=torch.uint8)
    got = raw.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).view(cols, ldd)
    want = torch.full((cols, ldd), 0xFFFF, dtype=torch.int32)
    want[:, r0:r1] = src[r0:r1, :cols].t()
    assert torch.equal(got, want)
