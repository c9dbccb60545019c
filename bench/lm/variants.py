"""The input/output layers each benchmark variant plugs into the LM, and the parameter split.

    untied        nn.Embedding(V, d)  + Linear(H, V)              (separate output matrix)
    tied          nn.Embedding(V, d)  + TiedOutput (RE, Inan et al.), loss through the fused head
    tied_unfused  tied, but the loss unfused: F.linear(h, E) -> [tokens x V] logits -> F.cross_entropy
                  (what a user writes without this library: the wall-clock baseline)
    tied_al       tied + augmented loss (REAL), alpha > 0 inside the fused head
    slim          SlimEmbedding       + SlimOutput (own pools; Li et al.)
    adaptive      AdaptiveInput(V, d) + Linear(H, V) (full softmax)
    adaptive_softmax
                  AdaptiveInput(V, d) + nn.AdaptiveLogSoftmaxWithLoss (same frequency bands, same
                  factor; untied: torch's adaptive softmax cannot share the input bands)
    linear, glt, glt_shuffle, hgt, define_nomix, define
                  DeFINE(V, d, transform=...) + TiedOutput to its map table (bias-free H -> n
                  projection, as the authors' code ties DeFINE), loss through the fused head
    define_al     define + augmented loss (alpha > 0 inside the fused head)

`Layers.head` is how LanguageModel computes the loss ("logits", "fused", "adaptive"; see
model.py); the tied variants use the fused head unless their name says unfused.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from torch import nn

from define_kernels import DeFINE
from define_kernels.relatives import (AdaptiveInput, AugmentedLoss, SlimEmbedding, SlimOutput,
                                      TiedOutput)

DEFINE_TRANSFORMS = {
    "linear": dict(transform="linear"),
    "glt": dict(transform="glt"),
    "glt_shuffle": dict(transform="glt", shuffle=True),
    "hgt": dict(transform="hgt"),
    "define_nomix": dict(transform="define_nomix"),
    "define": dict(transform="define"),
}
VARIANTS = (("untied", "tied", "tied_al", "slim", "adaptive") + tuple(DEFINE_TRANSFORMS)
            + ("tied_unfused", "adaptive_softmax", "define_al"))
PARAM_GROUPS = ("embedding", "transform", "context", "output")


@dataclasses.dataclass(frozen=True)
class LayerSizes:
    vocab: int
    emb_dim: int
    hidden_dim: int
    map_dim: int = 64
    expand_dim: int = 256
    depth: int = 3
    max_groups: int = 4
    slim_subvectors: int = 4
    slim_pool: int = 2048
    adaptive_factor: int = 4
    al_tau: float = 10.0
    al_alpha: float = 0.5
    init_range: float = 0.1
    seed: int = 0

    @property
    def adaptive_cutoffs(self) -> tuple:
        """Baevski & Auli's WT-103 bands (20k, 60k of 267k words) scaled to this vocabulary."""
        return (max(1, round(self.vocab * 0.075)), max(2, round(self.vocab * 0.225)))


class UntiedOutput(nn.Linear):
    def __init__(self, hidden_dim: int, vocab: int):
        super().__init__(hidden_dim, vocab)
        self.num_embeddings = vocab


class Layers(NamedTuple):
    encoder: nn.Module
    decoder: nn.Module
    loss: Optional[AugmentedLoss]
    tables: tuple  # the encoder's lookup tables: counted as "embedding", the rest as "transform"
    head: str = "logits"  # how LanguageModel computes the loss (model.HEADS)


def build_layers(variant: str, sizes: LayerSizes) -> Layers:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    vocab, d, hidden = sizes.vocab, sizes.emb_dim, sizes.hidden_dim
    if variant in ("untied", "tied", "tied_al", "tied_unfused"):
        encoder = nn.Embedding(vocab, d)
        nn.init.uniform_(encoder.weight, -sizes.init_range, sizes.init_range)
        if variant == "untied":
            decoder = _uniform_output(UntiedOutput(hidden, vocab), sizes.init_range)
        else:
            decoder = TiedOutput(encoder, hidden)
        loss = AugmentedLoss(sizes.al_tau, sizes.al_alpha) if variant == "tied_al" else None
        head = "fused" if variant in ("tied", "tied_al") else "logits"
        return Layers(encoder, decoder, loss, (encoder.weight,), head)
    if variant == "slim":
        k, pool = sizes.slim_subvectors, sizes.slim_pool
        encoder = SlimEmbedding(vocab, d, num_subvectors=k, pool_size=pool, seed=sizes.seed)
        decoder = SlimOutput(vocab, hidden, num_subvectors=k, pool_size=pool, seed=sizes.seed + 1)
        for pools in (encoder.pools, decoder.table.pools):
            nn.init.uniform_(pools, -sizes.init_range, sizes.init_range)
        return Layers(encoder, decoder, None, (encoder.pools,))
    if variant in ("adaptive", "adaptive_softmax"):
        encoder = AdaptiveInput(vocab, d, sizes.adaptive_cutoffs, sizes.adaptive_factor)
        bands = tuple(band.weight for band in encoder.bands)
        if variant == "adaptive":
            return Layers(encoder, _uniform_output(UntiedOutput(hidden, vocab), sizes.init_range), None, bands)
        decoder = nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, list(sizes.adaptive_cutoffs),
                                                div_value=float(sizes.adaptive_factor))
        return Layers(encoder, decoder, None, bands, "adaptive")
    transform = DEFINE_TRANSFORMS["define" if variant == "define_al" else variant]
    encoder = DeFINE(vocab, d, map_dim=sizes.map_dim, expand_dim=sizes.expand_dim, depth=sizes.depth,
                     max_groups=sizes.max_groups, **transform)
    loss = AugmentedLoss(sizes.al_tau, sizes.al_alpha) if variant == "define_al" else None
    return Layers(encoder, TiedOutput(encoder, hidden), loss, (encoder.map_weight,), "fused")


def _uniform_output(linear: nn.Linear, init_range: float) -> nn.Linear:
    nn.init.uniform_(linear.weight, -init_range, init_range)
    nn.init.zeros_(linear.bias)
    return linear


def parameter_split(layers: Layers, context: nn.Module) -> dict:
    """Unique parameters per group: embedding (lookup tables), transform (the rest of the input
    layer: DeFINE's stack, adaptive projections), context, output (what the decoder adds; a
    tied table is counted once, under embedding)."""
    seen, counts = set(), dict.fromkeys(PARAM_GROUPS, 0)

    def add(group, params):
        for param in params:
            if id(param) not in seen:
                seen.add(id(param))
                counts[group] += param.numel()

    add("embedding", layers.tables)
    add("transform", layers.encoder.parameters())
    add("context", context.parameters())
    add("output", layers.decoder.parameters())
    counts["total"] = sum(counts[group] for group in PARAM_GROUPS)
    return counts


def total_parameters(*modules: nn.Module) -> int:
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


__all__ = ["LayerSizes", "Layers", "VARIANTS", "build_layers", "parameter_split"]
