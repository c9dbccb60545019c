"""The language model: input layer -> LSTM or causal Transformer -> output layer -> loss."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from define_kernels.relatives import AugmentedLoss


class LSTMContext(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, layers, dropout=dropout if layers > 1 else 0.0)

    def forward(self, x, state):
        return self.lstm(x, state)


class TransformerContext(nn.Module):
    """Pre-LN causal Transformer over one window [t, B, d] (no memory across windows)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_len: int = 4096):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        position = torch.arange(max_len).unsqueeze(1)
        rates = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, 1, dim)
        table[:, 0, 0::2], table[:, 0, 1::2] = torch.sin(position * rates), torch.cos(position * rates)
        self.register_buffer("positions", table, persistent=False)

    def forward(self, x, state):
        length = x.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        y = self.encoder(x + self.positions[:length], mask=mask, is_causal=True)
        return self.norm(y), None


class LanguageModel(nn.Module):
    """forward(inputs [t, B], targets [t, B], state) -> (objective, cross-entropy sum, state).

    The objective (what training minimizes) is the mean cross-entropy, or the augmented loss
    when `loss` is an AugmentedLoss (its table is the decoder's tied table). The loss is computed
    inside forward so DistributedDataParallel sees every parameter use.
    """

    def __init__(self, encoder: nn.Module, context: nn.Module, decoder: nn.Module,
                 dropout: float, loss: Optional[AugmentedLoss] = None):
        super().__init__()
        self.encoder, self.context, self.decoder, self.loss = encoder, context, decoder, loss
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, state=None):
        x = self.dropout(self.encoder(inputs))
        h, state = self.context(x, state)
        logits = self.decoder(self.dropout(h)).reshape(-1, self.decoder.num_embeddings)
        flat_targets = targets.reshape(-1)
        cross_entropy = F.cross_entropy(logits, flat_targets, reduction="sum")
        if self.loss is not None and self.training:
            objective = self.loss(logits, flat_targets, self.decoder.table)
        else:
            objective = cross_entropy / flat_targets.numel()
        return objective, cross_entropy.detach(), state


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(detach_state(s) for s in state)
