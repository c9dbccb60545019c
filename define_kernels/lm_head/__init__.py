"""The fused LM-head loss (SPEC §4b, docs/math.md "LM head"): cross-entropy, label smoothing,
z-loss and the augmented loss of a tied output layer, without [tokens x V] logits.

contract.py (options, checks, shapes) → reference.py (the math) → registry.py + backends
(reference_backend, cpu_cpp) → ops.py (custom ops, autograd, autocast) → functional.py.
"""
from . import registry
from .contract import LMHeadSpec
from .functional import LMHeadLoss, lm_head_loss

__all__ = ["LMHeadLoss", "LMHeadSpec", "lm_head_loss", "registry"]
