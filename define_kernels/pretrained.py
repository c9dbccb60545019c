"""DeFINE from a pretrained nn.Embedding: the map table initialised by PCA of its weight.

DeFINE has no [V, m] table to copy a pretrained one into. What carries over is the geometry of
the vocabulary: the map rows become the table's coordinates along its top `map_dim` principal
directions (centred, least-squares best rank-`map_dim` fit), rescaled to the map's usual init
scale (RMS map_dim^-1/2 per entry) so the HGT stack sees inputs of the size it is initialised
for. The HGT stack itself starts from its normal init; train (or distil against the old table)
to recover the old outputs.
"""
from __future__ import annotations

import torch
from torch import nn


def pca_map_rows(weight: torch.Tensor, map_dim: int) -> torch.Tensor:
    """[V, d] -> [V, map_dim]: principal-component coordinates, RMS map_dim^-1/2 per entry."""
    vocab, width = weight.shape
    if map_dim > min(vocab, width):
        raise ValueError(f"map_dim ({map_dim}) must be at most min(num_embeddings, embedding "
                         f"width) = {min(vocab, width)} to project a pretrained table")
    table = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
    centred = table - table.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:map_dim].T
    rms = coords.pow(2).mean().sqrt().clamp_min(torch.finfo(coords.dtype).tiny)
    return coords * (map_dim ** -0.5 / rms)


def from_embedding(cls, embedding: nn.Embedding, embedding_dim=None, **options):
    """A `cls` (DeFINE) with embedding's vocabulary, padding_idx, device and dtype, and its map
    table initialised by `pca_map_rows`; other keyword arguments go to DeFINE."""
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
    weight = embedding.weight
    options.setdefault("padding_idx", embedding.padding_idx)
    options.setdefault("device", weight.device)
    options.setdefault("dtype", weight.dtype)
    module = cls(embedding.num_embeddings, embedding_dim or embedding.embedding_dim, **options)
    with torch.no_grad():
        module.map_weight.copy_(pca_map_rows(weight, module.map_dim))
        if module.padding_idx is not None:
            module.map_weight[module.padding_idx].zero_()
    return module
