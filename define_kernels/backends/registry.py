"""The backend registry: who computes the fused HGT op, chosen per call from the inputs.

Each backend declares its name, priority (lower wins), devices and dtypes, and two functions
returning reasons it cannot run: one global (package missing, build failed) and one per input
(shapes, options, determinism). `auto` picks the first usable backend by priority; a backend
asked for by name that cannot run raises `BackendUnavailableError` listing its reasons.

GPU backends are also checked against the reference on their first use per (config, dtype) and
demoted for the process on a mismatch (first_use_check.py).

Activation policies: "recompute" (backward reruns the forward from the inputs; every backend)
and "save" (the forward also returns the activations the backward needs, `forward_saving` /
`backward_saved`, in the layout of contract.Plan.saved_shapes). A backend lists the policies it
supports in `activation_policies`; asking one for another is a reason it cannot run.

`auto` order: priority, except where the library's tuning table (backends/measured_ranking.json,
a file the package owns and ships, regenerated with `make bench-cpu-goals`) ranks backends for
the inputs' device and dtype: the ranked backends then take their places in measured order,
fastest first (unranked backends keep theirs).

Built-in backends register themselves when `define_kernels.backends` imports them; importing
one must be cheap (heavy imports such as triton or a JIT build happen on first use).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence

import torch

from .. import env
from ..config import HGTConfig
from . import first_use_check

logger = logging.getLogger(__name__)

AUTO = "auto"
RECOMPUTE, SAVE = "recompute", "save"
ACTIVATION_POLICIES = (RECOMPUTE, SAVE)
MEASURED_RANKING = Path(__file__).with_name("measured_ranking.json")
ENV_BACKEND = "DEFINE_KERNELS_BACKEND"


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
    activation_policies: tuple = (RECOMPUTE,)
    forward_saving: Optional[Callable] = None   # (x, ids, params, config, scale, seed) -> (y, saved)
    backward_saved: Optional[Callable] = None   # (grad_y, x, ids, params, saved, config, scale, seed)
    save_dtypes: Optional[tuple] = None          # dtypes "save" supports (None: all of dtypes)

    def not_supported_reasons(self, inputs: OpInputs, policy: str = RECOMPUTE) -> List[str]:
        # Cheap metadata first: asking a backend for its global availability may build it.
        reasons = []
        if policy not in self.activation_policies:
            reasons.append(f"activation policy {policy!r} not supported (supports "
                           f"{', '.join(self.activation_policies)})")
        elif policy == SAVE and self.save_dtypes is not None and inputs.x.dtype not in self.save_dtypes:
            reasons.append(f"activation policy 'save' not supported for {inputs.x.dtype}")
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
        _default_backend = check_backend_name(env.value(ENV_BACKEND, AUTO), ENV_BACKEND)
    return _default_backend


def available_backends() -> List[str]:
    """Names of the backends that can run in this process (installed, built), by priority."""
    return [backend.name for backend in backends_by_priority() if not backend.unavailable_reason()]


def backend_status() -> List[tuple]:
    """(name, reason or None) for every registered backend, by priority."""
    return [(backend.name, backend.unavailable_reason()) for backend in backends_by_priority()]


def check_activation_policy(policy: str, argument: str = "activations") -> str:
    if policy != AUTO and policy not in ACTIVATION_POLICIES:
        raise ValueError(f"{argument} must be 'auto' or one of {ACTIVATION_POLICIES}, got {policy!r}")
    return policy


# "auto" activation policy per device type (bench/cpu_goals.py on the development CPU, README): "save" keeps ~2 activations per layer and skips the forward rerun in
# backward. GPU backends implement only "recompute"; cpu_cpp saves no fp16 (see cpp_ext).
DEFAULT_POLICY = {"cpu": SAVE}


def resolve_activation_policy(policy: str, device: torch.device, dtype: torch.dtype,
                              backend: str = AUTO) -> str:
    """The policy to run: an explicit one as given; for 'auto' the device default, unless the
    backend asked for (by name or set_backend) cannot keep activations for this dtype."""
    if policy != AUTO:
        return policy
    chosen = DEFAULT_POLICY.get(device.type, RECOMPUTE) if dtype != torch.float16 else RECOMPUTE
    name = get_backend() if backend == AUTO else backend
    if chosen == SAVE and name in _REGISTRY:
        named = _REGISTRY[name]
        if SAVE not in named.activation_policies or (named.save_dtypes is not None
                                                     and dtype not in named.save_dtypes):
            return RECOMPUTE
    return chosen


@functools.lru_cache(maxsize=1)
def measured_ranking() -> dict:
    """{device type: {dtype name: [backend names, fastest first]}} from MEASURED_RANKING."""
    try:
        data = json.loads(MEASURED_RANKING.read_text())
    except (OSError, ValueError):
        return {}
    return {device: {dtype: list(names) for dtype, names in by_dtype.items()}
            for device, by_dtype in data.get("ranking", {}).items()}


def auto_order(device: torch.device, dtype: torch.dtype) -> List[Backend]:
    """Backends in the order `auto` tries them for this device and dtype: priority order, with
    the measured backends' places refilled in their measured order (unmeasured ones keep theirs)."""
    ordered = backends_by_priority()
    measured = measured_ranking().get(device.type, {}).get(str(dtype).replace("torch.", ""), [])
    measured = [name for name in measured if name in _REGISTRY]
    slots = [index for index, backend in enumerate(ordered) if backend.name in measured]
    for slot, name in zip(slots, measured):
        ordered[slot] = _REGISTRY[name]
    return ordered


def pick(name: str, registry: dict, candidates: Iterable, reasons_of: Callable[[object], List[str]],
         what: str = "backend"):
    """The backend `name` from `registry`, raising BackendUnavailableError with its reasons when it
    cannot run; for 'auto', the first of `candidates` (in order) without reasons. Shared by the
    registries of every op; `what` names the op's backends in the errors."""
    if name != AUTO:
        backend = registry[name]
        reasons = reasons_of(backend)
        if reasons:
            raise BackendUnavailableError(f"{what} {name!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    skipped = []
    for backend in candidates:
        reasons = reasons_of(backend)
        if not reasons:
            if skipped:
                logger.debug("auto %s %s; skipped %s", what, backend.name, skipped)
            return backend
        skipped.append((backend.name, reasons))
    raise BackendUnavailableError(f"no {what} can run these inputs: {skipped}")


def select(requested: str, inputs: OpInputs, policy: str = RECOMPUTE) -> Backend:
    """The backend that runs these inputs: the requested one, or by measurement and priority for
    'auto'."""
    name = check_backend_name(requested)
    if name == AUTO:
        name = get_backend()
    candidates = auto_order(inputs.x.device, inputs.x.dtype) if name == AUTO else ()
    return pick(name, _REGISTRY, candidates,
                lambda backend: backend.not_supported_reasons(inputs, policy)
                or first_use_check.reasons(backend, inputs))

