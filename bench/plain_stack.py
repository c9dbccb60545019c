"""The DeFINE stack written plainly in eager PyTorch, as the authors' code does it: gather,
bmm per layer, cat for the split-and-mix skip, LayerNorm, GELU; autograd keeps every activation.
The map table's gradient covers only the gathered rows: they are an autograd leaf (`rows`, its
.grad after backward), so the baseline pays no table-sized gradient at all, while DeFINE returns
the table's dense gradient. A yardstick for the fused backends, not part of the library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from define_kernels import DeFINE
from define_kernels.config import INPUT_MIX, LN_EPS


class PlainStack(nn.Module):
    """Same parameters (shapes, init) as `define`'s HGT; forward(ids) over the distinct ids."""

    def __init__(self, define: DeFINE):
        super().__init__()
        self.config, self.scale = define.config, define.scale
        self.map_weight = define.map_weight
        self.layers = define.hgt.layers

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        self.rows = self.map_weight.detach().index_select(0, unique)
        self.rows.requires_grad_(torch.is_grad_enabled() and self.map_weight.requires_grad)
        x = self.rows * self.scale
        rows, h = x.shape[0], None
        for index, (spec, layer) in enumerate(zip(self.config.layers, self.layers)):
            g = spec.groups
            if h is None:
                u = x
            elif spec.input_kind == INPUT_MIX:
                u = torch.cat([x.reshape(rows, g, -1), h.reshape(rows, g, -1)], dim=2).reshape(rows, -1)
            else:
                u = torch.cat([x, h], dim=1)
            z = torch.baddbmm(layer.bias.unsqueeze(1), u.reshape(rows, g, -1).transpose(0, 1), layer.weight)
            z = z.transpose(0, 1)
            if layer.norm_weight is not None:
                z = F.layer_norm(z, layer.norm_weight.shape, layer.norm_weight, layer.norm_bias, LN_EPS)
            if self.config.layer_act(index):
                z = F.gelu(z)
            h = z.reshape(rows, -1)
        return h[inverse]
