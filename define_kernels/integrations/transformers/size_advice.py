"""The message of use_define's size warning: which DeFINE options would make the model smaller.

DeFINE saves parameters by replacing a V x H table with a V x map_dim one plus a transform whose
size does not grow with V. With the defaults (map_dim 128, expand_dim 1024, depth 4) the
transform alone is about 1.5M parameters at H = 128, so a small vocabulary or width makes the
model larger. Candidates are counted on the meta device (no memory, no init) and only those that
really shrink the model are offered.
"""
from __future__ import annotations

from torch import nn

from ...define import DeFINE
from ...relatives.tied import TiedOutput


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(settings: dict, hidden: int, untied_head: bool) -> list:
    """Smaller settings in order of how little they change the user's choice; an untied head
    (tie="none") is tied first, as it costs a whole V x H matrix."""
    narrow = max(8, hidden // 2 // 8 * 8)
    narrower = max(8, hidden // 4 // 8 * 8)
    ladder = [
        dict(expand_dim=2 * hidden),
        dict(expand_dim=2 * hidden, depth=2),
        dict(map_dim=narrow, expand_dim=2 * hidden, depth=2),
        dict(map_dim=narrower, expand_dim=hidden, depth=2),
        dict(map_dim=narrower, expand_dim=hidden, depth=2, max_groups=max(settings.get("max_groups", 8), 8)),
    ]
    seen, out = set(), []
    for change in ([{}] if untied_head else []) + ladder:
        change = {k: v for k, v in change.items() if settings.get(k) != v and
                  not (k in ("expand_dim", "map_dim", "depth") and settings.get(k, 0) < v)}
        if untied_head:
            change = {"tie": "map", **change}
        key = tuple(sorted(change.items()))
        if change and key not in seen:
            seen.add(key)
            out.append(change)
    return out


def smaller_settings(model, embedding: DeFINE, settings: dict, total: int, target: int):
    """(change, parameters) of the first candidate that brings `model` (now `total` parameters)
    under `target`, or None. A change may hold tie="map" besides DeFINE options."""
    head = model.get_output_embeddings()
    untied = head is not None and not isinstance(head, TiedOutput)
    head_now = _count(head) if head is not None and (isinstance(head, TiedOutput) or untied) else 0
    current = total - _count(embedding)
    for change in _candidates(settings, embedding.embedding_dim, untied):
        options = {**settings, **{k: v for k, v in change.items() if k != "tie"}}
        try:
            candidate = DeFINE(embedding.num_embeddings, embedding.embedding_dim, device="meta", **options)
        except ValueError:  # e.g. groups that do not divide a narrower width
            continue
        count = current + _count(candidate)
        if isinstance(head, TiedOutput):
            bias = head.bias.numel() if head.bias is not None else 0
            count += head.hidden_dim * candidate.map_dim + bias - head_now
        elif untied and change.get("tie") == "map":
            hidden_in = getattr(head, "in_features", embedding.embedding_dim)
            count += hidden_in * candidate.map_dim - head_now
        if count < target:
            return change, count
    return None


def message(model, report, tie: str) -> str:
    embedding = model.get_input_embeddings()
    settings = model.config.define_kernels["define"]
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    text = (f"use_define made {report.model} larger: {report.parameters_before:,} -> "
            f"{report.parameters_after:,} parameters. The DeFINE transform "
            f"({report.embedding['transform']:,}) outweighs what the map table saves over the "
            f"{vocab:,} x {hidden} embedding table; DeFINE's defaults are sized for large vocabularies.")
    if tie == "none" and report.head != "none":
        text += " tie='none' also keeps a whole untied [V, H] head; tie='map' makes it an H x map_dim projection."
    found = smaller_settings(model, embedding, settings, report.parameters_after, report.parameters_before)
    if found is None:
        text += (" None of the smaller settings tried (tie, expand_dim, depth, map_dim) brings it under the "
                 "original size: keep nn.Embedding for this model.")
    else:
        change, count = found
        options = ", ".join(f"{k}={v!r}" for k, v in change.items())
        text += f" use_define(model, {options}) gives {count:,} parameters."
    return text + " Filter DeFINESizeWarning to silence this (docs/huggingface.md)."
