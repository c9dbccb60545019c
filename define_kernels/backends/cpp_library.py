"""The C++ extension `define_kernels_C`: load it once per process and register its fakes.

Exactly one library is loaded per process (a TORCH_LIBRARY namespace can be defined only once),
the first of:
  1. `DEFINE_KERNELS_LIB=<path.so>`: a library built by CMakeLists.txt;
  2. `define_kernels._C`: built ahead of time by `DEFINE_KERNELS_BUILD_EXT=1 pip install .`;
  3. the JIT build of the package's csrc/ (cpp_build.py). `DEFINE_KERNELS_NO_JIT=1` disables it,
     `DEFINE_KERNELS_VERBOSE_BUILD=1` shows the compiler output.
Loading happens on first use (the first op call that asks these backends, or
`python -m define_kernels.build`). A failure warns once, naming the cause, and the backends
report themselves unavailable, so `auto` falls back to the reference.
"""
from __future__ import annotations

import importlib
import logging
import threading
import warnings
from typing import NamedTuple, Optional

import torch

from .. import contract, env
from .cpp_build import ENV_VERBOSE, EXT_NAME, jit_build

logger = logging.getLogger(__name__)

ENV_LIB = "DEFINE_KERNELS_LIB"
ENV_NO_JIT = "DEFINE_KERNELS_NO_JIT"


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
    library = env.value(ENV_LIB)
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
    if env.flag(ENV_NO_JIT):
        return LoadState(None, f"JIT build disabled by {ENV_NO_JIT}=1 and no prebuilt library")
    try:
        path = jit_build(verbose=env.flag(ENV_VERBOSE))
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
