"""The LM-head tests' one float64 unfused reference and their random cases.

`unfused` builds the loss from torch's own pieces — F.linear logits, F.cross_entropy,
relatives.AugmentedLoss — so the fused op is checked against an independent formulation.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from define_kernels.lm_head import registry
from define_kernels.relatives import AugmentedLoss

import expectations

BACKENDS = ["reference", "cpu_cpp", "triton"]
# The random-config and fuzz sweeps: the Triton interpreter runs them at ~100x the others' time,
# so triton's value checks at small sizes are python_tests/test_lm_head_triton.py's.
SWEEP_BACKENDS = ["reference", "cpu_cpp"]
OPTION_KEYS = ("label_smoothing", "z_loss", "alpha", "tau", "kl_scale", "padding_idx", "detach_target")


@dataclasses.dataclass
class Case:
    tokens: int
    hidden: int
    width: int
    vocab: int
    proj: bool
    bias: bool
    ignored: float
    reduction: str
    options: dict

    def tensors(self, dtype=torch.float64, seed=0):
        """(h, proj, table, bias, targets), drawn in float64 then cast, so every dtype sees the
        same values."""
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(self.tokens, self.hidden if self.proj else self.width, generator=g, dtype=torch.float64)
        proj = torch.randn(self.width, self.hidden, generator=g, dtype=torch.float64) / self.hidden ** 0.5 if self.proj else None
        table = torch.randn(self.vocab, self.width, generator=g, dtype=torch.float64)
        bias = torch.randn(self.vocab, generator=g, dtype=torch.float64) if self.bias else None
        targets = torch.randint(0, self.vocab, (self.tokens,), generator=g)
        targets[torch.rand(self.tokens, generator=g) < self.ignored] = -100
        if self.options.get("padding_idx") is not None:
            table[self.options["padding_idx"]] = 0  # a DeFINE keeps its padding row zero
        h, proj, table, bias = (None if t is None else t.to(dtype) for t in (h, proj, table, bias))
        return h, proj, table, bias, targets


def random_case(rng: random.Random, max_vocab: int = 3000) -> Case:
    vocab = rng.choice([1, 2, 7, rng.randint(3, 300), rng.randint(300, max_vocab)])
    options = {}
    if rng.random() < 0.4:
        options["label_smoothing"] = rng.choice([0.1, 0.5, 1.0])
    if rng.random() < 0.3:
        options["z_loss"] = rng.choice([1e-4, 1e-2])
    if rng.random() < 0.5:
        options.update(alpha=rng.choice([0.1, 1.0]), tau=rng.choice([0.5, 3.0, 10.0]),
                       kl_scale=rng.choice(["tau", "tau2", "none"]))
    if rng.random() < 0.3:
        options["padding_idx"] = rng.randrange(vocab)
    return Case(tokens=rng.choice([0, 1, rng.randint(2, 70)]), hidden=rng.choice([5, 17, 33]),
                width=rng.choice([1, 3, 9, 16, 33]), vocab=vocab, proj=rng.random() < 0.6,
                bias=rng.random() < 0.5, ignored=rng.choice([0.0, 0.0, 0.3, 1.0]),
                reduction=rng.choice(["mean", "sum", "none"]), options=options)


def unfused(h, proj, table, bias, targets, reduction="mean", ignore_index=-100, label_smoothing=0.0,
            z_loss=0.0, alpha=0.0, tau=10.0, kl_scale="tau", detach_target=True,
            padding_idx: Optional[int] = None):
    """The loss from [T, V] logits, as a user writes it without the fused op."""
    if padding_idx is not None:
        table = table.index_fill(0, torch.tensor([padding_idx]), 0.0)
    x = h if proj is None else F.linear(h, proj)
    z = F.linear(x, table, bias)
    per_token = F.cross_entropy(z, targets, reduction="none", ignore_index=ignore_index,
                                label_smoothing=label_smoothing).float() if z.dtype != torch.float64 else \
        F.cross_entropy(z, targets, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    keep = targets != ignore_index
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(z.to(per_token.dtype), 1) ** 2 * keep
    if alpha > 0:
        kl = torch.zeros_like(per_token)
        if bool(keep.any()):
            module = AugmentedLoss(tau=tau, alpha=1.0, kl_scale="none", detach_target=detach_target,
                                   reduction="sum")
            kept = keep.nonzero().squeeze(1)
            for t in kept.tolist():  # per token, so "none" has its per-token KL too
                row = z[t:t + 1].to(per_token.dtype)
                total = module(row, targets[t:t + 1], table.to(per_token.dtype))
                part = total - F.cross_entropy(row, targets[t:t + 1], reduction="sum")
                kl = kl.index_put((torch.tensor([t]),), part.reshape(1))
        scale = {"tau": tau, "tau2": tau * tau, "none": 1.0}[kl_scale]
        per_token = per_token + alpha * scale * kl
    if reduction == "mean":
        return per_token.sum() / keep.sum()
    return per_token.sum() if reduction == "sum" else per_token


def usable(name: str, x: torch.Tensor, table: torch.Tensor, spec) -> str:
    """Skip with the registry's reasons when `name` cannot run; fail instead when CI expects it."""
    if name not in registry.names():
        reasons = [f"LM-head backend {name} is not registered"]
    else:
        reasons = registry._REGISTRY[name].reasons(x, table, spec)
    if reasons:
        message = f"backend {name}: " + "; ".join(reasons)
        input_only = all(r.startswith(("compute dtype ", "device ")) for r in reasons)
        if expectations.is_expected(name) and not input_only:
            pytest.fail(f"{message} (expected by {expectations.ENV_EXPECT})")
        pytest.skip(message)
    return name
