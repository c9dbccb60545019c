"""`lm_head_loss`: the loss of a tied output layer without [tokens x V] logits (SPEC §4b)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .contract import REDUCTIONS, LMHeadSpec
from .ops import lm_head_loss_op


class LMHeadLoss(NamedTuple):
    """The reduced loss, and the per-token cross-entropy and KL parts (detached, 0 at ignored
    tokens) for logging."""
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def lm_head_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, *,
                 proj: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, alpha: float = 0.0, tau: float = 10.0, kl_scale: str = "tau",
                 detach_target: bool = True, padding_idx: Optional[int] = None,
                 sparse_grad: bool = False, backend: str = "auto", return_parts: bool = False):
    """Loss of the logits z = (h projᵀ) tableᵀ + bias against `targets`, computed in vocabulary
    tiles (never [tokens x V]).

    h [*, H]; proj [n, H] a bias-free projection (None when H == n, e.g. an nn.Embedding table of
    width H); table [V, n] (DeFINE.map_weight or nn.Embedding.weight); bias [V]; targets [*]
    int32/int64 with `ignore_index` tokens dropped. The per-token loss is
    CE (with `label_smoothing`, as F.cross_entropy) + z_loss·lse² + alpha·κ(tau)·KL, the last
    Inan et al.'s augmented loss (on when alpha > 0; κ from kl_scale "tau", "tau2" or "none";
    its similarity targets detached unless detach_target=False). `reduction` "mean" (over kept
    tokens, as F.cross_entropy), "sum" or "none" (shape of targets). `padding_idx`: a table row
    read as zero (its logit is the bias alone; it gets no gradient). `sparse_grad`: the table's
    gradient as a sparse COO tensor. Returns the loss, or LMHeadLoss(loss, ce, kl) with
    return_parts=True.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(h, torch.Tensor) or h.dim() == 0:
        raise ValueError(f"h must be a tensor [*, H], got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.shape != h.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(h.shape[:-1])} (h's leading dims), got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if proj is not None:
        if not isinstance(proj, torch.Tensor) or proj.dim() != 2 or proj.shape[1] != h.shape[-1]:
            raise ValueError(f"proj must have shape [n, {h.shape[-1]}] (h's width), got "
                             f"{tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__}")
    spec = LMHeadSpec(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                      alpha=alpha, tau=tau, kl_scale=kl_scale, detach_target=bool(detach_target),
                      padding_idx=padding_idx, sparse_grad=bool(sparse_grad))
    x = h.reshape(-1, h.shape[-1])
    if proj is not None:
        x = F.linear(x, proj)
    device_type = table.device.type if isinstance(table, torch.Tensor) else "cpu"
    if (torch.is_autocast_enabled(device_type) and isinstance(table, torch.Tensor)
            and torch.float64 not in (x.dtype, table.dtype)):
        # the GEMMs in the autocast dtype; the fp32 table is cast tile by tile inside the backend
        spec = spec.replace(compute_dtype=str(torch.get_autocast_dtype(device_type)).replace("torch.", ""))
    flat_targets = targets.reshape(-1)
    loss, ce, kl, _ = lm_head_loss_op(x, table, bias, flat_targets, spec.key, backend)
    if reduction == "mean":
        total = loss.sum() / (flat_targets != ignore_index).sum()
    elif reduction == "sum":
        total = loss.sum()
    else:
        total = loss.reshape(targets.shape)
    if not return_parts:
        return total
    return LMHeadLoss(total, ce.reshape(targets.shape), kl.reshape(targets.shape))
