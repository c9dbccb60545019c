"""`HGT`: the Hierarchical Group Transformation stack as an nn.Module over dense inputs."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from . import functional
from .backends import check_activation_policy, check_backend_name
from .checks import check_last_dim
from .config import HGTConfig, LayerSpec
from .seed import draw_seed

# "spec": Xavier per group (docs/math.md); "xavier_3d": the authors' torch xavier_uniform_ over
# the whole [g, a/g, w/g] weight of a g > 1 layer (fan_in (a/g)(w/g), fan_out w); g = 1 layers
# are the same under both (their [w, a] Linear weight).
INITS = ("spec", "xavier_3d")


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


class HGTLayer(nn.Module):
    """Parameters of one grouped layer: weight [g, a/g, w/g], bias [g, w/g], norm [w/g]."""

    def __init__(self, spec: LayerSpec, has_norm: bool, init: str = "spec", *, device=None, dtype=None):
        super().__init__()
        g = spec.groups
        factory = {"device": device, "dtype": dtype}
        self.spec = spec
        self.init = check_init(init)
        self.weight = nn.Parameter(torch.empty(g, spec.in_features // g, spec.out_features // g, **factory))
        self.bias = nn.Parameter(torch.empty(g, spec.out_features // g, **factory))
        if has_norm:
            self.norm_weight = nn.Parameter(torch.empty(spec.out_features // g, **factory))
            self.norm_bias = nn.Parameter(torch.empty(spec.out_features // g, **factory))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """docs/math.md §2 init: Xavier-uniform weights (per group, or over the 3-D weight with init="xavier_3d"),
        zero bias, LN (1, 0)."""
        if self.init == "xavier_3d" and self.spec.groups > 1:
            nn.init.xavier_uniform_(self.weight)
        else:
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
    """HGT stack of docs/math.md §2 over x [*, in_dim] -> [*, out_dim].

    Parameters, per layer l (0-based; the last one is the reduce layer):
        layers.{l}.weight       [g, a/g, w/g]
        layers.{l}.bias         [g, w/g]
        layers.{l}.norm_weight  [w/g]  (norm="layernorm" and, for reduce, reduce_norm)
        layers.{l}.norm_bias    [w/g]
    with (a, w, g) = config.layers[l + config.first_stack_layer] (in_features, out_features,
    groups): a config with an in-proj (in_proj_from) holds its layer 0 too, but its parameters
    belong to the owner (DeFINE's in_proj / in_proj_norm), which prepends them to `op_params()`;
    forward() over such a config raises. `init` is "spec"
    or "xavier_3d" (the authors' init, see INITS); `activations` is "recompute", "save" or "auto"
    (per device, see functional.hgt); `device` / `dtype` are factory kwargs, as for nn.Linear.
    """

    def __init__(self, config: HGTConfig, backend: str = "auto", init: str = "spec",
                 activations: str = "auto", *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, HGTConfig):
            raise ValueError(f"config must be an HGTConfig, got {type(config).__name__}")
        self.config = config
        self.backend = check_backend_name(backend)
        self.activations = check_activation_policy(activations)
        self.layers = nn.ModuleList(
            HGTLayer(spec, config.layer_has_norm(index), init, device=device, dtype=dtype)
            for index, spec in enumerate(config.layers) if index >= config.first_stack_layer)
        self.register_load_state_dict_pre_hook(_check_cycle_layout)

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def op_params(self) -> List[torch.Tensor]:
        """The flat parameter list in the op's order (config.param_shapes())."""
        return [param for layer in self.layers for param in layer.op_params()]

    def dropout_seed(self) -> Optional[torch.Tensor]:
        return draw_seed() if self.training and self.config.has_dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.has_in_proj:
            raise ValueError("config has an in-proj (in_proj_from): its parameters live in the "
                             "owner (DeFINE); call functional.hgt with them before op_params()")
        check_last_dim(x, self.config.in_dim, "x")
        rows = x.reshape(-1, self.config.in_dim)
        y = functional.hgt(rows, self.op_params(), self.config, seed=self.dropout_seed(), backend=self.backend,
                           activations=self.activations)
        return y.reshape(*x.shape[:-1], self.config.out_dim)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, macs_per_token={self.config.macs_per_token}\n" + self.config.table()


def _check_cycle_layout(module: HGT, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """A checkpoint saved before the group_rule="cycle" fix has other weight shapes: say why."""
    if module.config.group_rule != "cycle":
        return
    for index, layer in enumerate(module.layers):
        key = f"{prefix}layers.{index}.weight"
        saved = state_dict.get(key)
        if saved is not None and tuple(saved.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"{key}: the checkpoint has shape {list(saved.shape)}, this module "
                f"{list(layer.weight.shape)}. group_rule='cycle' was corrected (README, Changelog): "
                f"it now cycles over the N + 1 layers, so the expand groups are "
                f"{module.config.expand_groups}; a checkpoint saved with the old rule does not load "
                f"into the new layout")
