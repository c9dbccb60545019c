"""`use_define`: a transformers PreTrainedModel's input embeddings (and LM head) made DeFINE."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ...define import DeFINE
from ...relatives._checks import check_hidden
from ...relatives.tied import TiedOutput
from . import size_advice
from .vocab import resize_token_embeddings

logger = logging.getLogger(__name__)

CONFIG_KEY = "define_kernels"  # the entry of model.config holding the settings
FORMAT_VERSION = 1
TIE_CHOICES = ("map", "none")


class DeFINESizeWarning(UserWarning):
    """use_define made the model larger; the message says which options would shrink it."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `use_define` changed; the counts are distinct parameters (shared ones once).

    `tie` is the setting; `head` what the model got: "tied" (TiedOutput on the map table),
    "untied" (the model's own head kept) or "none" (the model has no LM head, e.g. a base model
    or a classifier: the setting then applies when the checkpoint is loaded into an LM class).
    """

    model: str
    parameters_before: int
    parameters_after: int
    embedding: dict   # DeFINE.parameter_counts()
    tie: str
    head: str = "tied"

    def __str__(self) -> str:
        ratio = self.parameters_after / self.parameters_before
        head = f"head tie={self.tie!r}" if self.head != "none" else "no LM head"
        return (f"{self.model}: {self.parameters_before:,} -> {self.parameters_after:,} parameters "
                f"({ratio:.2f}x; DeFINE map {self.embedding['map']:,} + transform "
                f"{self.embedding['transform']:,}; {head})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_model(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"module {type(module).__name__} is not part of the model")


def _replace_module(model: nn.Module, module: nn.Module, replacement: nn.Module) -> None:
    parent_name, _, attr = _module_name(model, module).rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)


def use_define(model, *, map_dim: int = 128, expand_dim: int = 1024, depth: int = 4,
               max_groups: int = 8, tie: str = "map", head_bias: bool = False,
               padding_idx="inherit", **define_options) -> ConversionReport:
    """Turn `model` (a PreTrainedModel) into a DeFINE model, in place.

    Args:
        map_dim, expand_dim, depth, max_groups, **define_options: `DeFINE` arguments (any of
            them, e.g. dropout=0.1, in_proj_dim=...); num_embeddings and embedding_dim come from
            the model's input embeddings. Values must be JSON-serialisable (they go to the config).
            The defaults suit large vocabularies (V x H tables of millions of parameters); on a
            small model they can add parameters: the conversion then warns (DeFINESizeWarning)
            with options that are checked to make the model smaller (docs/huggingface.md).
        tie: "map" (default) ties the output head to the DeFINE map table through a bias-free
            m -> n projection (`TiedOutput`); "none" keeps the model's head as an untied matrix.
            A model without an LM head (a base model, a classifier) gets no head either way; the
            setting is stored for a later load into an LM class.
        head_bias: a learned per-word output bias on the tied head (default none, as Inan et al.).
        padding_idx: "inherit" (default) takes the padding index of the replaced nn.Embedding
            (Llama's pad_token_id, none for GPT-2); None or an index overrides it.

    Returns a ConversionReport with the parameter counts before and after (also logged).
    """
    report = convert(model, dict(map_dim=map_dim, expand_dim=expand_dim, depth=depth, max_groups=max_groups,
                                 padding_idx=padding_idx, **define_options), tie, head_bias)
    if report.parameters_after > report.parameters_before:
        warnings.warn(size_advice.message(model, report, tie), DeFINESizeWarning, stacklevel=2)
    return report


def convert(model, settings: dict, tie: str, head_bias: bool) -> ConversionReport:
    """use_define without the size warning (the loader replays saved settings with it)."""
    _check_model(model)
    if tie not in TIE_CHOICES:
        raise ValueError(f"tie must be one of {TIE_CHOICES}, got {tie!r}")
    old = model.get_input_embeddings()
    if isinstance(old, DeFINE):
        raise ValueError("the model already uses DeFINE input embeddings")
    if not isinstance(old, nn.Embedding):
        raise ValueError(f"the model's input embeddings must be an nn.Embedding, got {type(old).__name__}")
    settings = dict(settings)
    if settings.get("padding_idx", "inherit") == "inherit":
        settings["padding_idx"] = old.padding_idx
    try:
        json.dumps(settings)
    except TypeError as error:
        raise ValueError(f"DeFINE options must be JSON-serialisable to go into model.config: {error}") from None
    before = count_parameters(model)

    embedding = DeFINE(old.num_embeddings, old.embedding_dim, **settings)
    embedding.to(device=old.weight.device, dtype=old.weight.dtype)
    embedding.requires_grad_(old.weight.requires_grad)
    model.set_input_embeddings(embedding)
    has_head = model.get_output_embeddings() is not None
    if tie == "map" and has_head:
        _tie_head(model, embedding, head_bias)

    # The head is tied structurally (it reads map_weight) or not at all, so HF's name-based tying
    # is switched off and no declared tie may name a parameter that is gone.
    text_config = model.config.get_text_config()
    text_config.tie_word_embeddings = model.config.tie_word_embeddings = False
    drop_stale_ties(model)
    setattr(model.config, CONFIG_KEY, {"format": FORMAT_VERSION, "tie": tie, "head_bias": head_bias,
                                       "define": settings})
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)

    head = ("tied" if tie == "map" else "untied") if has_head else "none"
    report = ConversionReport(type(model).__name__, before, count_parameters(model),
                              embedding.parameter_counts(), tie, head)
    logger.info("use_define: %s", report)
    return report


def _declared_names(pattern: str, names: set) -> bool:
    if pattern in names:
        return True
    regex = re.compile("^" + pattern)  # transformers' entries may be regexes or module names
    return any(regex.match(name) for name in names)


def drop_stale_ties(model: PreTrainedModel) -> None:
    """Keep in `_tied_weights_keys` only ties whose parameters exist; recompute the expanded map.

    After the conversion `lm_head.weight` (and the nn.Embedding's `weight`) are gone: a declared
    tie naming them would make transformers' tying and its missing-tied-weights checks disagree
    with what the model shares.
    """
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        declared = module._tied_weights_keys
        if declared:
            names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
            if isinstance(declared, dict):
                kept = {target: source for target, source in declared.items()
                        if _declared_names(target, names) and _declared_names(source, names)}
            else:
                kept = [target for target in declared if _declared_names(target, names)]
            module._tied_weights_keys = kept or None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(all_submodels=True)


class PaddedTiedOutput(TiedOutput):
    """TiedOutput that reads the map table with the padding row as zero.

    DeFINE promises that the padding row stays zero and is never updated; a head tied to the
    table would otherwise train that row through the logits (the input side stops only its own
    gradient). The padding word's logit is then its bias (zero without one).
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        padding_idx = self._owner[0].padding_idx
        if padding_idx is None:
            return super().forward(h)
        table = self.table
        check_hidden(h, self.hidden_dim, table.dtype)
        table = table.index_fill(0, torch.tensor([padding_idx], device=table.device), 0.0)
        return F.linear(self.proj(h), table, self.bias)


def _tie_head(model, embedding: DeFINE, head_bias: bool) -> None:
    old_head = model.get_output_embeddings()
    hidden = getattr(old_head, "in_features", None) or embedding.embedding_dim
    head = PaddedTiedOutput(embedding, hidden, bias=head_bias)
    head.to(device=embedding.map_weight.device, dtype=embedding.map_weight.dtype)
    _replace_module(model, old_head, head)
