"""The C++ extension `define_kernels_C`: load it once, register its fakes and the backends
`cpu_cpp` and `cuda`.

Exactly one library is loaded per process (a TORCH_LIBRARY namespace can be defined only once),
the first of:
  1. `DEFINE_KERNELS_LIB=<path.so>`: a library built by CMakeLists.txt;
  2. `define_kernels._C`: built ahead of time by `DEFINE_KERNELS_BUILD_EXT=1 pip install .`;
  3. a JIT build of the package's csrc/ with torch.utils.cpp_extension (ninja, cached in the torch
     extensions dir, guarded by its lock file), CUDA sources only when torch has CUDA and
     cuda_toolkit.py finds a complete toolkit (which is then what cpp_extension compiles with),
     for the archs of cuda_toolkit.cuda_arch_list(). One log line when it starts, one when it ends. `DEFINE_KERNELS_NO_JIT=1` disables it, `DEFINE_KERNELS_VERBOSE_BUILD=1` shows the
     compiler output, `DEFINE_KERNELS_CSRC=<dir>` builds another source tree (development).
Loading happens on first use (the first op call that asks these backends, or
`python -m define_kernels.build`). A failure warns once, naming the cause, and the backends
report themselves unavailable, so `auto` falls back to the reference.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import torch

from .. import contract
from ..config import HGTConfig
from . import cuda_toolkit
from .registry import Backend, register_backend

logger = logging.getLogger(__name__)
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

EXT_NAME = "define_kernels_C"
ENV_LIB = "DEFINE_KERNELS_LIB"
ENV_NO_JIT = "DEFINE_KERNELS_NO_JIT"
ENV_VERBOSE = "DEFINE_KERNELS_VERBOSE_BUILD"
ENV_CSRC = "DEFINE_KERNELS_CSRC"

# ----------------------------------------------------------------------------- layer encoding
def encode_layers(config: HGTConfig) -> List[int]:
    """The `layers` argument of the C++ ops: contract.Plan.encode (codes in codes.py)."""
    return contract.plan(config).encode()


def cpp_args(config: HGTConfig, scale: float, seed: Optional[int]) -> tuple:
    """(layers, shuffle, dropout, scale, seed) as the C++ ops take them; seed -1 = no dropout."""
    return (encode_layers(config), bool(config.shuffle), float(config.dropout), float(scale),
            -1 if seed is None else int(seed))


# ----------------------------------------------------------------------------- sources
def csrc_dir() -> Path:
    """The installed package's csrc/ (package data), else the repository's (editable install)."""
    override = os.environ.get(ENV_CSRC)
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


# ----------------------------------------------------------------------------- loading
class LoadState(NamedTuple):
    source: Optional[str]   # "DEFINE_KERNELS_LIB=...", "define_kernels._C", "jit:<path>", "preloaded"
    reason: Optional[str]   # why the library is unavailable, None when loaded


_lock = threading.Lock()
_state: Optional[LoadState] = None


def _namespace_defined() -> bool:
    try:
        torch.ops.define_kernels_C.hgt_forward
    except (AttributeError, RuntimeError):
        return False
    return True


def _failed(cause: str) -> LoadState:
    message = (f"define_kernels: the C++ extension {EXT_NAME} is unavailable ({cause}); the "
               f"cpu_cpp and cuda backends are disabled and 'auto' uses the other backends. "
               f"Set {ENV_VERBOSE}=1 for the compiler output, {ENV_NO_JIT}=1 to skip the build.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return LoadState(None, cause)


def _build_error_summary(text: str, limit: int = 1500) -> str:
    """The compiler's error lines when there are any (the full log is long), else the tail."""
    lines = text.splitlines()
    errors = [line.strip() for line in lines if "error:" in line or "#error" in line]
    text = lines[0].split(":")[0] + ": " + " | ".join(errors[:6]) if errors else text.strip()
    return (text if len(text) <= limit else "..." + text[-limit:]) or "(no message)"


def _load() -> LoadState:
    if _namespace_defined():
        return LoadState("preloaded", None)
    library = os.environ.get(ENV_LIB)
    if library:
        try:
            torch.ops.load_library(library)
        except Exception as error:  # noqa: BLE001 - any loader error becomes the reason
            return _failed(f"{ENV_LIB}={library} could not be loaded: {error}")
        return LoadState(f"{ENV_LIB}={library}", None)
    try:
        importlib.import_module("define_kernels._C")
        return LoadState("define_kernels._C", None)
    except ModuleNotFoundError:
        pass
    except ImportError as error:  # built, but for another torch: say so, then try the JIT build
        logger.info("prebuilt define_kernels._C does not load (%s); trying the JIT build", error)
    if os.environ.get(ENV_NO_JIT, "0") not in ("", "0"):
        return LoadState(None, f"JIT build disabled by {ENV_NO_JIT}=1 and no prebuilt library")
    try:
        path = jit_build(verbose=os.environ.get(ENV_VERBOSE, "0") not in ("", "0"))
    except Exception as error:  # noqa: BLE001 - compiler, ninja or loader errors alike
        return _failed(f"JIT build failed: {type(error).__name__}: {_build_error_summary(str(error))}")
    return LoadState(f"jit:{path}", None)


def load_library() -> LoadState:
    """Loads the library once per process (thread-safe) and registers its fakes."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            if _state.reason is None:
                _register_fakes()
        return _state


def unavailable_reason() -> Optional[str]:
    return load_library().reason


def loaded() -> bool:
    """Whether the library is loaded already (this never starts a build)."""
    return _state is not None and _state.reason is None


def table_grad(num_rows: int, ids: torch.Tensor, grad_rows: torch.Tensor) -> Optional[torch.Tensor]:
    """zeros [num_rows, width] + grad_rows at ids (summed per id) for CPU grad_rows, without a
    table-sized zero fill (csrc/cpu/table_grad.cpp); None when the library is not loaded
    already (this never starts a build) or grad_rows is not on the CPU."""
    if not loaded() or grad_rows.device.type != "cpu":
        return None
    return torch.ops.define_kernels_C.table_grad(grad_rows, ids, num_rows)


def table_grad_into(table: torch.Tensor, ids: torch.Tensor, grad_rows: torch.Tensor) -> bool:
    """table += grad_rows at ids (summed per id, as table_grad) in place; False (table untouched)
    when the library is not loaded already or the tensors are not on the CPU."""
    if not loaded() or grad_rows.device.type != "cpu":
        return False
    torch.ops.define_kernels_C.table_grad_into(table, grad_rows, ids)
    return True


# ----------------------------------------------------------------------------- fakes
def _register_fakes() -> None:
    """The C++ ops' fakes: contract.check_encoded_inputs (the Python side of checks.h; the CUDA
    ops refuse an in-proj) and the contract's output shapes."""
    def checked(x, ids, params, layers, dropout, seed):
        return contract.check_encoded_inputs(x, ids, params, layers, dropout, seed,
                                             allow_in_proj=x.device.type != "cuda")

    @torch.library.register_fake(f"{EXT_NAME}::hgt_forward")
    def _forward_fake(x, ids, params, layers, shuffle, dropout, scale, seed):
        return contract.forward_outputs(x, ids, checked(x, ids, params, layers, dropout, seed))

    @torch.library.register_fake(f"{EXT_NAME}::hgt_backward")
    def _backward_fake(grad_y, x, ids, params, layers, shuffle, dropout, scale, seed):
        contract.check_grad_y(grad_y, x, ids, checked(x, ids, params, layers, dropout, seed))
        return contract.backward_outputs(x, ids, params)

    @torch.library.register_fake(f"{EXT_NAME}::hgt_forward_saving")
    def _forward_saving_fake(x, ids, params, layers, shuffle, dropout, scale, seed):
        plan = checked(x, ids, params, layers, dropout, seed)
        return contract.forward_outputs(x, ids, plan, saving=True)

    @torch.library.register_fake(f"{EXT_NAME}::hgt_backward_saved")
    def _backward_saved_fake(grad_y, x, ids, params, saved, layers, shuffle, dropout, scale, seed):
        contract.check_saved(saved, x, ids, checked(x, ids, params, layers, dropout, seed))
        return contract.backward_outputs(x, ids, params)

    @torch.library.register_fake(f"{EXT_NAME}::table_grad")
    def _table_grad_fake(grad_rows, ids, num_rows):
        return grad_rows.new_empty(num_rows, grad_rows.shape[1])

    @torch.library.register_fake(f"{EXT_NAME}::table_grad_into")
    def _table_grad_into_fake(table, grad_rows, ids):
        return None


# ----------------------------------------------------------------------------- backends
def _ops():
    reason = load_library().reason
    if reason:
        raise RuntimeError(f"{EXT_NAME} is unavailable: {reason}")
    return torch.ops.define_kernels_C


def forward(x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    return _ops().hgt_forward(x, ids, list(params), *cpp_args(config, scale, seed))


def backward(grad_y, x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    grad_rows, grad_params = _ops().hgt_backward(
        grad_y, x, ids, list(params), *cpp_args(config, scale, seed))
    return grad_rows, list(grad_params)


def forward_saving(x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    y, saved = _ops().hgt_forward_saving(x, ids, list(params), *cpp_args(config, scale, seed))
    return y, list(saved)


def backward_saved(grad_y, x, ids, params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor],
                   config: HGTConfig, scale=1.0, seed=None):
    layers, shuffle, dropout, scale, seed = cpp_args(config, scale, seed)
    grad_rows, grad_params = _ops().hgt_backward_saved(
        grad_y, x, ids, list(params), list(saved), layers, shuffle, dropout, scale, seed)
    return grad_rows, list(grad_params)


def _cuda_unavailable_reason() -> Optional[str]:
    reason = unavailable_reason()
    if reason:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{EXT_NAME}::hgt_forward", "CUDA"):
        return f"{EXT_NAME} was built without its CUDA sources ({cuda_build_reason() or 'none found'})"
    return None


CUDA_MAX_LAYERS = 16  # dk_cuda::kMaxLayers in csrc/cuda/hgt_kernels.cuh (fixed-size pointer tables)


def _cuda_input_reasons(inputs) -> List[str]:
    reasons = []
    layers = len(inputs.config.layers)
    if layers > CUDA_MAX_LAYERS:
        reasons.append(f"{layers} layers, the CUDA kernels take at most {CUDA_MAX_LAYERS}")
    if inputs.config.has_in_proj:  # csrc/cuda reads one dropout p and x as every layer's skip
        reasons.append("in-proj layer (in_proj_from) not implemented in the CUDA kernels")
    return reasons


# `auto` order on CPU comes from the measured ranking (backends/measured_ranking.json); without
# one for a dtype, cpu_cpp follows the reference.
CPU_PRIORITY = 2000

register_backend(Backend(
    name="cpu_cpp",
    priority=CPU_PRIORITY,
    devices=("cpu",),
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    forward=forward,
    backward=backward,
    unavailable_reason=unavailable_reason,
    activation_policies=("recompute", "save"),
    # fp16 computes in fp32 (csrc/cpu/hgt_cpu.cpp); its saved activations would be rounded to
    # fp16 and LayerNorm's backward amplifies that past the reference's error.
    save_dtypes=(torch.float32, torch.float64, torch.bfloat16),
    forward_saving=forward_saving,
    backward_saved=backward_saved,
    description="C++ CPU kernels (csrc/cpu): per layer whole-batch grouped GEMMs (ATen mm on "
                "strided views) and one fused row-block epilogue; fp32/fp64/bf16/fp16",
))

register_backend(Backend(
    name="cuda",
    priority=20,
    devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    forward=forward,
    backward=backward,
    unavailable_reason=_cuda_unavailable_reason,
    input_reasons=_cuda_input_reasons,
    description="CUDA C++ kernels (csrc/cuda), compiled with the JIT/AOT/CMake build when "
                "torch has CUDA and nvcc exists",
))
