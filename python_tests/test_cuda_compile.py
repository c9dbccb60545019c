"""Compile-checks the CUDA kernels (csrc/cuda/hgt_kernels.cu, CUDA toolkit headers only) with nvcc,
so GPU-less CI catches syntax and template errors. Running them needs a GPU (test_cuda.py)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from define_kernels.backends import cpp_ext

KERNELS = cpp_ext.csrc_dir() / "cuda" / "hgt_kernels.cu"


def _nvcc():
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.skipif(not KERNELS.is_file(), reason=f"{KERNELS} does not exist yet")
def test_nvcc_compiles_the_kernels(tmp_path):
    command = [_nvcc(), "-c", "-arch=sm_90", "-std=c++17", f"-I{KERNELS.parent}",
               f"-I{cpp_ext.csrc_dir() / 'include'}", str(KERNELS), "-o", str(tmp_path / "hgt_kernels.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, " ".join(command) + "\n" + result.stdout + result.stderr[-6000:]
    assert (tmp_path / "hgt_kernels.o").stat().st_size > 0
