"""Backend registry: who computes the fused HGT op, chosen per call from the inputs.

Each backend declares its name, priority (lower wins), devices and dtypes, and two functions
returning reasons it cannot run: one global (package missing, build failed) and one per input
(shapes, options, determinism). `auto` picks the first usable backend by priority; a backend
asked for by name that cannot run raises `BackendUnavailableError` listing its reasons.

GPU backends are also checked against the reference on their first use per (config, dtype) and
demoted for the process on a mismatch (first_use_check.py).

Backends register themselves from the modules listed in `_BUILTIN_MODULES`; importing one must be
cheap (heavy imports such as triton or a JIT build happen on first use).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from ..config import HGTConfig
from . import first_use_check

logger = logging.getLogger(__name__)

AUTO = "auto"
ENV_BACKEND = "DEFINE_KERNELS_BACKEND"
_BUILTIN_MODULES = (
    "torch_reference",
    "triton_hgt",
    "cpp_ext",
)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given inputs."""


class OpInputs(NamedTuple):
    """What a backend is asked to compute: the arguments of the public op."""
    x: torch.Tensor
    ids: Optional[torch.Tensor]
    params: Sequence[torch.Tensor]
    config: HGTConfig
    scale: float
    seed: Optional[int]


def _no_reason() -> Optional[str]:
    return None


def _no_reasons(inputs: OpInputs) -> List[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of `hgt_forward` / `hgt_backward` (signatures as in reference.py)."""
    name: str
    priority: int
    devices: tuple
    dtypes: tuple
    forward: Callable
    backward: Callable
    unavailable_reason: Callable[[], Optional[str]] = _no_reason
    input_reasons: Callable[[OpInputs], List[str]] = _no_reasons
    description: str = ""

    def not_supported_reasons(self, inputs: OpInputs) -> List[str]:
        # Cheap metadata first: asking a backend for its global availability may build it.
        reasons = []
        if inputs.x.device.type not in self.devices:
            reasons.append(f"device {inputs.x.device.type} not in {self.devices}")
        if inputs.x.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.x.dtype} not in {[str(d) for d in self.dtypes]}")
        if reasons:
            return reasons
        reason = self.unavailable_reason()
        return [reason] if reason else list(self.input_reasons(inputs))


_REGISTRY: dict = {}
_default_backend: Optional[str] = None


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def backends_by_priority() -> List[Backend]:
    return sorted(_REGISTRY.values(), key=lambda backend: backend.priority)


def check_backend_name(name: str, argument: str = "backend") -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"{argument} must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the backend used where a module or call says 'auto' ('auto' restores priority order)."""
    global _default_backend
    _default_backend = check_backend_name(name)


def get_backend() -> str:
    """The process-wide choice: set_backend(), else $DEFINE_KERNELS_BACKEND (read once), else auto."""
    global _default_backend
    if _default_backend is None:
        _default_backend = check_backend_name(os.environ.get(ENV_BACKEND, AUTO), ENV_BACKEND)
    return _default_backend


def available_backends() -> List[str]:
    """Names of the backends that can run in this process (installed, built), by priority."""
    return [backend.name for backend in backends_by_priority() if not backend.unavailable_reason()]


def backend_status() -> List[tuple]:
    """(name, reason or None) for every registered backend, by priority."""
    return [(backend.name, backend.unavailable_reason()) for backend in backends_by_priority()]


def select(requested: str, inputs: OpInputs) -> Backend:
    """The backend that runs these inputs: the requested one, or by priority for 'auto'."""
    name = check_backend_name(requested)
    if name == AUTO:
        name = get_backend()
    if name != AUTO:
        backend = _REGISTRY[name]
        reasons = backend.not_supported_reasons(inputs) or first_use_check.reasons(backend, inputs)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    skipped = []
    for backend in backends_by_priority():
        reasons = backend.not_supported_reasons(inputs) or first_use_check.reasons(backend, inputs)
        if not reasons:
            if skipped:
                logger.debug("auto backend %s; skipped %s", backend.name, skipped)
            return backend
        skipped.append((backend.name, reasons))
    raise BackendUnavailableError(f"no backend can run these inputs: {skipped}")


_load_builtins()
