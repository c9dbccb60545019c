"""Weight tying / reuse of embeddings (Inan et al., ICLR 2017; docs/math.md §4).

`TiedOutput` turns hidden states h [*, H] into logits [*, V] with the input table as the output
matrix, so the model stores one V-row table instead of two.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_int
from ..define import DeFINE
from ..lm_head import lm_head_loss
from ._checks import check_hidden


class TiedOutput(nn.Module):
    """logits = proj(h) @ E^T (+ bias), E the tied table [V, d].

    Args:
        embedding: an nn.Embedding (E = its weight) or a DeFINE (E = its map table
            `map_weight` [V, n], as in the authors' code).
        hidden_dim: width H of h; default d for nn.Embedding, m (embedding_dim) for DeFINE.
            With nn.Embedding and H == d there is no projection (the paper's setting);
            otherwise, and always with DeFINE (whose table is n-wide), a bias-free
            Linear H -> d projects h first.
        bias: add a learned per-word bias. Default False: the paper's analysis ties W = E with
            no output bias (a zero bias).

    `table` is the tied [V, d] parameter itself (AugmentedLoss takes it).
    """

    def __init__(self, embedding: nn.Module, hidden_dim: Optional[int] = None, *, bias: bool = False):
        super().__init__()
        if isinstance(embedding, DeFINE):
            weight = embedding.map_weight
        elif isinstance(embedding, nn.Embedding):
            weight = embedding.weight
        else:
            raise ValueError("embedding must be an nn.Embedding or a DeFINE, "
                             f"got {type(embedding).__name__}")
        vocab, width = weight.shape
        if hidden_dim is None:
            hidden_dim = embedding.embedding_dim
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        # Held in a plain list so the table is registered (and counted) once, by its owner.
        self._owner = [embedding]
        self.num_embeddings, self.table_dim = vocab, width
        self.needs_proj = isinstance(embedding, DeFINE) or self.hidden_dim != width
        self.proj = nn.Linear(self.hidden_dim, width, bias=False) if self.needs_proj else None
        self.bias = nn.Parameter(torch.zeros(vocab)) if bias else None

    @property
    def table(self) -> torch.Tensor:
        owner = self._owner[0]
        return owner.map_weight if isinstance(owner, DeFINE) else owner.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        table = self.table
        check_hidden(h, self.hidden_dim, table.dtype)
        if self.proj is not None:
            h = self.proj(h)
        return F.linear(h, table, self.bias)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, **options):
        """The loss of forward(h) against `targets` through the fused LM-head op
        (define_kernels.lm_head_loss: no [tokens x V] logits); `options` are that function's
        (reduction, label_smoothing, z_loss, alpha/tau/kl_scale for the augmented loss,
        return_parts, backend, ...). A DeFINE's padding row reads as zero and gets no gradient."""
        table = self.table
        check_hidden(h, self.hidden_dim, table.dtype)
        owner = self._owner[0]
        if isinstance(owner, DeFINE):
            options.setdefault("padding_idx", owner.padding_idx)
        proj = None if self.proj is None else self.proj.weight
        return lm_head_loss(h, table, targets, proj=proj, bias=self.bias, **options)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, table=[{self.num_embeddings}, {self.table_dim}], "
                f"proj={self.needs_proj}, bias={self.bias is not None}")
