"""Training loss of a converted causal LM through the fused LM head (define_kernels.lm_head_loss).

A transformers causal LM computes `logits = lm_head(h)` ([batch, length, V]) and then the loss from
them. With the fused loss enabled, a forward in training mode with `labels` runs the model with
its head bypassed, so the hidden states come out instead of the logits, and takes the loss from
them with the head's own weights, never materialising the logits; the output then has
`logits=None`. Without labels, in eval mode, or with gradients off (generate, evaluation,
inference) the model's own forward runs unchanged and returns logits.

The labels are shifted as transformers' ForCausalLMLoss does (or `shift_labels` is used), and
`num_items_in_batch` (gradient accumulation) turns the mean into sum / num_items_in_batch, as
there. Families are allow-listed: a model that post-processes its logits (soft-capping, logit
scales) would get a different loss from the bypass, so only families whose forward is
`logits = lm_head(h)` are accepted.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...lm_head import lm_head_loss
from ...relatives.tied import TiedOutput

FUSED_FAMILIES = ("gpt2", "llama")
LOSS_OPTIONS = ("label_smoothing", "z_loss", "alpha", "tau", "kl_scale", "backend")


def supports_fused_loss(model) -> bool:
    return (getattr(model.config, "model_type", None) in FUSED_FAMILIES
            and model.get_output_embeddings() is not None)


def enable_fused_loss(model, enabled: bool = True, **loss_options) -> None:
    """Compute `model`'s training loss (forward with labels, training mode, gradients on) through
    the fused LM head; `loss_options` are lm_head_loss's (label_smoothing, z_loss, alpha, tau,
    kl_scale, backend). `enabled=False` restores the model's own forward."""
    for name in loss_options:
        if name not in LOSS_OPTIONS:
            raise TypeError(f"enable_fused_loss() got an unexpected keyword argument {name!r} "
                            f"(its loss options are {', '.join(LOSS_OPTIONS)})")
    if not enabled:
        model.__dict__.pop("forward", None)
        return
    if not supports_fused_loss(model):
        raise ValueError(f"the fused loss supports causal LMs of the families {FUSED_FAMILIES} with an "
                         f"output head; got model_type {getattr(model.config, 'model_type', None)!r} "
                         f"({type(model).__name__})")
    model.forward = types.MethodType(_fused_forward(type(model).forward, dict(loss_options)), model)


def _fused_forward(original, loss_options: dict):
    def forward(self, *args, labels: Optional[torch.Tensor] = None, **kwargs):
        if labels is None or not self.training or not torch.is_grad_enabled():
            return original(self, *args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = kwargs.pop("return_dict", None)
        head = self.get_output_embeddings()
        with _bypassed(self, head):
            outputs = original(self, *args, return_dict=True, **kwargs)
        loss = _loss(head, outputs.logits, labels, shift_labels, num_items, loss_options)
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        result = type(outputs)(loss=loss, logits=None, **fields)
        return result if return_dict is not False else result.to_tuple()
    return forward


@contextlib.contextmanager
def _bypassed(model: nn.Module, head: nn.Module):
    """The head replaced by an identity for one call, so the model returns h as its logits."""
    name = next(name for name, module in model.named_modules() if module is head)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    attribute = name.rpartition(".")[2]
    setattr(parent, attribute, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def _loss(head, hidden, labels, shift_labels, num_items, options):
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items is None else "sum"
    if isinstance(head, TiedOutput):
        loss = head.loss(hidden, shift_labels, reduction=reduction, **options)
    elif isinstance(head, nn.Linear):
        loss = lm_head_loss(hidden, head.weight, shift_labels, bias=head.bias, reduction=reduction, **options)
    else:
        raise ValueError(f"the fused loss needs a TiedOutput or nn.Linear head, got {type(head).__name__}")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss
