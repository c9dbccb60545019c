"""`HGT`: the Hierarchical Group Transformation stack as an nn.Module over dense inputs."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from . import ops
from .backends import check_activation_policy, check_backend_name
from .checks import check_last_dim
from .config import HGTConfig, LayerSpec


class HGTLayer(nn.Module):
    """Parameters of one grouped layer: weight [g, a/g, w/g], bias [g, w/g], norm [w/g]."""

    def __init__(self, spec: LayerSpec, has_norm: bool):
        super().__init__()
        g = spec.groups
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(g, spec.in_features // g, spec.out_features // g))
        self.bias = nn.Parameter(torch.empty(g, spec.out_features // g))
        if has_norm:
            self.norm_weight = nn.Parameter(torch.empty(spec.out_features // g))
            self.norm_bias = nn.Parameter(torch.empty(spec.out_features // g))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SPEC §2 init: Xavier-uniform per group (fan_in a/g, fan_out w/g), zero bias, LN (1, 0)."""
        fan_in, fan_out = self.weight.shape[1:]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)

    def op_params(self) -> List[torch.Tensor]:
        norm = [self.norm_weight, self.norm_bias] if self.norm_weight is not None else []
        return [self.weight, self.bias] + norm


class HGT(nn.Module):
    """HGT stack of SPEC §2 over x [*, in_dim] -> [*, out_dim].

    Parameters, per layer l (0-based; the last one is the reduce layer):
        layers.{l}.weight       [g, a/g, w/g]
        layers.{l}.bias         [g, w/g]
        layers.{l}.norm_weight  [w/g]  (norm="layernorm" and, for reduce, reduce_norm)
        layers.{l}.norm_bias    [w/g]
    with (a, w, g) = config.layers[l] (in_features, out_features, groups).
    activations: "recompute", "save" or "auto" (per device), see ops.hgt.
    """

    def __init__(self, config: HGTConfig, backend: str = "auto", activations: str = "auto"):
        super().__init__()
        if not isinstance(config, HGTConfig):
            raise ValueError(f"config must be an HGTConfig, got {type(config).__name__}")
        self.config = config
        self.backend = check_backend_name(backend)
        self.activations = check_activation_policy(activations)
        self.layers = nn.ModuleList(
            HGTLayer(spec, config.layer_has_norm(index)) for index, spec in enumerate(config.layers))

    def op_params(self) -> List[torch.Tensor]:
        """The flat parameter list in the op's order (config.param_shapes())."""
        return [param for layer in self.layers for param in layer.op_params()]

    def dropout_seed(self) -> Optional[torch.Tensor]:
        return ops.draw_seed() if self.training and self.config.dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.config.in_dim, "x")
        rows = x.reshape(-1, self.config.in_dim)
        y = ops.hgt(rows, self.op_params(), self.config, seed=self.dropout_seed(), backend=self.backend,
                    activations=self.activations)
        return y.reshape(*x.shape[:-1], self.config.out_dim)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, macs_per_token={self.config.macs_per_token}\n" + self.config.table()
