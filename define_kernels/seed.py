"""The dropout seed, drawn by a custom op so that torch.compile draws it exactly as eager does.

Traced into a graph, `torch.randint` is lowered by Inductor to its own Philox generator (seeded
once from torch's generator), so a compiled model got other dropout masks than eager under the same
`torch.manual_seed` (unless `torch._inductor.config.fallback_random`). Behind an opaque custom
op the draw always runs eagerly on torch's default CPU generator: same seed, same masks, and the
generator advances identically in both.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("define_kernels::draw_dropout_seed", mutates_args=())
def draw_dropout_seed() -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device="cpu")


@draw_dropout_seed.register_fake
def _draw_dropout_seed_fake() -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default generator, so torch.manual_seed makes runs repeatable."""
    return draw_dropout_seed()
