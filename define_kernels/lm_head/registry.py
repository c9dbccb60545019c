"""Who computes the LM-head loss: backends with a name, a priority (lower wins), devices and
dtypes, and reasons they cannot run (global: package missing, build failed; per call: options).
`auto` takes the first backend without reasons; one asked for by name that cannot run raises
BackendUnavailableError listing them. `reference` runs everywhere and is the last resort.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, List, Optional

import torch

from ..backends.registry import pick
from .contract import LMHeadSpec

AUTO = "auto"
_BUILTIN_MODULES = ("reference_backend", "cpu_cpp", "triton_backend")


def _no_reason() -> Optional[str]:
    return None


def _no_reasons(x, table, spec) -> List[str]:
    return []


@dataclasses.dataclass(frozen=True)
class HeadBackend:
    """forward / backward with the signatures of contract.py's docstring."""
    name: str
    priority: int
    devices: tuple
    dtypes: tuple                       # GEMM (compute) dtypes it runs
    forward: Callable
    backward: Callable
    unavailable_reason: Callable[[], Optional[str]] = _no_reason
    input_reasons: Callable[..., List[str]] = _no_reasons

    def reasons(self, x: torch.Tensor, table: torch.Tensor, spec: LMHeadSpec) -> List[str]:
        reasons = []
        if x.device.type not in self.devices:
            reasons.append(f"device {x.device.type} not in {self.devices}")
        dtype = spec.gemm_dtype(x, table)
        if dtype not in self.dtypes:
            reasons.append(f"compute dtype {dtype} not in {[str(d) for d in self.dtypes]}")
        if reasons:
            return reasons
        reason = self.unavailable_reason()
        return [reason] if reason else list(self.input_reasons(x, table, spec))


_REGISTRY: dict = {}
_loaded = False


def register(backend: HeadBackend) -> HeadBackend:
    _REGISTRY[backend.name] = backend
    return backend


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")


def names() -> List[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def by_priority() -> List[HeadBackend]:
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda backend: backend.priority)


def check_name(name: str) -> str:
    if not isinstance(name, str) or (name != AUTO and name not in names()):
        raise ValueError(f"backend must be 'auto' or one of {names()}, got {name!r}")
    return name


def available() -> List[str]:
    """Backends that can run in this process (installed, built), by priority."""
    return [backend.name for backend in by_priority() if not backend.unavailable_reason()]


def select(name: str, x: torch.Tensor, table: torch.Tensor, spec: LMHeadSpec) -> HeadBackend:
    check_name(name)
    return pick(name, _REGISTRY, by_priority() if name == AUTO else (),
                lambda backend: backend.reasons(x, table, spec), what="LM-head backend")
