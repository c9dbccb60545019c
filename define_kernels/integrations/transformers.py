"""DeFINE inside Hugging Face `transformers` models (optional extra `[hf]`).

    from define_kernels.integrations.transformers import use_define, from_pretrained

    report = use_define(model, map_dim=128, expand_dim=1024, depth=4, max_groups=8)
    print(report)                          # parameters before -> after
    model.save_pretrained(path)
    model = from_pretrained(path)          # rebuilds DeFINE, then loads the weights

`use_define` works on a `PreTrainedModel` with input embeddings (GPT-2, Llama and other decoder
families). It replaces the input embeddings by a `DeFINE` of the same vocabulary and width and,
by default, the output head by a `TiedOutput`: logits = (h P) E^T with E the DeFINE map table and
P a bias-free m -> n projection (docs/math.md §4), the padding row read as zero. `tie="none"` keeps the model's own head as an
untied [V, H] matrix instead. The model's tying config is switched off (the head reads the map
table itself), so `tie_weights()` is a no-op, and `resize_token_embeddings` is replaced on the
instance by one that grows or shrinks the map table (and the head). The settings are written to
`model.config.define_kernels`; `from_pretrained` reads them back.

`transformers.AutoModel*.from_pretrained` on such a checkpoint would build nn.Embedding and drop
the DeFINE weights: load it with this module's `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "define_kernels.integrations.transformers needs the `transformers` package; install the "
        "extra: pip install 'define-kernels[hf]' (or pip install transformers)") from error

from ..define import DeFINE
from ..relatives._checks import check_hidden
from ..relatives.tied import TiedOutput

logger = logging.getLogger(__name__)

CONFIG_KEY = "define_kernels"  # the entry of model.config holding the settings
FORMAT_VERSION = 1
TIE_CHOICES = ("map", "none")


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `use_define` changed; the counts are distinct parameters (shared ones once)."""

    model: str
    parameters_before: int
    parameters_after: int
    embedding: dict   # DeFINE.parameter_counts()
    tie: str

    def __str__(self) -> str:
        ratio = self.parameters_after / self.parameters_before
        return (f"{self.model}: {self.parameters_before:,} -> {self.parameters_after:,} parameters "
                f"({ratio:.2f}x; DeFINE map {self.embedding['map']:,} + transform "
                f"{self.embedding['transform']:,}; head tie={self.tie!r})")


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


def define_embedding(model: nn.Module) -> DeFINE:
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, DeFINE):
        raise ValueError(f"the model's input embeddings are a {type(embedding).__name__}, "
                         "not a DeFINE: call use_define first")
    return embedding


def use_define(model, *, map_dim: int = 128, expand_dim: int = 1024, depth: int = 4,
               max_groups: int = 8, tie: str = "map", head_bias: bool = False,
               padding_idx="inherit", **define_options) -> ConversionReport:
    """Turn `model` (a PreTrainedModel) into a DeFINE model, in place.

    Args:
        map_dim, expand_dim, depth, max_groups, **define_options: `DeFINE` arguments (any of
            them, e.g. dropout=0.1, in_proj_dim=...); num_embeddings and embedding_dim come from
            the model's input embeddings. Values must be JSON-serialisable (they go to the config).
        tie: "map" (default) ties the output head to the DeFINE map table through a bias-free
            m -> n projection (`TiedOutput`); "none" keeps the model's head as an untied matrix.
        head_bias: a learned per-word output bias on the tied head (default none, as Inan et al.).
        padding_idx: "inherit" (default) takes the padding index of the replaced nn.Embedding
            (Llama's pad_token_id, none for GPT-2); None or an index overrides it.

    Returns a ConversionReport with the parameter counts before and after (also logged).
    """
    _check_model(model)
    if tie not in TIE_CHOICES:
        raise ValueError(f"tie must be one of {TIE_CHOICES}, got {tie!r}")
    old = model.get_input_embeddings()
    if isinstance(old, DeFINE):
        raise ValueError("the model already uses DeFINE input embeddings")
    if not isinstance(old, nn.Embedding):
        raise ValueError(f"the model's input embeddings must be an nn.Embedding, got {type(old).__name__}")
    if padding_idx == "inherit":
        padding_idx = old.padding_idx
    settings = dict(map_dim=map_dim, expand_dim=expand_dim, depth=depth, max_groups=max_groups,
                    padding_idx=padding_idx, **define_options)
    try:
        json.dumps(settings)
    except TypeError as error:
        raise ValueError(f"DeFINE options must be JSON-serialisable to go into model.config: {error}") from None
    before = count_parameters(model)

    embedding = DeFINE(old.num_embeddings, old.embedding_dim, **settings)
    embedding.to(device=old.weight.device, dtype=old.weight.dtype)
    embedding.requires_grad_(old.weight.requires_grad)
    model.set_input_embeddings(embedding)
    if tie == "map":
        _tie_head(model, embedding, head_bias)

    # The head is tied structurally (it reads map_weight), so HF's name-based tying is switched
    # off: tie_weights() would otherwise look for the removed nn.Embedding's `weight`.
    text_config = model.config.get_text_config()
    text_config.tie_word_embeddings = model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = {}
    setattr(model.config, CONFIG_KEY, {"format": FORMAT_VERSION, "tie": tie, "head_bias": head_bias,
                                       "define": settings})
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)

    report = ConversionReport(type(model).__name__, before, count_parameters(model),
                              embedding.parameter_counts(), tie)
    logger.info("use_define: %s", report)
    return report


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
    if old_head is None:
        raise ValueError(f"{type(model).__name__} has no output head to tie; use tie='none'")
    hidden = getattr(old_head, "in_features", None) or embedding.embedding_dim
    head = PaddedTiedOutput(embedding, hidden, bias=head_bias)
    head.to(device=embedding.map_weight.device, dtype=embedding.map_weight.dtype)
    _replace_module(model, old_head, head)


# ---------------------------------------------------------------------------------- resizing
def resize_token_embeddings(model, new_num_tokens: Optional[int] = None,
                            pad_to_multiple_of: Optional[int] = None, mean_resizing: bool = True):
    """`PreTrainedModel.resize_token_embeddings` for DeFINE models (bound by use_define).

    Grows or shrinks the map table (rows kept from the start, new rows appended) and an untied
    head or a tied head's bias with it. New map rows are the mean of the old rows with
    mean_resizing (as transformers does, to leave the next-token distribution nearly
    unchanged), else DeFINE's init N(0, map_dim^-1/2). The padding row stays zero; shrinking
    below padding_idx raises ValueError. Returns the DeFINE module.
    """
    embedding = define_embedding(model)
    if new_num_tokens is None and pad_to_multiple_of is None:
        return embedding
    size = embedding.num_embeddings if new_num_tokens is None else new_num_tokens
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) \
                or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    if embedding.padding_idx is not None and embedding.padding_idx >= size:
        raise ValueError(f"new_num_tokens ({size}) would drop the padding row "
                         f"(padding_idx={embedding.padding_idx})")
    head = model.get_output_embeddings()
    _resize_map(embedding, size, mean_resizing)
    if isinstance(head, TiedOutput):
        head.num_embeddings = size
        if head.bias is not None:
            head.bias = nn.Parameter(_resize_rows(head.bias.detach(), size, torch.zeros_like))
    elif isinstance(head, nn.Linear):
        model.set_output_embeddings(model._get_resized_lm_head(head, size, mean_resizing=mean_resizing))
    model.config.get_text_config().vocab_size = model.config.vocab_size = size
    model.vocab_size = size
    return embedding


def _resize_rows(old: torch.Tensor, size: int, fill) -> torch.Tensor:
    kept = old[:size]
    if size <= old.shape[0]:
        return kept.clone()
    extra = fill(old.new_empty(size - old.shape[0], *old.shape[1:]))
    return torch.cat([kept, extra])


@torch.no_grad()
def _resize_map(embedding: DeFINE, size: int, mean_resizing: bool) -> None:
    old = embedding.map_weight.detach()
    rows = torch.ones(old.shape[0], dtype=torch.bool, device=old.device)
    if embedding.padding_idx is not None:
        rows[embedding.padding_idx] = False
    if mean_resizing and rows.any():
        mean = old[rows].mean(0)
        fill = lambda extra: extra.copy_(mean.expand_as(extra))  # noqa: E731
    else:
        fill = lambda extra: extra.normal_(std=embedding.map_dim ** -0.5)  # noqa: E731
    table = _resize_rows(old, size, fill)
    if embedding.padding_idx is not None:
        table[embedding.padding_idx] = 0
    requires_grad = embedding.map_weight.requires_grad
    embedding.map_weight = nn.Parameter(table, requires_grad=requires_grad)
    embedding.num_embeddings = size
    _clear_cache(embedding)


def _clear_cache(embedding: DeFINE) -> None:
    # The cache notices a replaced parameter by itself; clearing frees the stale table now.
    cache = getattr(embedding, "cache", None)
    if cache is not None and hasattr(cache, "clear"):
        cache.clear()


# ----------------------------------------------------------------------------------- loading
def from_pretrained(path, model_class=AutoModelForCausalLM, *, dtype: Optional[torch.dtype] = None,
                    device=None, **config_kwargs):
    """Load a DeFINE model saved with `save_pretrained` from the local directory `path`.

    Reads `config.define_kernels`, builds `model_class` (an Auto class or a concrete model
    class) from the config, applies `use_define` with the saved settings, then loads every weight
    strictly (a missing or unexpected key raises). Returns the model in eval mode, as
    transformers' own `from_pretrained` does.
    """
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    saved = getattr(config, CONFIG_KEY, None)
    if not isinstance(saved, dict) or "define" not in saved:
        raise ValueError(f"{path}: config has no {CONFIG_KEY!r} entry; this is not a checkpoint saved "
                         "after use_define (load it with transformers' from_pretrained)")
    if saved.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: {CONFIG_KEY} format {saved.get('format')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        model = model_class(config)
    else:
        model = model_class.from_config(config)
    use_define(model, tie=saved["tie"], head_bias=saved["head_bias"], **saved["define"])
    model.load_state_dict(_read_state_dict(path), strict=True)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _read_state_dict(path) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors (or its index) to load")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


__all__ = ["CONFIG_KEY", "ConversionReport", "PaddedTiedOutput", "count_parameters", "define_embedding", "from_pretrained",
           "resize_token_embeddings", "use_define"]
