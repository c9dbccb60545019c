"""The authors' DeFINE layout (their DeLighT fairseq fork, `--define-iclr`): preset, import, export.

    embed = DeFINE.from_delight(checkpoint["model"], prefix="decoder.embed_tokens.")
    theirs = to_delight(embed, prefix="decoder.embed_tokens.")

The public functions; their logic, and what their layout is, live in delight_layout.py.
"""
from __future__ import annotations

from typing import Dict

import torch

from .define import DeFINE
from .delight_layout import DELIGHT_HGT_OPTIONS, delight_layout_reasons, to_delight  # noqa: F401


def delight_define(num_embeddings: int, embedding_dim: int, **options) -> DeFINE:
    """A DeFINE in the authors' layout (delight_layout.delight_define): DeFINE.delight."""
    return DeFINE.delight(num_embeddings, embedding_dim, **options)


def from_delight(state_dict: Dict[str, torch.Tensor], prefix: str = "", **options) -> DeFINE:
    """A DeFINE holding one of the authors' DExTraEmb state dicts (delight_layout.from_delight):
    DeFINE.from_delight."""
    return DeFINE.from_delight(state_dict, prefix, **options)
