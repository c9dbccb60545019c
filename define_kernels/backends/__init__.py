"""The backends of the HGT op: the registry (registry.py) and the built-in backends, which
register themselves when imported here (torch_reference, triton_hgt, cpp_ext)."""
from .registry import (ACTIVATION_POLICIES, AUTO, DEFAULT_POLICY, ENV_BACKEND, MEASURED_RANKING,  # noqa: F401
                       RECOMPUTE, SAVE, _REGISTRY, Backend, BackendUnavailableError, OpInputs,
                       auto_order, available_backends, backend_status, backends_by_priority,
                       check_activation_policy, check_backend_name, get_backend, measured_ranking,
                       register_backend, resolve_activation_policy, select, set_backend)
from . import torch_reference, triton_hgt, cpp_ext  # noqa: E402,F401  (each registers its backend)
