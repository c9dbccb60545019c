"""define-kernels: DeFINE embeddings (Mehta et al., ICLR 2020) with fused kernels.

Public API: HGTConfig, HGT, DeFINE, hgt (the functional op), set_backend, get_backend,
available_backends, lm_head_loss (the fused LM-head loss). The math is docs/math.md §2; `reference.py` is its executable form.
"""
from . import integrations, lm_head, ops, relatives
from .backends import BackendUnavailableError, available_backends, get_backend, set_backend
from .config import HGTConfig, LayerSpec
from .define import DeFINE
from .hgt import HGT
from .lm_head import LMHeadLoss, lm_head_loss
from .functional import hgt

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "DeFINE", "HGT", "HGTConfig", "LayerSpec", "available_backends",
    "LMHeadLoss", "get_backend", "hgt", "integrations", "lm_head", "lm_head_loss", "ops", "relatives", "set_backend", "__version__",
]
