"""Self-describing DeFINE checkpoints: the options that change what the module computes travel in
its state_dict (`<prefix>_extra_state`) and are compared on load.

The description is a uint8 tensor holding JSON, so state_dicts stay all-tensor (safetensors,
distributed checkpointing). Options that only change how it runs (dropout, dedup, sparse,
backend, cache) are left out, so a checkpoint can be fine-tuned or served with other ones.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch

FORMAT = 1
# HGTConfig fields that do not change the function computed in eval (training-only or derived
# from the module options below).
_RUNTIME_CONFIG_FIELDS = frozenset({"dropout", "in_dim", "out_dim", "in_proj_dropout", "in_proj_from"})
_MODULE_OPTIONS = ("num_embeddings", "embedding_dim", "map_dim", "padding_idx", "in_proj_dim",
                   "scale_map", "zero_padding_output")


def describe(module) -> dict:
    """The options of a DeFINE that a checkpoint must agree with, as plain JSON values."""
    options = {name: getattr(module, name) for name in _MODULE_OPTIONS}
    for field in dataclasses.fields(module.config):
        if field.name not in _RUNTIME_CONFIG_FIELDS:
            options[field.name] = getattr(module.config, field.name)
    return options


def encode(options: dict) -> torch.Tensor:
    text = json.dumps({"format": FORMAT, "options": options}, sort_keys=True)
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def decode(state) -> Optional[dict]:
    """The options stored by `encode`; None when the state cannot be read (meta tensors)."""
    if isinstance(state, dict):  # tolerate a plain dict written by hand
        return state.get("options", state)
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"DeFINE extra state must be a uint8 tensor, got {type(state).__name__}")
    if state.device.type == "meta":
        return None
    return json.loads(bytes(state.cpu().tolist()).decode())["options"]


def check_compatible(saved: dict, current: dict) -> None:
    """ValueError naming every option whose saved value differs from this module's."""
    mismatches = [f"{name}={saved[name]!r} in the checkpoint but {current[name]!r} here"
                  for name in sorted(saved.keys() & current.keys()) if saved[name] != current[name]]
    if mismatches:
        raise ValueError("DeFINE checkpoint does not match this module: " + "; ".join(mismatches)
                         + " (build the module with the checkpoint's options)")


def add_legacy_extra_state(state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: checkpoints from before the description load as they did."""
    state_dict.setdefault(prefix + "_extra_state", None)
