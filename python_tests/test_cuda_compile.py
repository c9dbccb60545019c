"""Compile-checks the CUDA kernels (csrc/cuda/*.cu, CUDA toolkit headers only) with nvcc,
so GPU-less CI catches syntax and template errors. Running them needs a GPU (test_cuda.py)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from define_kernels.backends import cpp_ext

SOURCES = sorted((cpp_ext.csrc_dir() / "cuda").glob("*.cu"))


def _nvcc():
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def test_kernel_sources_exist():
    assert {source.name for source in SOURCES} >= {"hgt_forward.cu", "hgt_backward.cu"}


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_nvcc_compiles_the_kernels(tmp_path, source):
    output = tmp_path / (source.stem + ".o")
    command = [_nvcc(), "-c", "-arch=sm_90", "-std=c++17", f"-I{source.parent}",
               f"-I{cpp_ext.csrc_dir() / 'include'}", str(source), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, " ".join(command) + "\n" + result.stdout + result.stderr[-6000:]
    assert output.stat().st_size > 0
