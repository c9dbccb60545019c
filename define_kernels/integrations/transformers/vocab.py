"""Vocabulary edits on DeFINE models: resize_token_embeddings and new-token map rows."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ...define import DeFINE
from ...relatives.tied import TiedOutput


def define_embedding(model: nn.Module) -> DeFINE:
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, DeFINE):
        raise ValueError(f"the model's input embeddings are a {type(embedding).__name__}, "
                         "not a DeFINE: call use_define first")
    return embedding


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


def _real_rows(embedding: DeFINE, count: int) -> torch.Tensor:
    rows = torch.ones(count, dtype=torch.bool, device=embedding.map_weight.device)
    if embedding.padding_idx is not None and embedding.padding_idx < count:
        rows[embedding.padding_idx] = False
    return rows


@torch.no_grad()
def _resize_map(embedding: DeFINE, size: int, mean_resizing: bool) -> None:
    old = embedding.map_weight.detach()
    rows = _real_rows(embedding, old.shape[0])
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
    # The cache notices a replaced or edited parameter by itself; clearing frees the stale table now.
    cache = getattr(embedding, "cache", None)
    if cache is not None and hasattr(cache, "clear"):
        cache.clear()


def _id_tensor(name: str, ids, embedding: DeFINE) -> torch.Tensor:
    tensor = torch.as_tensor(ids, device=embedding.map_weight.device)
    if tensor.dtype in (torch.bool,) or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must be integer token ids, got dtype {tensor.dtype}")
    tensor = tensor.reshape(-1).long()
    if tensor.numel() == 0:
        raise ValueError(f"{name} must name at least one token id")
    bad = tensor[(tensor < 0) | (tensor >= embedding.num_embeddings)]
    if bad.numel():
        raise ValueError(f"{name} has ids outside [0, {embedding.num_embeddings}): {bad[:5].tolist()}")
    return tensor


@torch.no_grad()
def init_map_rows(model_or_embedding: Union[nn.Module, DeFINE], new_ids: Union[Sequence[int], torch.Tensor],
                  from_ids: Union[Sequence[int], torch.Tensor, None] = None) -> torch.Tensor:
    """Set the map rows of `new_ids` to the mean of the map rows of `from_ids`, in place.

    The DeFINE counterpart of `embeddings.weight[new_ids] = embeddings.weight[from_ids].mean(0)`
    (new tokens started from the mean of all, or of a few related, tokens): DeFINE has no
    [V, H] weight; a token's vector is computed from its map row, so the row is what a recipe
    sets. from_ids: default every row but `new_ids` and the padding row. The padding row is
    never written. Returns the mean row that was written ([map_dim]).
    """
    embedding = (model_or_embedding if isinstance(model_or_embedding, DeFINE)
                 else define_embedding(model_or_embedding))
    new = _id_tensor("new_ids", new_ids, embedding)
    if embedding.padding_idx is not None and bool((new == embedding.padding_idx).any()):
        raise ValueError(f"new_ids includes the padding index {embedding.padding_idx}, whose row stays zero")
    if from_ids is None:
        rows = _real_rows(embedding, embedding.num_embeddings)
        rows[new] = False
        if not rows.any():
            raise ValueError("from_ids: no row is left to average once new_ids and the padding row are excluded")
        source = rows.nonzero().reshape(-1)
    else:
        source = _id_tensor("from_ids", from_ids, embedding)
    table = embedding.map_weight
    mean = table[source].float().mean(0).to(table.dtype)
    table[new] = mean
    _clear_cache(embedding)
    return mean
