"""The JIT build of the C++ extension `define_kernels_C` from the package's csrc/.

torch.utils.cpp_extension (ninja, cached in the torch extensions dir, guarded by its lock file);
CUDA sources only when torch has CUDA and cuda_toolkit.py finds a complete toolkit (which is then
what cpp_extension compiles with), for the archs of cuda_toolkit.cuda_arch_list(). One log line
when it starts, one when it ends. `DEFINE_KERNELS_CSRC=<dir>` builds another source tree
(development). cpp_library.py decides when to build; this module only knows how.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

from .. import env
from . import cuda_toolkit

EXT_NAME = "define_kernels_C"
ENV_VERBOSE = "DEFINE_KERNELS_VERBOSE_BUILD"
ENV_CSRC = "DEFINE_KERNELS_CSRC"

# The two first-use build lines go to this logger. A library does not configure logging, but a
# silent 15-60 s pause is worse: when the application has set up no logging at all, these two
# INFO lines alone go to stderr; with any logging configuration, its handlers decide.
build_logger = logging.getLogger("define_kernels.build")


def _log_build(message: str, *args) -> None:
    if not build_logger.hasHandlers():  # no handler here, on an ancestor or on the root
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        build_logger.addHandler(handler)
        build_logger.setLevel(logging.INFO)
        build_logger.propagate = False
    build_logger.info(message, *args)


def csrc_dir() -> Path:
    """The installed package's csrc/ (package data), else the repository's (editable install)."""
    override = env.value(ENV_CSRC)
    if override:
        return Path(override)
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (candidate / "define_ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"no csrc/define_ops.cpp under {package_dir} or its parent")


def cuda_build_reason() -> Optional[str]:
    """Why the CUDA sources are left out of the JIT build, or None when they are compiled:
    torch without CUDA, or no complete toolkit (nvcc + include/cuda_runtime.h + libcudart, found
    through wrapper scripts too, see cuda_toolkit.py)."""
    return cuda_toolkit.find_toolkit().reason


cuda_arch_list = cuda_toolkit.cuda_arch_list  # re-exported: the build's arch list


def sources(csrc: Path, with_cuda: bool) -> List[str]:
    files = [csrc / "define_ops.cpp"] + sorted((csrc / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
    return [str(f) for f in files]


# The host's vector ISA for the CPU epilogue loops (`omp simd`), as torch itself detected it; the
# JIT build runs on the machine that uses it. ATen's own vector headers are left at their default.
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
              "AVX2": ["-mavx2", "-mfma", "-mf16c"]}


def cpu_isa_flags() -> List[str]:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return []
    return _ISA_FLAGS.get(capability, [])


def jit_build(verbose: bool = False) -> str:
    """Builds (or finds up to date in the cache) and loads the library; returns its path.
    Logs one line when the build starts and one when it ends, with the time it took."""
    from torch.utils import cpp_extension
    csrc = csrc_dir()
    with_cuda = cuda_build_reason() is None and any((csrc / "cuda").glob("*.cu"))
    if with_cuda:
        cuda_toolkit.use_toolkit()
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    _log_build("define_kernels: building or loading %s (%s; first use compiles for 15-60 s)",
                EXT_NAME, f"CPU + CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "CPU only")
    started = time.perf_counter()
    path = cpp_extension.load(
        name=EXT_NAME,
        sources=sources(csrc, with_cuda),
        extra_include_paths=[str(csrc / "include")],
        extra_cflags=["-O3", "-fopenmp"] + cpu_isa_flags(),
        extra_cuda_cflags=["-O3", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    _log_build("define_kernels: %s ready after %.1f s (%s)", EXT_NAME, time.perf_counter() - started, path)
    return path
