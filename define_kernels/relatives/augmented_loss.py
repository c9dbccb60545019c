"""Augmented loss (Inan et al., ICLR 2017; docs/math.md §4).

    J = CE(y*, softmax(W h)) + alpha * s(tau) * KL(y~ || softmax(W h / tau)),
    y~ = softmax(E u / tau),  u = E[y*]  (the target word's row of the tied table E)

y~ spreads the one-hot target over words whose embeddings are close to the target's, so a
prediction of a near-synonym costs less.

Scaling of the KL term, s(tau) (`kl_scale`): the default "tau" multiplies the KL term by tau.
The KL at temperature tau has gradient (1/tau) (softmax(Wh/tau) - y~) with respect to the logits,
so without a factor the term fades as tau grows; Hinton et al.'s distillation multiplies by
tau^2 for the same reason. The public re-implementation of this paper that we could read
(icoxfog417/tying-wv-and-wc, Keras) adds `gamma * temperature * KL`, i.e. s = tau, and that is
the default here; we could not read the paper's own text on this point from the stored copies,
so "tau2" and "none" (the plain formula of docs/math.md §4, s = 1) are offered as well.

y~ is a fixed target by default (`detach_target=True`): no gradient flows through E u / tau,
as in the paper's analysis. Reduction is the mean over tokens (or the sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KL_SCALES = {"tau": lambda tau: tau, "tau2": lambda tau: tau * tau, "none": lambda tau: 1.0}
REDUCTIONS = ("mean", "sum")


class AugmentedLoss(nn.Module):
    """forward(logits [N, V], targets [N], table [V, d]) -> scalar loss (see module docstring).

    Args:
        tau: temperature (> 0) of both y~ and the model's softened prediction; public
            re-implementations use 10.
        alpha: weight (>= 0) of the KL term.
        kl_scale: "tau" (default), "tau2" or "none": extra factor on the KL term.
        detach_target: stop the gradient through y~ (default True).
        reduction: "mean" (default) or "sum" over the N tokens.
    `last_parts` holds (cross_entropy, kl) of the last call, detached, for logging.
    """

    def __init__(self, tau: float = 10.0, alpha: float = 0.5, *, kl_scale: str = "tau",
                 detach_target: bool = True, reduction: str = "mean"):
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        if kl_scale not in KL_SCALES:
            raise ValueError(f"kl_scale must be one of {tuple(KL_SCALES)}, got {kl_scale!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.tau, self.alpha, self.kl_scale = float(tau), float(alpha), kl_scale
        self.detach_target, self.reduction = detach_target, reduction
        self.last_parts = None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [N, V], got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != logits.shape[1]:
            raise ValueError(f"table must be 2-D [V={logits.shape[1]}, d], got "
                             f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
            raise ValueError("targets must be an int32/int64 tensor")
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets must have shape [{logits.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
            bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
            raise IndexError(f"targets contains {bad}, outside [0, {logits.shape[1]})")
        targets = targets.long()
        cross_entropy = F.cross_entropy(logits, targets, reduction=self.reduction)
        source = table.detach() if self.detach_target else table
        target_log_probs = F.log_softmax(source[targets] @ source.t() / self.tau, dim=-1)
        model_log_probs = F.log_softmax(logits / self.tau, dim=-1)
        kl = F.kl_div(model_log_probs, target_log_probs.to(model_log_probs.dtype),
                      reduction="sum", log_target=True)
        if self.reduction == "mean":
            kl = kl / max(targets.numel(), 1)
        self.last_parts = (cross_entropy.detach(), kl.detach())
        return cross_entropy + self.alpha * KL_SCALES[self.kl_scale](self.tau) * kl

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, alpha={self.alpha}, kl_scale={self.kl_scale!r}, "
                f"detach_target={self.detach_target}")
