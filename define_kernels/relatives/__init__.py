"""Relatives of DeFINE from the literature (docs/math.md §4), drop-in input/output layers.

Inputs map ids [*] (int32/int64) -> [*, d] like DeFINE; outputs map h [*, H] -> logits [*, V].
"""
from .adaptive_input import AdaptiveDeFINE, AdaptiveInput
from .augmented_loss import AugmentedLoss
from .slim import SlimEmbedding, SlimOutput
from .tied import TiedOutput

__all__ = ["AdaptiveDeFINE", "AdaptiveInput", "AugmentedLoss", "SlimEmbedding", "SlimOutput", "TiedOutput"]
