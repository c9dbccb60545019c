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


class CausalBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x)); causal SDPA on [B, t, d]."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no attention dropout: keeps the fused CPU kernel
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerContext(nn.Module):
    """Pre-LN causal Transformer over one window [t, B, d] (no memory across windows), sinusoidal
    positions, a final LayerNorm. Attention is F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_len: int = 4096):
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        position = torch.arange(max_len).unsqueeze(1)
        rates = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * rates), torch.cos(position * rates)
        self.register_buffer("positions", table, persistent=False)

    def forward(self, x, state):
        length = x.shape[0]
        y = x.transpose(0, 1) + self.positions[:length].to(x.dtype)  # [B, t, d]
        for block in self.blocks:
            y = block(y)
        return self.norm(y).transpose(0, 1), None


HEADS = ("logits", "fused", "adaptive")


class LanguageModel(nn.Module):
    """forward(inputs [t, B], targets [t, B], state) -> (objective, cross-entropy sum, state).

    The objective (what training minimizes) is the mean cross-entropy, or the augmented loss
    when `loss` is an AugmentedLoss (its table is the decoder's tied table). `head` says how the
    output layer turns h into a loss:
      "logits"   decoder(h) -> [tokens x V] logits -> F.cross_entropy (+ AugmentedLoss): unfused;
      "fused"    decoder.loss(h, targets) of a TiedOutput (define_kernels.lm_head_loss: no logits
                 are materialised; the augmented loss, when `loss` is given, inside the same op);
      "adaptive" decoder is nn.AdaptiveLogSoftmaxWithLoss (Grave et al.'s adaptive softmax).
    `amp`: a dtype (torch.bfloat16) to run forward under torch.autocast on the inputs' device.
    The loss is computed inside forward so DistributedDataParallel sees every parameter use.
    """

    def __init__(self, encoder: nn.Module, context: nn.Module, decoder: nn.Module,
                 dropout: float, loss: Optional[AugmentedLoss] = None, head: Optional[str] = None,
                 amp: Optional[torch.dtype] = None):
        super().__init__()
        if head is None:
            head = "adaptive" if isinstance(decoder, nn.AdaptiveLogSoftmaxWithLoss) else "logits"
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.encoder, self.context, self.decoder, self.loss = encoder, context, decoder, loss
        self.head, self.amp = head, amp
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, state=None):
        with torch.autocast(inputs.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            x = self.dropout(self.encoder(inputs))
            h, state = self.context(x, state)
            h = self.dropout(h)
            objective, cross_entropy = getattr(self, "_" + self.head)(h, targets.reshape(-1))
        return objective, cross_entropy.detach(), state

    def _logits(self, h, flat_targets):
        logits = self.decoder(h).reshape(-1, self.decoder.num_embeddings)
        cross_entropy = F.cross_entropy(logits, flat_targets, reduction="sum")
        if self.loss is not None and self.training:
            return self.loss(logits, flat_targets, self.decoder.table), cross_entropy
        return cross_entropy / flat_targets.numel(), cross_entropy

    def _fused(self, h, flat_targets):
        options = {}
        if self.loss is not None and self.training:
            options = dict(alpha=self.loss.alpha, tau=self.loss.tau, kl_scale=self.loss.kl_scale,
                           detach_target=self.loss.detach_target)
        parts = self.decoder.loss(h.reshape(-1, h.shape[-1]), flat_targets, return_parts=True, **options)
        return parts.loss, parts.ce.sum()

    def _adaptive(self, h, flat_targets):
        # per-token log-probabilities (bf16 under autocast) summed in fp32, not the module's bf16 mean
        # (under autocast h leaves the final LayerNorm in fp32; the module wants one dtype throughout)
        h = h.to(self.amp) if self.amp is not None else h
        nll = -self.decoder(h.reshape(-1, h.shape[-1]), flat_targets).output.float()
        return nll.mean(), nll.sum()


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(detach_state(s) for s in state)
